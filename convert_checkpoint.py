#!/usr/bin/env python
# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Convert a checkpoint users already have into a ready Hub repo of SigLIP-NaViT (and back to stock SigLIP).

    python convert_checkpoint.py --src SOURCE --out DIR [options]        # `--help` lists every option

SOURCE is a directory, a file or an fsspec URL (`hf://ByteDance-Seed/BAGEL-7B-MoT`, `file:///...`, `s3://...`): a
BAGEL model directory or `.safetensors` file (only the `vit_model.*` tensors are read), a stock SigLIP checkpoint
(`SiglipModel`, or `SiglipVisionModel` as saved by transformers 4.x or 5.x), or a checkpoint of this repo
(re-shard, change dtype, keep fewer layers, or export with `--to stock-siglip`). The source is streamed: headers
first, the plan validated, then only the kept tensors' byte ranges, each hashed as it is written and verified
before the output directory is renamed into place. Exit status 0 on success; non-zero with a one-paragraph reason.

A thin entry point (the same command is installed as `siglip-navit-convert`): the flags are parsed in
`siglip_navit_tools.convert.cli`, and the work is `siglip_navit_tools.convert.convert(ConvertOptions(...))`. Run as a
script, this file's folder (the repo root) is on sys.path, so the package imports without installation.
"""

import sys

from siglip_navit_tools.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
