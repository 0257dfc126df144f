# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""What `--model` must be, checked before transformers reads it: a SigLIP-NaViT repo, not what it is confused with.

Owns the refusals that say what `--model` is instead and how to make the right thing from it: a stock SigLIP
checkpoint or a BAGEL folder (convert it with `convert_checkpoint.py --src ...`), another model type, and (a local
folder) files transformers would open that are not regular files (a FIFO `config.json` would hang it). Must not load
weights or build models (pipeline.py does), nor download anything but the config a load would fetch anyway.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from ..io.files import NotARegularFile, check_regular_file, read_regular_text
from .options import UsageError

OURS = "siglip_navit"
STOCK_SIGLIP = ("siglip", "siglip_vision_model")
BAGEL_FILES = ("ema.safetensors", "vit_config.json")
# What from_pretrained may open in a model folder: each must be a regular file (or absent).
LOADED_SUFFIXES = (".json", ".safetensors", ".bin", ".py", ".txt", ".model")
MAX_CONFIG_BYTES = 10_000_000


def _convert_hint(model_id: str) -> str:
    name = os.path.basename(os.path.normpath(model_id)) or "model"
    return (
        f"convert it first: python convert_checkpoint.py --src {model_id} --out {name}-siglip-navit, then pass "
        f"--model {name}-siglip-navit"
    )


def _check_folder_files(folder: str, model_id: str) -> None:
    """Every file from_pretrained may open must be a regular file: a FIFO would block it, a directory break it."""
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.endswith(LOADED_SUFFIXES):
            try:
                check_regular_file(entry.path)
            except NotARegularFile as exc:
                raise UsageError(
                    f"--model {model_id!r}: its {entry.name} is {exc}; a model folder holds regular files only "
                    "(nothing was opened)"
                ) from None
            except FileNotFoundError:
                continue


def _local_config(folder: str) -> Optional[dict]:
    path = os.path.join(folder, "config.json")
    if not os.path.lexists(path):
        return None
    try:
        data = json.loads(read_regular_text(path, MAX_CONFIG_BYTES))
    except (OSError, ValueError):
        return None  # unreadable or not JSON: transformers' own error says so
    return data if isinstance(data, dict) else None


def _hub_config(model_id: str, revision: Optional[str]) -> Optional[dict]:
    from transformers import PretrainedConfig

    try:
        return PretrainedConfig.get_config_dict(model_id, **({"revision": revision} if revision else {}))[0]
    except Exception:  # noqa: BLE001 - not reachable / not a repo: the load itself reports it
        return None


def check_model(model_id: str, revision: Optional[str] = None, trust_remote_code: bool = False) -> None:
    """UsageError (one line, exit status 2) when `model_id` is not a SigLIP-NaViT repo: a stock SigLIP checkpoint or
    a BAGEL folder (both say how to convert them), another model type (unless `trust_remote_code`: then the repo's
    own code decides), or a local folder holding a non-regular file where transformers would read one."""
    if os.path.isdir(model_id):
        _check_folder_files(model_id, model_id)
        config = _local_config(model_id)
        bagel = [n for n in BAGEL_FILES if os.path.exists(os.path.join(model_id, n))]
        if bagel and (config or {}).get("model_type") != OURS:
            raise UsageError(
                f"--model {model_id!r} is a BAGEL checkpoint folder (it holds {' and '.join(bagel)}), not a "
                f"SigLIP-NaViT repo; {_convert_hint(model_id)}"
            )
    else:
        config = _hub_config(model_id, revision)
    if config is None:
        return
    model_type = config.get("model_type")
    if model_type == OURS:
        return
    if model_type in STOCK_SIGLIP:
        raise UsageError(
            f"--model {model_id!r} is a stock SigLIP checkpoint (model_type {model_type!r}: transformers' own SigLIP, "
            f"Conv2d patch embedding, fixed-size images), not SigLIP-NaViT; {_convert_hint(model_id)}"
        )
    if not trust_remote_code:
        what = f"a {model_type!r} model" if model_type else "a config.json without a model_type"
        raise UsageError(
            f"--model {model_id!r} holds {what}, not SigLIP-NaViT (model_type {OURS!r}); pass a repo made by "
            "convert_checkpoint.py (or --trust-remote-code to run that repo's own code)"
        )
