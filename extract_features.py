#!/usr/bin/env python
# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Encode an image collection with SigLIP-NaViT: token-budget packed forwards, data parallel, resumable shards.

    python extract_features.py --model MODEL_DIR_OR_REPO --input "photos/**/*.jpg" --output feats/
    torchrun --nproc-per-node 8 extract_features.py --model ... --input ... --output ...

A thin entry point (the same command is installed as `siglip-navit-extract`): the flags are parsed in
`siglip_navit_tools.extract.cli`, and the work is `siglip_navit_tools.extract.extract(ExtractOptions(...))`. Run as a
script, this file's folder (the repo root) is on sys.path, so the package imports without installation.
"""

import sys

from siglip_navit_tools.extract.cli import main

if __name__ == "__main__":
    sys.exit(main())
