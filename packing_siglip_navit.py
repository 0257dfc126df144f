# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""The pack's forward arguments, checked and summarised once per forward for `modeling_siglip_navit.py`.

A pack is `packed_pixel_values` `(N, C*P*P)` plus its index tensors (`packed_flattened_position_ids`, `cu_seqlens`,
`max_seqlen`, optionally `image_grid_hw`). This file owns every check of them and the one host read of the segment
bounds: shapes, dtypes and devices are checked for free on every forward; the VALUES (cu_seqlens monotone and
ending at N, max_seqlen, the position-id range, the grid agreeing with cu_seqlens) only with `validate_inputs=True`,
because reading them costs one device->host sync. Every error names the argument and says what was expected.

Must not choose an attention kernel or run one (the modeling file does), nor compute pack geometry from images (the
image processor does). Imports only torch (remote code: copied into converted repos beside the model).
"""

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Union

import torch

# Index tensors may have any of these dtypes (widened to int64 once per forward). Not bool, floating point,
# complex, quantised or the sub-byte int1..int7 types (torch cannot even copy those).
INDEX_DTYPES = frozenset(
    getattr(torch, name)
    for name in ("uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64")
    if hasattr(torch, name)  # uint16/32/64 exist from torch 2.3
)

# `(start, length, count)`: `count` neighbouring images of `length` patches each, starting at patch `start`.
Run = tuple[int, int, int]


class PackIndices(NamedTuple):
    """A pack's index arguments as every layer uses them."""

    position_ids: torch.Tensor  # (N,) int64 on the pixels' device
    cu_seqlens: torch.Tensor  # (num_images + 1,) int32 on the pixels' device
    max_seqlen: int
    runs: Optional[list[Run]]  # host copy of the segments, as runs of equal-length neighbours (when asked for)


def is_index_dtype(dtype: torch.dtype) -> bool:
    """A whole-byte integer dtype, signed or unsigned."""
    return dtype in INDEX_DTYPES


def validated_patch_count(config: Any, packed_pixel_values: Any, model_weight: torch.Tensor) -> int:
    """The number of patches in `packed_pixel_values`, after the free checks (type, rank, dtype, shape, device)."""
    x = packed_pixel_values
    patch_dim = config.num_channels * config.patch_size**2
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`packed_pixel_values` must be a torch.Tensor, got {type(x).__name__}.")
    if x.dim() != 2 or x.shape[-1] != patch_dim:
        raise ValueError(
            f"`packed_pixel_values` must have shape (total_patches, num_channels * patch_size**2) = (N, {patch_dim}) "
            f"(patches already flattened, channel fastest); got shape {tuple(x.shape)}."
        )
    if not x.is_floating_point():
        raise TypeError(
            f"`packed_pixel_values` must be a floating-point tensor (normalised pixels), got dtype {x.dtype}."
        )
    if x.shape[0] == 0:
        raise ValueError("`packed_pixel_values` is an empty pack (0 patches): pass at least one image.")
    if model_weight.device.type != "meta" and x.device != model_weight.device:
        raise ValueError(
            f"`packed_pixel_values` is on {x.device} but the model is on {model_weight.device}: "
            "move the inputs first (e.g. `inputs.to(model.device)`)."
        )
    return x.shape[0]


def _as_index_tensor(name: str, value: Any, ndim: int, device: torch.device) -> torch.Tensor:
    """An integer index tensor of rank `ndim`, widened to int64 on `device` (once per forward)."""
    # Any integer dtype is accepted: torch indexes only with int64/int32 (uint8 would even act as a boolean mask),
    # and no id of a valid pack needs more than 63 bits.
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of integers, got {type(value).__name__}.")
    if value.dim() != ndim or not is_index_dtype(value.dtype):
        raise TypeError(
            f"`{name}` must be a {ndim}-D integer tensor, got a {value.dim()}-D tensor of dtype {value.dtype}."
        )
    return value.to(device=device, dtype=torch.int64)


def _check_max_seqlen_type(max_seqlen: Any) -> None:
    if isinstance(max_seqlen, torch.Tensor):
        if max_seqlen.numel() != 1 or not is_index_dtype(max_seqlen.dtype):
            raise TypeError(
                f"`max_seqlen` must be an int or a 0-d integer tensor, got a tensor of shape "
                f"{tuple(max_seqlen.shape)} and dtype {max_seqlen.dtype}."
            )
    elif not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool):
        raise TypeError(f"`max_seqlen` must be an int or a 0-d integer tensor, got {type(max_seqlen).__name__}.")


def validated_index_tensors(
    total: int, position_ids: Any, cu_seqlens: Any, max_seqlen: Any, image_grid_hw: Any, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Position ids, cu_seqlens and the grid as int64 on `device`, after the free checks of their types and shapes."""
    position_ids = _as_index_tensor("packed_flattened_position_ids", position_ids, 1, device)
    if position_ids.shape[0] != total:
        raise ValueError(
            f"`packed_flattened_position_ids` must hold one id per patch: got {position_ids.shape[0]} ids "
            f"for {total} patches."
        )
    cu = _as_index_tensor("cu_seqlens", cu_seqlens, 1, device)
    if cu.shape[0] < 2:
        raise ValueError(f"`cu_seqlens` must be [0, n1, n1+n2, ...] with at least 2 entries, got {cu.tolist()}.")
    num_images = cu.shape[0] - 1
    _check_max_seqlen_type(max_seqlen)
    if image_grid_hw is not None:
        image_grid_hw = _as_index_tensor("image_grid_hw", image_grid_hw, 2, device)
        if image_grid_hw.shape != (num_images, 2):
            raise ValueError(
                f"`image_grid_hw` must have shape (num_images, 2) = ({num_images}, 2) to match cu_seqlens, "
                f"got {tuple(image_grid_hw.shape)}."
            )
    return position_ids, cu, image_grid_hw


@dataclass
class _HostValues:
    """The index values the checks and the per-image kernels need, read in ONE device->host transfer."""

    bounds: list[int]  # cu_seqlens
    lengths: list[int]  # patches per image
    max_seqlen: Optional[int] = None  # only when validating
    position_range: Optional[tuple[int, int]] = None  # (min, max) of the position ids, only when validating
    grid: Optional[list[tuple[int, int]]] = None  # image_grid_hw rows, only when validating and given


def _read_host_values(cu, position_ids, max_seqlen, image_grid_hw, validate_inputs: bool) -> _HostValues:
    parts = [cu]
    if validate_inputs:
        parts.append(torch.stack(torch.aminmax(position_ids)))
        if isinstance(max_seqlen, torch.Tensor):
            parts.append(max_seqlen.reshape(1).to(device=cu.device, dtype=torch.int64))
        if image_grid_hw is not None:
            parts.append(image_grid_hw.reshape(-1))
    host = torch.cat(parts).tolist()
    num_images = cu.shape[0] - 1
    bounds, host = host[: num_images + 1], host[num_images + 1 :]
    values = _HostValues(bounds, [end - start for start, end in zip(bounds[:-1], bounds[1:])])
    if validate_inputs:
        values.position_range, host = (host[0], host[1]), host[2:]
        values.max_seqlen = max_seqlen
        if isinstance(max_seqlen, torch.Tensor):
            values.max_seqlen, host = host[0], host[1:]
        if image_grid_hw is not None:
            values.grid = list(zip(host[0::2], host[1::2]))
    return values


def _check_segments(values: _HostValues, total: int) -> None:
    """cu_seqlens starts at 0, grows, has no empty image and ends at `total`; max_seqlen covers the longest image."""
    bounds, lengths = values.bounds, values.lengths
    if bounds[0] != 0:
        raise ValueError(f"`cu_seqlens` must start at 0, got {bounds[:8]}...")
    if any(n < 0 for n in lengths):
        raise ValueError(f"`cu_seqlens` must be non-decreasing (cumulative patch counts), got {bounds}.")
    if any(n == 0 for n in lengths):
        raise ValueError(f"`cu_seqlens` has an empty image (two equal entries), got {bounds}.")
    if bounds[-1] != total:
        raise ValueError(
            f"`cu_seqlens` must end at the number of patches ({total}), got {bounds[-1]} (cu_seqlens = {bounds})."
        )
    if values.max_seqlen < max(lengths):
        raise ValueError(
            f"`max_seqlen` ({values.max_seqlen}) is below the longest image in the pack ({max(lengths)} patches)."
        )


def _check_positions_and_grid(config: Any, values: _HostValues) -> None:
    """Position ids inside the model's grid; each `image_grid_hw` row agrees with cu_seqlens and fits the grid."""
    side = config.num_patches_per_side
    num_positions = side**2
    pos_min, pos_max = values.position_range
    if pos_min < 0 or pos_max >= num_positions:
        raise ValueError(
            f"`packed_flattened_position_ids` must lie in [0, {num_positions}) "
            f"((image_size // patch_size)**2 grid cells), got values in [{pos_min}, {pos_max}]."
        )
    for i, ((h, w), n) in enumerate(zip(values.grid or [], values.lengths)):
        if h * w != n:
            raise ValueError(
                f"`image_grid_hw[{i}]` = ({h}, {w}) gives {h * w} patches but cu_seqlens gives image {i} {n} patches."
            )
        if not (1 <= h <= side and 1 <= w <= side):
            raise ValueError(
                f"`image_grid_hw[{i}]` = ({h}, {w}) is outside the model's {side}x{side} patch grid "
                f"(image_size // patch_size per side)."
            )


def runs_of_equal_lengths(bounds: list[int], lengths: list[int]) -> list[Run]:
    """`(start, length, count)`: neighbouring images of equal length merged into one run."""
    runs = []
    for start, length in zip(bounds[:-1], lengths):
        if runs and runs[-1][1] == length:
            runs[-1] = (runs[-1][0], length, runs[-1][2] + 1)
        else:
            runs.append((start, length, 1))
    return runs


def pack_indices(
    config: Any,
    total: int,
    packed_flattened_position_ids: Any,
    cu_seqlens: Any,
    max_seqlen: Union[int, torch.Tensor],
    image_grid_hw: Optional[torch.Tensor],
    device: torch.device,
    need_runs: bool,
    validate_inputs: bool,
) -> PackIndices:
    """The checked `PackIndices` of a pack of `total` patches.

    Types and shapes are always checked (free). The values are read on the host in ONE transfer, only when they
    are validated (`validate_inputs`) or when the kernel needs the segments on the host (`need_runs`: the
    per-image kernels). Without either, nothing syncs unless `max_seqlen` is a tensor (the varlen kernels take a
    host int).
    """
    position_ids, cu, image_grid_hw = validated_index_tensors(
        total, packed_flattened_position_ids, cu_seqlens, max_seqlen, image_grid_hw, device
    )
    if not (validate_inputs or need_runs):
        return PackIndices(position_ids, cu.to(torch.int32), int(max_seqlen), None)
    values = _read_host_values(cu, position_ids, max_seqlen, image_grid_hw, validate_inputs)
    if validate_inputs:
        _check_segments(values, total)
        _check_positions_and_grid(config, values)
        max_seqlen = values.max_seqlen
    runs = runs_of_equal_lengths(values.bounds, values.lengths) if need_runs else None
    return PackIndices(position_ids, cu.to(torch.int32), int(max_seqlen), runs)


__all__ = [
    "INDEX_DTYPES",
    "PackIndices",
    "is_index_dtype",
    "pack_indices",
    "runs_of_equal_lengths",
    "validated_index_tensors",
    "validated_patch_count",
]
