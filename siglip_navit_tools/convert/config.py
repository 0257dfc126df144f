# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""The tower's config: read from the source's config file, or inferred from tensor shapes, then checked.

Owns the rules that turn a source into a `SiglipNaViTConfig`: BAGEL's vit_config.json read as BAGEL reads it (and
its num_hidden_layers - 1), stock SigLIP's vision fields, the layer count checks, `--num-hidden-layers`, rope, and an
image_size that is not a multiple of the patch. Must not read tensor data (shapes come from headers) nor decide
which tensors are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..repo_code import configuration
from .options import ConversionError
from .sources import Source

CONFIG_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
    "attention_dropout",
)
# Known tower geometries, used only when a source comes without any config file: hidden size -> heads.
KNOWN_HEADS = {768: 12, 1024: 16, 1152: 16}
# The tensors whose shapes give the geometry of a source without a config file.
GEOMETRY_KEYS = (
    "vision_model.embeddings.patch_embedding.weight",
    "vision_model.embeddings.position_embedding.weight",
    "vision_model.encoder.layers.0.mlp.fc1.weight",
)
ROPE_TABLE_KEY = "vision_model.rope.cos_h"  # upstream's persistent RoPE table: (grid cells, head_dim / 2)


@dataclass
class TowerConfig:
    """What the plan needs to know about the tower, and where it came from."""

    config: Any  # SiglipNaViTConfig of the written (our-layout) model
    layers_stored: int  # encoder layers the source stores
    layers_config: Optional[int]  # encoder layers its config file says (None: no config file)
    where: str  # the config's origin, for messages
    notes: list[str] = field(default_factory=list)


def _navit_fields(src: Source, where: str) -> tuple[dict, bool]:
    """BAGEL's vit_config.json / our config.json, read as BAGEL reads it (from_json_file; from_pretrained would look
    for a config.json). It says rope=True (the default); BAGEL then runs rope=False, set by `tower_config`."""
    cls = configuration().SiglipNaViTConfig
    try:
        try:
            if src.config_loc is not None and src.config_loc.is_local:
                cfg = cls.from_json_file(src.config_loc.path)
            else:
                cfg = cls(**src.config_dict)
        except ValueError:
            if src.format != "bagel":
                raise
            cfg = cls(**{**src.config_dict, "rope": False})  # e.g. head_dim not divisible by 4
    except (TypeError, ValueError, RecursionError, OSError) as exc:
        raise config_error(where, exc) from None
    return {k: getattr(cfg, k) for k in CONFIG_FIELDS}, bool(cfg.rope)


def config_error(where: str, exc: BaseException) -> ConversionError:
    """One paragraph for a config that cannot describe a tower: the file, then the config's own words (which name
    the field, e.g. "SiglipNaViTConfig: `hidden_size` must be in [1, 65536], got -3")."""
    if isinstance(exc, RecursionError):
        detail = "its JSON is nested too deeply"
    else:
        detail = " ".join(str(exc).split())[:400].rstrip(".") or type(exc).__name__
    return ConversionError(
        f"the tower's config from {where} is invalid: {detail}. Fix that file (or pass the right one with --config); "
        "nothing was built or written."
    )


def config_fields(src: Source) -> tuple[dict, Optional[int], Optional[bool], str]:
    """Tower fields of the source's config: (fields, layers in the config, rope flag, where they came from)."""
    d = src.config_dict
    if d is None:
        return {}, None, None, ""
    where = src.config_loc.display if src.config_loc else "config"
    if src.format in ("bagel", "siglip-navit"):
        fields, rope = _navit_fields(src, where)
        return fields, fields["num_hidden_layers"], rope, where
    vision = d.get("vision_config") if isinstance(d.get("vision_config"), dict) else d
    if d.get("model_type") == "siglip" and "vision_config" not in d:
        vision = {}  # a full SiglipModel config with every vision field at its default
    fields = {k: vision[k] for k in CONFIG_FIELDS if k in vision}
    layers = fields.get("num_hidden_layers")
    if layers is not None and (not isinstance(layers, int) or isinstance(layers, bool)):
        raise config_error(where, ValueError(f"SiglipNaViTConfig: `num_hidden_layers` must be an int, got {layers!r}"))
    return fields, layers, None, where


def infer_fields(shapes: dict[str, tuple], layers: int) -> dict:
    """Tower geometry from tensor shapes alone (for a source without any config file)."""
    pw, pos, fc1 = (shapes.get(k) for k in GEOMETRY_KEYS)
    pos = pos or shapes.get(ROPE_TABLE_KEY)  # rope=True: the stored RoPE tables have one row per grid cell too
    if pw is None or pos is None or fc1 is None:
        raise ConversionError(
            "no config file was found beside the source and the geometry cannot be inferred from its tensors; pass "
            "--config (BAGEL: vit_config.json, SigLIP: config.json)."
        )
    hidden = pw[0]
    if len(pw) == 4:
        channels, patch, flat = pw[1], pw[2], pw[1] * pw[2] * pw[3]
    else:
        channels, flat = 3, pw[1]
        patch = int(round((pw[1] / channels) ** 0.5))
    side = int(round(pos[0] ** 0.5))
    heads = KNOWN_HEADS.get(hidden)
    if heads is None or side * side != pos[0] or patch * patch * channels != flat:
        raise ConversionError(
            f"no config file was found beside the source and hidden size {hidden} is not a known SigLIP geometry "
            "(the number of attention heads cannot be read from the tensors); pass --config."
        )
    return dict(
        hidden_size=hidden, intermediate_size=fc1[0], num_hidden_layers=layers, num_attention_heads=heads,
        num_channels=channels, image_size=side * patch, patch_size=patch,
    )  # fmt: skip


def check_layer_count(src: Source, layer_ids: list[int], layers_config: Optional[int], where: str) -> list[str]:
    """The config's num_hidden_layers must match the stored layers (BAGEL: or one more). Returns notes."""
    stored = layer_ids[-1] + 1
    if layers_config is None or stored == layers_config:
        return []
    if src.format == "bagel" and stored == layers_config - 1:
        return [
            f"{where} says {layers_config} layers and the checkpoint stores {stored}: BAGEL runs the tower with "
            "num_hidden_layers - 1 and never stored the last layer."
        ]
    if src.format == "bagel":
        raise ConversionError(
            f"layer count mismatch: {where} says num_hidden_layers = {layers_config}, so a BAGEL checkpoint should "
            f"store {layers_config - 1} layers (BAGEL drops the last one) or {layers_config}, but {src.loc.display} "
            f"stores {stored} (layers {layer_ids[0]}..{layer_ids[-1]}). The config and the weights do not belong "
            "together; pass the matching --config."
        )
    raise ConversionError(
        f"layer count mismatch: {where} says num_hidden_layers = {layers_config} but {src.loc.display} stores "
        f"{stored} layers. The config and the weights do not belong together; pass the matching --config."
    )


def _fit_image_size(fields: dict) -> list[str]:
    """An image_size that is not a multiple of the patch: the tower sees the whole patches only. Returns notes."""
    patch, image = fields.get("patch_size", 16), fields.get("image_size", 224)
    if not (isinstance(image, int) and isinstance(patch, int) and image > 0 and patch > 0 and image % patch):
        return []
    fixed = (image // patch) * patch
    fields["image_size"] = fixed
    return [
        f"image_size {image} is not a multiple of patch_size {patch}: the tower sees a {image // patch}x"
        f"{image // patch} patch grid, i.e. {fixed} px (stock SigLIP drops the remaining pixels); config.json says "
        f"image_size {fixed}."
    ]


POSITION_KEY = "vision_model.embeddings.position_embedding.weight"


def resolve_rope(src: Source, option: str, config_rope: Optional[bool], position_table: bool,
                 rope_tables: bool, where: str) -> tuple[bool, list[str]]:
    """rope of the written tower, from the KEYS: a stored position table means rope=False, none means rope=True
    (BAGEL trained with `--vit_rope True` stores the RoPE tables instead, which are dropped). `option` (--rope)
    may only confirm what the keys say. Stock SigLIP is always rope=False. Returns (rope, notes)."""  # fmt: skip
    table = f"a learned position table ({source_name(src, POSITION_KEY)})"
    if src.format == "siglip":
        if option == "true":
            raise ConversionError(f"--rope true, but {src.loc.display} is a stock SigLIP checkpoint, which always "
                                  "uses a learned position table (rope=False); drop --rope.")  # fmt: skip
        return False, []
    detected = not position_table
    stored = table if position_table else "no position table" + (" but the RoPE tables" if rope_tables else "")
    if option in ("true", "false") and (option == "true") != detected:
        trained = "without RoPE (rope=False)" if position_table else "with RoPE (BAGEL: --vit_rope True)"
        raise ConversionError(f"--rope {option}, but {src.loc.display} stores {stored}: it was trained {trained}. "
                              "Use --rope auto (the default) to convert it as it was trained.")  # fmt: skip
    if option == "auto" and src.format == "siglip-navit" and config_rope is not None and config_rope != detected:
        raise ConversionError(f"{where} says rope={config_rope}, but {src.loc.display} stores {stored} (rope="
                              f"{detected}): the config and the weights do not belong together.")  # fmt: skip
    notes = []
    if detected and src.format == "bagel":
        notes.append(f"{src.loc.display} stores {stored}: a BAGEL ViT trained with --vit_rope True, converted with "
                     "rope=True (the stored RoPE tables are not written: the model recomputes them).")  # fmt: skip
    return detected, notes


def source_name(src: Source, ours: str) -> str:
    """Our key as the source spells it (BAGEL: with its prefix), for messages."""
    prefix = next((k[: -len(ours)] for k in src.keys if k.endswith(ours)), "")
    return prefix + ours


@dataclass(frozen=True)
class StoredFacts:
    """What the source's keys say about the tower (read from the header before anything is built)."""

    layer_ids: list[int]  # the stored encoder layers: exactly 0..n-1 (the plan checked)
    position_table: bool  # vision_model.embeddings.position_embedding.weight is stored
    rope_tables: bool  # upstream's persistent vision_model.rope.{cos,sin}_{h,w} are stored


def _check_activation(fields: dict, where: str) -> None:
    from transformers.activations import ACT2FN

    act = fields.get("hidden_act", "gelu_pytorch_tanh")
    if not isinstance(act, str) or act not in ACT2FN:
        shown = repr(act)[:80]
        raise config_error(where, ValueError(f"`hidden_act` must name an activation transformers knows, got {shown}"))


def _build_config(fields: dict, rope: bool, where: str, to: str) -> Any:
    _check_activation(fields, where)
    try:
        config = configuration().SiglipNaViTConfig(**fields, rope=rope)
    except (TypeError, ValueError, OverflowError) as exc:
        raise config_error(where, exc) from None
    if to == "stock-siglip" and config.rope:
        raise ConversionError(
            "--to stock-siglip needs a rope=False model: stock SigLIP has a learned position table and no rotary "
            "embeddings, so a rope=True tower has no stock equivalent. Export a rope=False checkpoint instead."
        )
    return config


def tower_config(src: Source, facts: StoredFacts, shapes: Callable[[], dict[str, tuple]], keep: Optional[int],
                 to: str, rope: str = "auto") -> TowerConfig:
    """The written model's config. `facts`: what the keys say; `shapes()`: our key -> shape of GEOMETRY_KEYS
    (called only without a config file); `keep`: --num-hidden-layers; `to`: the output layout; `rope`: --rope."""
    layer_ids = facts.layer_ids
    stored = layer_ids[-1] + 1
    fields, layers_config, src_rope, where = config_fields(src)
    notes = check_layer_count(src, layer_ids, layers_config, where)
    keep = stored if keep is None else keep
    if not 1 <= keep <= stored:
        raise ConversionError(
            f"--num-hidden-layers {keep} is out of range: the source stores {stored} layers (choose 1..{stored})."
        )
    use_rope, rope_notes = resolve_rope(src, rope, src_rope, facts.position_table, facts.rope_tables, where)
    if src.config_dict is None:
        fields = infer_fields(shapes(), stored)
        notes.append(
            "no config file was found beside the source: geometry inferred from the tensor shapes "
            f"({fields['num_attention_heads']} heads assumed for hidden size {fields['hidden_size']})."
        )
        where = "tensor shapes"
    fields = {**fields, "num_hidden_layers": keep}
    notes += rope_notes + _fit_image_size(fields)
    config = _build_config(fields, use_rope, where, to)
    return TowerConfig(config, stored, layers_config, where, notes)
