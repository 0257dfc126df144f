# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Writing a plan: stream the kept tensors from the source, convert them, write and hash the shards, verify.

Owns the one pass over the source (each run of contiguous tensors read once, in chunks of bounded size), the
per-tensor conversion (NaN / overflow checks, Conv2d <-> Linear, cast), the shard files + index, the side files
(config, processor config, model card, remote code) and the read-back verification. Writes only into the directory
it is given (a temporary one: the caller renames it into place); must not decide what is kept (that is the plan).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Iterator

import torch

from ..io import atomic
from ..io.files import read_regular_text
from ..io.safetensors import SafetensorsFile, SafetensorsWriter, VerificationError, verify_file
from ..repo_code import HUB_CODE_FILES, REPO_ROOT, modeling
from . import hub
from .options import ConversionError, ConvertOptions
from .plan import DTYPE_NAMES, Item, Plan
from .sources import PickleFile

INDEX_FILE = "model.safetensors.index.json"
SIDE_FILES = ("config.json", "preprocessor_config.json", "README.md")


Pieces = Iterator[torch.Tensor]


def _tensor_from_buffer(buf: bytearray, offset: int, item: Item) -> torch.Tensor:
    info = item.entry.info
    if info.numel == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    if offset % info.dtype.itemsize:  # keep the storage aligned for the element type
        buf, offset = bytearray(memoryview(buf)[offset : offset + info.nbytes]), 0
    return torch.frombuffer(buf, dtype=info.dtype, count=info.numel, offset=offset).reshape(info.shape)


def piece_bounds(item: Item, chunk_bytes: int) -> Iterator[tuple[int, int, tuple[int, ...]]]:
    """(first element, end element, shape) of each piece of a tensor read in pieces of at most `chunk_bytes` (at
    least one element, or one row). A re-laid-out tensor (the patch embedding) is cut into whole rows: each row of
    the output depends only on the same row of the input, so the transform works piece by piece."""
    info = item.entry.info
    itemsize = info.dtype.itemsize
    if item.transform and info.shape and info.shape[0] > 0:
        row = info.numel // info.shape[0]
        step = max(1, chunk_bytes // max(1, row * itemsize))
        for r in range(0, info.shape[0], step):
            end = min(info.shape[0], r + step)
            yield r * row, end * row, (end - r, *info.shape[1:])
        return
    step = max(1, chunk_bytes // itemsize)
    for a in range(0, info.numel, step):
        b = min(info.numel, a + step)
        yield a, b, (b - a,)


def _read_pieces(item: Item, chunk_bytes: int) -> Pieces:
    """One tensor larger than the read chunk, read (and later hashed and written) piece by piece: peak memory is
    about one chunk, whatever the tensor's size."""
    entry = item.entry
    itemsize = entry.info.dtype.itemsize
    for a, b, shape in piece_bounds(item, chunk_bytes):
        if isinstance(entry.file, PickleFile):  # already in (mapped) memory: views, no copy
            yield entry.file.state_dict[entry.info.key].reshape(-1)[a:b].reshape(shape)
            continue
        buf = entry.file.reader.read(entry.info.start + a * itemsize, (b - a) * itemsize)
        yield torch.frombuffer(buf, dtype=entry.info.dtype, count=b - a).reshape(shape)


def _read_group(group: list[Item]) -> Iterator[tuple[Item, Pieces]]:
    """The tensors of one run of contiguous items (at most one chunk in all), from one read: one piece each."""
    first = group[0].entry
    if isinstance(first.file, PickleFile):
        for it in group:
            yield it, iter([first.file.state_dict[it.entry.info.key]])
        return
    start = first.info.start
    buf = first.file.reader.read(start, group[-1].entry.info.end - start)
    for it in group:
        yield it, iter([_tensor_from_buffer(buf, it.entry.info.start - start, it)])


def iter_source_tensors(plan: Plan, chunk_bytes: int) -> Iterator[tuple[Item, Pieces]]:
    """Yield (item, its source tensor as consecutive pieces) in plan order; no single read exceeds `chunk_bytes`.
    Runs of contiguous small tensors are read together; a tensor above the chunk is read in pieces (consume them
    before the next item). (fsspec's block caches would read ahead into tensors nobody wants; this reads exactly
    the kept ranges, once.)"""
    group: list[Item] = []
    for item in plan.items:
        e, last = item.entry, group[-1].entry if group else None
        if (
            last is not None
            and isinstance(e.file, SafetensorsFile)
            and e.file is last.file
            and e.info.start == last.info.end
            and e.info.end - group[0].entry.info.start <= chunk_bytes
        ):
            group.append(item)
            continue
        if group:
            yield from _read_group(group)
            group = []
        if e.info.nbytes > chunk_bytes:
            yield item, _read_pieces(item, chunk_bytes)
        else:
            group = [item]
    if group:
        yield from _read_group(group)


def _all_finite(tensor: torch.Tensor) -> bool:
    """NaN / inf anywhere makes the sum non-finite (a 5x cheaper test than isfinite().all() on bf16); a sum that
    overflows from finite values alone is settled by the exact test."""
    if tensor.numel() == 0:
        return True
    narrow = tensor.dtype == torch.float16 or tensor.dtype.itemsize == 1  # fp8 has no sum/isfinite kernels of its own
    total = tensor.sum(dtype=torch.float32) if narrow else tensor.sum()
    return bool(torch.isfinite(total)) or bool(torch.isfinite(tensor.float() if narrow else tensor).all())


def convert_tensor(item: Item, tensor: torch.Tensor, config) -> torch.Tensor:
    """One source tensor (or a piece of one: rows for a re-laid-out tensor) as it is written: checked for NaN / inf,
    re-laid-out, cast (overflow checked)."""
    if tensor.is_floating_point() and not _all_finite(tensor):
        raise ConversionError(
            f"source tensor {item.entry.info.key!r} contains NaN or infinite values: the source file is corrupt "
            "(or not a trained checkpoint). Nothing was written to the target."
        )
    if item.transform == "conv2d_to_linear":
        tensor = modeling().conv2d_weight_to_linear(tensor)
    elif item.transform == "linear_to_conv2d":
        tensor = modeling().linear_weight_to_conv2d(tensor, config.num_channels, config.patch_size)
    if tensor.dtype != item.out_dtype:
        tensor = tensor.to(item.out_dtype)
        if not _all_finite(tensor):
            raise ConversionError(
                f"casting {item.entry.info.key!r} to {DTYPE_NAMES.get(item.out_dtype, item.out_dtype)} overflows "
                "(values out of range become inf); choose another --dtype."
            )
    return tensor.contiguous()


def write_weights(plan: Plan, outdir: Path, chunk_bytes: int, progress: bool) -> None:
    """The shard files (and the index when there are several), each tensor hashed into `item.sha256`."""
    from tqdm.auto import tqdm

    stream = iter_source_tensors(plan, chunk_bytes)
    bar = tqdm(
        total=plan.total_out_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="converting",
        disable=None if progress else True, file=sys.stderr,
    )  # fmt: skip
    try:
        for shard, fname in enumerate(plan.shard_files):
            items = plan.shard_items(shard)
            with SafetensorsWriter(outdir / fname, [it.spec for it in items]) as writer:
                for it in items:
                    got, pieces = next(stream)
                    assert got is it, "read order and write order diverged"
                    converted = (convert_tensor(it, piece, plan.config) for piece in pieces)
                    it.sha256 = writer.write_pieces(it.out_key, converted)
                    bar.update(it.nbytes)
    finally:
        bar.close()
    if len(plan.shard_files) > 1:
        with atomic.target_errors(outdir / INDEX_FILE):
            (outdir / INDEX_FILE).write_text(json.dumps(_index(plan), indent=2) + "\n")


def _index(plan: Plan) -> dict:
    weight_map = {it.out_key: plan.shard_files[it.shard] for it in sorted(plan.items, key=lambda i: i.out_key)}
    return {"metadata": {"total_size": plan.total_out_bytes}, "weight_map": weight_map}


def verify_output(plan: Plan, outdir: Path, chunk_bytes: int) -> None:
    """Re-read what was written: safetensors headers (our parser and the reference one) and every tensor's hash."""
    try:
        for shard, fname in enumerate(plan.shard_files):
            expected = {it.out_key: (it.spec, it.sha256) for it in plan.shard_items(shard)}
            verify_file(outdir / fname, expected, chunk_bytes)
    except VerificationError as exc:
        raise ConversionError(f"{exc} Nothing was written to the target.") from exc
    if len(plan.shard_files) > 1:
        index = json.loads(read_regular_text(outdir / INDEX_FILE))
        if index["weight_map"] != _index(plan)["weight_map"]:
            raise ConversionError("verification failed: model.safetensors.index.json does not match the shards.")


def write_side_files(plan: Plan, outdir: Path, options: ConvertOptions) -> list[str]:
    """config.json, preprocessor_config.json, README.md and (our layout) the remote-code files, the pipeline and
    handler.py; returns their names."""
    written = []
    if plan.to == "stock-siglip":
        config, processor = hub.stock_config_dict(plan), hub.stock_preprocessor_dict(plan.config)
    else:
        config, processor = hub.navit_config_dict(plan), hub.navit_preprocessor_dict(plan.config)
        for name in HUB_CODE_FILES:
            if not (REPO_ROOT / name).is_file():
                raise ConversionError(f"{REPO_ROOT / name} is missing: run the converter from a complete checkout.")
            shutil.copyfile(REPO_ROOT / name, outdir / name)
            written.append(name)
    (outdir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
    (outdir / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    (outdir / "README.md").write_text(hub.model_card(plan, options))
    return written + list(SIDE_FILES)


def output_file_list(plan: Plan) -> list[str]:
    files = list(plan.shard_files)
    if len(files) > 1:
        files.append(INDEX_FILE)
    files += list(SIDE_FILES)
    if plan.to != "stock-siglip":
        files += list(HUB_CODE_FILES)
    return files
