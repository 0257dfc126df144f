# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""The torch / transformers facts both tools share: the transformers-version differences they bridge (we support 4.49
and 5.x) and the dtype names their `--dtype` flags accept. Nothing else lives here.

The version check and from_pretrained's dtype argument name are the repo's remote code's
(`pipeline_siglip_navit.transformers_major` / `dtype_kwarg`, which `handler.py` uses too): this module delegates.
"""

from __future__ import annotations

import torch

from . import repo_code

# The floating dtypes the commands' `--dtype` name (the converter adds "keep", the extractor "auto").
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def transformers_major() -> int:
    """The installed transformers' major version: the repo's rule (`pipeline_siglip_navit.transformers_major`)."""
    return repo_code.pipeline().transformers_major()


def dtype_kwarg() -> str:
    """from_pretrained's dtype argument: `dtype=` on transformers 5.x, `torch_dtype=` on 4.x (5.x warns on it)."""
    return repo_code.pipeline().dtype_kwarg()
