#!/usr/bin/env python
# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Serve SigLIP-NaViT image embeddings over HTTP, packing the images of concurrent requests into shared forwards.

    python serve.py --model MODEL_DIR_OR_REPO [--host 127.0.0.1] [--port 8000] [--batching continuous|none] ...
    curl localhost:8000/v1/embeddings -H 'Content-Type: application/json' \
        -d '{"model": "NAME", "input": ["data:image/png;base64,..."]}'

A thin entry point (the same command is installed as `siglip-navit-serve`): the flags are parsed in
`siglip_navit_tools.serve.cli`, and the work is `siglip_navit_tools.serve.serve(ServeOptions(...))`. Run as a
script, this file's folder (the repo root) is on sys.path, so the package imports without installation.
"""

import sys

from siglip_navit_tools.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
