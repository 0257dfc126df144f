# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""The key map: a foreign checkpoint's tensor name -> this repo's name, or the reason it is not written.

ONE pure function, `map_key`, in the spirit of timm's `checkpoint_filter_fn`: BAGEL (`vit_model.` + our paths,
among other modules), stock SigLIP (full `SiglipModel`, `SiglipVisionModel` from transformers 4.x with
`vision_model.*` or 5.x unprefixed) and this repo's own layout all go through it. It must not read files or know
shapes: whether a mapped key is expected, and with which shape, is the plan's business.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple, Optional

VISION = "vision_model."
LAYER_RE = re.compile(r"^vision_model\.encoder\.layers\.([0-9]+)\.")  # ASCII digits only (\d takes any script's)
MAX_LAYER_DIGITS = 9  # a longer index is refused as absurd (int() of thousands of digits is itself slow / refused)
_ROPE_TABLE_RE = re.compile(r"vision_model\.rope\.(cos|sin)_[hw]")
ROPE_DROP = "persistent RoPE tables (vision_model.rope.*; recomputed by the model)"


@dataclass(frozen=True)
class KeyLayout:
    """How a source names its tensors."""

    # "bagel" | "siglip" | "siglip-navit"
    format: str
    # BAGEL: the ViT's key prefix (ends with ".")
    vit_prefix: str = "vit_model."
    # stock SigLIP saved by transformers 5.x's SiglipVisionModel: no "vision_model." prefix
    unprefixed: bool = False


class Mapped(NamedTuple):
    """`key` (this repo's name) when the tensor is ours, else None and the `reason` it is dropped."""

    key: Optional[str]
    reason: Optional[str] = None


def _canonical(key: str, layout: KeyLayout) -> Mapped:
    """The source layout's renaming alone."""
    if layout.format == "bagel":
        if not key.startswith(layout.vit_prefix):
            return Mapped(None, "not part of the ViT (other BAGEL modules; never read)")
        return Mapped(key[len(layout.vit_prefix) :])
    if layout.format == "siglip":
        if key.startswith("text_model."):
            return Mapped(None, "text tower (text_model.*)")
        if key in ("logit_scale", "logit_bias"):
            return Mapped(None, "logit scale / bias")
        return Mapped(VISION + key if layout.unprefixed else key)
    return Mapped(key)


def layer_index(key: str) -> Optional[int]:
    """N of a mapped `vision_model.encoder.layers.N.*` key, else None; an index of more than MAX_LAYER_DIGITS digits
    is returned as 10**MAX_LAYER_DIGITS (absurd either way: the plan refuses it by name)."""
    m = LAYER_RE.match(key)
    if not m:
        return None
    digits = m.group(1)
    return int(digits) if len(digits) <= MAX_LAYER_DIGITS else 10**MAX_LAYER_DIGITS


def map_key(key: str, layout: KeyLayout, keep_layers: Optional[int] = None, layers_stored: int = 0) -> Mapped:
    """A source tensor name -> this repo's name, or None and why it is not written. With `keep_layers`, encoder
    layers keep_layers..layers_stored-1 are dropped too (`--num-hidden-layers`)."""
    mapped = _canonical(key, layout)
    ours = mapped.key
    if ours is None:
        return mapped
    if ours.startswith("vision_model.head."):
        return Mapped(None, "pooling head (vision_model.head.*; not part of this tower)")
    if _ROPE_TABLE_RE.fullmatch(ours):
        return Mapped(None, ROPE_DROP)
    if ours == "vision_model.embeddings.position_ids":
        return Mapped(None, "position_ids buffer")
    layer = layer_index(ours)
    if keep_layers is not None and layer is not None and keep_layers <= layer < layers_stored:
        return Mapped(None, f"encoder layers {keep_layers}..{layers_stored - 1} (--num-hidden-layers {keep_layers})")
    return mapped


def source_key(ours: str, layout: KeyLayout) -> str:
    """The inverse of the renaming: the name a tensor of ours has in the source (for messages about missing keys)."""
    if layout.format == "bagel":
        return layout.vit_prefix + ours
    if layout.unprefixed:
        return ours[len(VISION) :]
    return ours
