# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""The plan: every tensor that will be written, from which source tensor, re-laid-out and cast how, in which shard.

Owns `build_plan(source, options)`, in small steps: map the keys, read the tower's config, ask the model (built on
the meta device: no memory) which keys and shapes it expects, classify every source key (kept / dropped /
unexpected / missing / mis-shaped: all reported at once, before anything is written), then order and shard. Reads
headers only: no tensor data, and nothing is written here.
"""

from __future__ import annotations

import copy
import math
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..io.safetensors import TensorSpec
from ..repo_code import modeling
from .config import GEOMETRY_KEYS, POSITION_KEY, ROPE_TABLE_KEY, StoredFacts, config_error, tower_config
from .keymap import LAYER_RE, MAX_LAYER_DIGITS, ROPE_DROP, KeyLayout, layer_index, map_key, source_key
from .options import DTYPES, ConversionError, ConvertOptions, parse_size
from .sources import Source, TensorEntry, open_entries

PATCH_KEY = "vision_model.embeddings.patch_embedding.weight"
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32", torch.float64: "float64"}
SHARD_PATTERN = "model{suffix}.safetensors"  # model.safetensors, or model-00001-of-00003.safetensors, ...
LISTED = 25  # keys listed per kind in a mismatch report


@dataclass
class Item:
    """One written tensor."""

    out_key: str
    entry: TensorEntry  # the source tensor
    transform: Optional[str]  # "conv2d_to_linear" | "linear_to_conv2d" | None
    out_shape: tuple[int, ...]
    out_dtype: torch.dtype
    shard: int = 0
    sha256: Optional[str] = None  # set when written

    @property
    def nbytes(self) -> int:
        return math.prod(self.out_shape) * self.out_dtype.itemsize

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.out_key, self.out_dtype, tuple(self.out_shape))


@dataclass
class Plan:
    source: Source
    to: str  # "siglip-navit" | "stock-siglip"
    config: Any  # SiglipNaViTConfig of the (our-layout) model
    items: list[Item]  # in source read order (file, then offset): the write order too
    dropped: "OrderedDict[str, list[str]]"  # reason -> source keys not written
    notes: list[str]
    layers_stored: int
    layers_config: Optional[int]
    dtype_name: str
    shard_files: list[str] = field(default_factory=list)

    @property
    def total_out_bytes(self) -> int:
        return sum(i.nbytes for i in self.items)

    @property
    def total_read_bytes(self) -> int:
        return sum(i.entry.info.nbytes for i in self.items)

    def shard_items(self, shard: int) -> list[Item]:
        return [it for it in self.items if it.shard == shard]


def _layout(src: Source, options: ConvertOptions) -> KeyLayout:
    unprefixed = src.format == "siglip" and not any(k.startswith("vision_model.") for k in src.keys)
    return KeyLayout(src.format, options.vit_prefix, unprefixed)


def _rename(src: Source, layout: KeyLayout) -> dict[str, str]:
    """Source key -> our key for every tensor the layout keeps (before any layer cut)."""
    ours: dict[str, str] = {}
    seen: set[str] = set()
    for key in src.keys:
        mapped = map_key(key, layout).key
        if mapped is None:
            continue
        if mapped in seen:
            raise ConversionError(f"two source tensors map to {mapped!r} (one of them is {key!r}).")
        seen.add(mapped)
        ours[key] = mapped
    return ours


def check_layer_indices(src: Source, ours: dict[str, str]) -> list[int]:
    """The stored encoder layers, which must be exactly 0..n-1 (n distinct indices, written canonically): checked
    from the key names alone, in time linear in the number of stored tensors, BEFORE any config is trusted or
    anything is built, so a crafted `encoder.layers.99999999.*` costs nothing. Refusals name the key."""
    first_key: dict[int, str] = {}
    for key, mapped in ours.items():
        index = layer_index(mapped)
        if index is None:
            continue
        digits = LAYER_RE.match(mapped).group(1)
        if str(index) != digits:
            raise ConversionError(
                f"{src.loc.display}: tensor {key[:200]!r} names encoder layer {digits[:20]!r}"
                f"{'...' if len(digits) > 20 else ''}, which is not a plain layer index (no leading zeros, at most "
                f"{MAX_LAYER_DIGITS} digits); nothing was built or written."
            )
        first_key.setdefault(index, key)
    if not first_key:
        raise ConversionError(f"{src.loc.display} has no encoder layers (no ...encoder.layers.N.* tensors).")
    count = len(first_key)
    beyond = [i for i in first_key if i >= count]  # with n distinct indices, any index >= n means a gap
    if beyond:
        worst = max(beyond)
        gaps, i = [], 0
        while len(gaps) < 5 and i < worst:  # at most count + 5 steps, whatever `worst` is
            gaps += [i] * (i not in first_key)
            i += 1
        more = worst - sum(1 for j in first_key if j < worst) > len(gaps)
        raise ConversionError(
            f"{src.loc.display}: tensor {first_key[worst][:200]!r} names encoder layer {worst}, but only {count} "
            f"distinct layers are stored, so the layers are not 0..{count - 1} (missing: "
            f"{', '.join(map(str, gaps))}{', ...' if more else ''}). A checkpoint stores its layers "
            "without gaps; nothing was built or written."
        )
    return list(range(count))


def _stored_facts(src: Source, layout: KeyLayout, ours: dict[str, str]) -> tuple[StoredFacts, list[str]]:
    """What the keys say (layers, position table, RoPE tables), and the source keys of the stored RoPE tables."""
    rope_keys = [k for k in src.keys if map_key(k, layout).reason == ROPE_DROP]
    position = POSITION_KEY in ours.values()
    return StoredFacts(check_layer_indices(src, ours), position, bool(rope_keys)), rope_keys


def _geometry_shapes(src: Source, ours: dict[str, str], rope_keys: list[str]) -> dict[str, tuple]:
    """Our key -> shape of the tensors the geometry is inferred from (headers only)."""
    needed = [k for k, c in ours.items() if c in GEOMETRY_KEYS]
    rope = [k for k in rope_keys if k.endswith(ROPE_TABLE_KEY)]
    open_entries(src, needed + rope[:1])
    shapes = {ours[k]: src.entries[k].info.shape for k in needed}
    shapes.update({ROPE_TABLE_KEY: src.entries[k].info.shape for k in rope[:1]})
    return shapes


def expected_shapes(config: Any, where: str = "the config") -> dict[str, tuple]:
    """Our key -> shape, from the model itself built on the meta device (no memory) with ONE encoder layer, whose
    keys are repeated for every layer: the cost does not grow with the config's layer count."""
    one = copy.deepcopy(config)
    one.num_hidden_layers = 1
    try:
        with torch.device("meta"):
            model = modeling().SiglipVisionModel(one)
    except (ValueError, TypeError, KeyError, RuntimeError, OverflowError) as exc:  # e.g. an unknown hidden_act
        raise config_error(where, exc) from None
    shapes: dict[str, tuple] = {}
    layer0 = [(k, tuple(v.shape)) for k, v in model.state_dict().items() if layer_index(k) == 0]
    for key, value in model.state_dict().items():
        if layer_index(key) is None:
            shapes[key] = tuple(value.shape)
        elif key == layer0[0][0]:
            for n in range(config.num_hidden_layers):
                shapes.update((k.replace(".layers.0.", f".layers.{n}.", 1), shape) for k, shape in layer0)
    return shapes


def _classify(src, layout, keep, stored, expected) -> tuple[dict[str, str], OrderedDict, list[str]]:
    """(our key -> source key of the kept tensors, reason -> dropped source keys, unexpected source keys)."""
    kept: dict[str, str] = {}
    dropped: "OrderedDict[str, list[str]]" = OrderedDict()
    unexpected: list[str] = []
    for key in src.keys:
        ours, reason = map_key(key, layout, keep, stored)
        if ours is None:
            dropped.setdefault(reason, []).append(key)
        elif ours in expected:
            kept[ours] = key
        else:
            unexpected.append(key)
    return kept, dropped, unexpected


def _patch_layout(key: str, shape: tuple, expected: tuple, config: Any, to: str) -> tuple[Optional[str], tuple, str]:
    """(transform, written shape, problem) of the patch embedding: the source may store it as Conv2d or Linear."""
    conv = (config.hidden_size, config.num_channels, config.patch_size, config.patch_size)
    stock = to == "stock-siglip"
    if shape == conv:
        return (None if stock else "conv2d_to_linear"), (conv if stock else expected), ""
    if shape == expected:
        return ("linear_to_conv2d" if stock else None), (conv if stock else expected), ""
    return None, shape, f"{key}: {list(shape)}, expected {list(expected)} (Linear) or {list(conv)} (Conv2d)"


def _items(src, kept, expected, config, options) -> tuple[list[Item], list[str]]:
    """The written tensors, in the model's order, and the mis-shaped / non-float source tensors."""
    items: list[Item] = []
    problems: list[str] = []
    cast = DTYPES.get(options.dtype)
    for ours, shape in expected.items():
        key = kept.get(ours)
        if key is None:
            continue
        entry = src.entries[key]
        transform, out_shape, problem = None, shape, ""
        if ours == PATCH_KEY:
            transform, out_shape, problem = _patch_layout(key, entry.info.shape, shape, config, options.to)
        elif entry.info.shape != shape:
            problem = f"{key}: {list(entry.info.shape)}, expected {list(shape)}"
        if not problem and not entry.info.dtype.is_floating_point:
            problem = f"{key}: dtype {entry.info.dtype} is not floating point"
        if problem:
            problems.append(problem)
            continue
        items.append(Item(ours, entry, transform, out_shape, cast or entry.info.dtype))
    return items, problems


def _mismatch_error(src, layout, tower, missing, unexpected, misshaped) -> ConversionError:
    c = tower.config
    lines = [
        f"{src.loc.display} does not match the {c.num_hidden_layers}-layer tower described by {tower.where} "
        f"(hidden {c.hidden_size}, patch {c.patch_size}, image {c.image_size}, rope={c.rope}); nothing was written."
    ]
    for title, keys in (("missing", [source_key(k, layout) for k in missing]), ("unexpected", unexpected),
                        ("mis-shaped", misshaped)):  # fmt: skip
        if keys:
            lines.append(f"  {title} ({len(keys)}):")
            lines.extend(f"    - {k}" for k in keys[:LISTED])
            if len(keys) > LISTED:
                lines.append(f"    ... and {len(keys) - LISTED} more")
    return ConversionError("\n".join(lines))


def check_dtypes(items: list[Item], src: Source) -> None:
    """Every written tensor in a dtype the model is stored and run in (DTYPE_NAMES): an fp8 source needs --dtype,
    which casts it (at --dry-run too, before anything is written)."""
    bad = [it for it in items if it.out_dtype not in DTYPE_NAMES]
    if not bad:
        return
    kinds = sorted({str(it.out_dtype).replace("torch.", "") for it in bad})
    raise ConversionError(
        f"{src.loc.display}: {len(bad)} of the {len(items)} tensors to write are {' / '.join(kinds)} (e.g. "
        f"{bad[0].entry.info.key!r}), which SigLIP-NaViT is not stored in nor run with; pass --dtype bfloat16 (or "
        "float16 / float32) to cast them (a plain cast: an fp8 checkpoint with separate scale tensors is not "
        "supported). Nothing was written."
    )


def _dtype_name(items: list[Item], options: ConvertOptions, notes: list[str]) -> str:
    """The dtype config.json names: --dtype, else the patch embedding's (mixed source dtypes are noted)."""
    if options.dtype in DTYPES:
        return options.dtype
    kinds = Counter(DTYPE_NAMES.get(i.out_dtype, str(i.out_dtype)) for i in items)
    if len(kinds) > 1:
        notes.append(f"source tensors have mixed dtypes {dict(kinds)}; kept as they are (--dtype keep).")
    patch = next(i for i in items if i.out_key == PATCH_KEY)
    return DTYPE_NAMES.get(patch.entry.info.dtype, "float32")


def assign_shards(plan: Plan, max_shard: int) -> None:
    """Cut the items, in read order, into shards of at most `max_shard` bytes (a larger tensor gets one of its own).
    Not huggingface_hub's split_state_dict_into_shards_factory: it places a tensor above the limit in a shard
    BEFORE the one being filled, so around such a tensor its files differ from ours (e.g. 14 instead of 18 names
    at --max-shard-size 5KB) and no longer follow the read order the one-pass streaming write needs."""
    shard, used = 0, 0
    for item in plan.items:
        if used and used + item.nbytes > max_shard:
            shard, used = shard + 1, 0
        item.shard = shard
        used += item.nbytes
    count = shard + 1
    suffixes = [""] if count == 1 else [f"-{i + 1:05d}-of-{count:05d}" for i in range(count)]
    plan.shard_files = [SHARD_PATTERN.format(suffix=suffix) for suffix in suffixes]


def build_plan(src: Source, options: ConvertOptions) -> Plan:
    """Validate `src` against the tower it describes and plan every written tensor; raises ConversionError with
    every problem at once. Opens headers only."""
    layout = _layout(src, options)
    ours = _rename(src, layout)
    facts, rope_keys = _stored_facts(src, layout, ours)
    shapes = lambda: _geometry_shapes(src, ours, rope_keys)  # noqa: E731 - only without a config file
    tower = tower_config(src, facts, shapes, options.num_hidden_layers, options.to, options.rope)
    config = tower.config
    expected = expected_shapes(config, tower.where)
    kept, dropped, unexpected = _classify(src, layout, config.num_hidden_layers, tower.layers_stored, expected)
    open_entries(src, list(kept.values()))
    items, misshaped = _items(src, kept, expected, config, options)
    missing = [k for k in expected if k not in kept]
    if missing or unexpected or misshaped:
        raise _mismatch_error(src, layout, tower, missing, unexpected, misshaped)
    check_dtypes(items, src)
    notes = tower.notes
    dtype_name = _dtype_name(items, options, notes)
    file_order = {name: i for i, name in enumerate(src.files)}
    items.sort(key=lambda it: (file_order.get(it.entry.file.loc.display, 0), it.entry.info.start, it.out_key))
    plan = Plan(src, options.to, config, items, dropped, notes, tower.layers_stored, tower.layers_config, dtype_name)
    assign_shards(plan, parse_size(options.max_shard_size))
    return plan
