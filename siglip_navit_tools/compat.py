# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""The transformers-version differences the tools bridge (we support 4.49 and 5.x). Nothing else lives here."""

from __future__ import annotations


def transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def dtype_kwarg() -> str:
    """from_pretrained's dtype argument: `dtype=` on transformers 5.x, `torch_dtype=` on 4.x (5.x warns on it)."""
    return "dtype" if transformers_major() >= 5 else "torch_dtype"
