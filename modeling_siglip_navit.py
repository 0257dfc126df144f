# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""PyTorch SigLIP-NaViT: BAGEL's SigLIP vision tower over packed, variable-resolution patch sequences.

Many images of different sizes go through ONE forward call: their 14x14 patches are concatenated into a
`(total_patches, C*P*P)` tensor and `cu_seqlens` marks where each image starts, so attention never crosses
an image boundary and nothing is padded. Parameter paths match BAGEL's checkpoint (`vit_model.` prefix
stripped), so released weights load without key surgery.
"""

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutput
from transformers.modeling_utils import PreTrainedModel

from .configuration_siglip_navit import SiglipNaViTConfig, check_config

# Optional kernels: imported inside `try` so that remote-code loading never requires them.
try:
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

try:  # torch >= 2.10 on CUDA: flash-attention varlen kernel shipped with torch itself
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None


SUPPORTED_ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


def conv2d_weight_to_linear(weight: torch.Tensor) -> torch.Tensor:
    """Conv2d patch weight `(hidden, C, P, P)` -> Linear weight `(hidden, P*P*C)` (channel fastest)."""
    hidden = weight.shape[0]
    return weight.permute(0, 2, 3, 1).reshape(hidden, -1)


def linear_weight_to_conv2d(weight: torch.Tensor, num_channels: int, patch_size: int) -> torch.Tensor:
    """Exact inverse of `conv2d_weight_to_linear`: `(hidden, P*P*C)` -> `(hidden, C, P, P)`."""
    hidden = weight.shape[0]
    if weight.shape[1] != num_channels * patch_size * patch_size:
        raise ValueError(
            f"linear patch weight has {weight.shape[1]} input features, expected "
            f"num_channels * patch_size**2 = {num_channels * patch_size * patch_size}"
        )
    return weight.reshape(hidden, patch_size, patch_size, num_channels).permute(0, 3, 1, 2).contiguous()


_ROPE_TABLES = ("cos_h", "sin_h", "cos_w", "sin_w")


class RotaryEmbedding2D(nn.Module):
    """2D RoPE tables: one angle table for rows and one for columns of a (max_h x max_w) grid.

    `cos_h[p]` / `sin_h[p]` hold the row angles of grid cell p (row-major, p = row * max_w + col), `cos_w`
    / `sin_w` its column angles; each is `(max_h * max_w, dim)` with the usual `cat(freqs, freqs)` layout.
    The tables are non-persistent buffers (never in a checkpoint) and are recomputed by `_init_weights`,
    because transformers 5.x leaves non-persistent buffers uninitialised after a meta-device load. They stay
    float32 whatever the model's dtype (`model.to(torch.bfloat16)` moves them but does not cast them): the
    rotation runs in float32, as upstream's does.
    """

    def __init__(self, dim: int, max_h: int, max_w: int, base: float = 10000.0):
        super().__init__()
        self.dim = dim
        self.max_h = max_h
        self.max_w = max_w
        self.base = base
        for name, table in zip(_ROPE_TABLES, self._compute_tables()):
            self.register_buffer(name, table, persistent=False)

    def _compute_tables(self, device: Optional[torch.device] = None) -> tuple[torch.Tensor, ...]:
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float() / self.dim
        inv_freq = 1.0 / (self.base**exponents)
        grid_h = torch.arange(self.max_h, device=device, dtype=torch.float32)[:, None].expand(self.max_h, self.max_w)
        grid_w = torch.arange(self.max_w, device=device, dtype=torch.float32)[None, :].expand(self.max_h, self.max_w)
        tables = []
        for grid in (grid_h, grid_w):
            freqs = grid[..., None] * inv_freq  # (max_h, max_w, dim / 2)
            emb = torch.cat((freqs, freqs), dim=-1).flatten(0, 1)  # (max_h * max_w, dim), row-major cells
            tables += [emb.cos(), emb.sin()]
        cos_h, sin_h, cos_w, sin_w = tables
        return cos_h, sin_h, cos_w, sin_w

    @torch.no_grad()
    def reset_tables(self) -> None:
        """Recompute the tables (in float32, on their current device)."""
        if self.cos_h.device.type == "meta":
            return
        for name, table in zip(_ROPE_TABLES, self._compute_tables(self.cos_h.device)):
            if getattr(self, name).dtype == torch.float32:
                getattr(self, name).copy_(table)
            else:
                self._buffers[name] = table

    def _apply(self, fn, recurse: bool = True):
        # `module.to(dtype)` / `.half()` / `.bfloat16()` cast every floating buffer: keep the float32 tables
        # (moved to the new device) instead, so half-precision models still rotate with exact angles.
        before = {name: self._buffers[name] for name in _ROPE_TABLES}
        super()._apply(fn, recurse)
        for name, table in before.items():
            after = self._buffers[name]
            if after.dtype != torch.float32 and table.dtype == torch.float32:
                self._buffers[name] = table.to(device=after.device)
        return self

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gather `(cos_h, sin_h, cos_w, sin_w)`, each `(total_patches, dim)`, for flattened grid positions."""
        return self.cos_h[position_ids], self.sin_h[position_ids], self.cos_w[position_ids], self.sin_w[position_ids]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotates half the hidden dims of the input."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate packed `q`, `k` of shape `(total, heads, ...)` by per-token `cos`, `sin` of shape `(total, ...)`.

    The rotation runs in float32 (or wider, if q is wider) and each result is cast back to its input's dtype, as
    upstream BAGEL (bf16 q/k promoted by fp32 tables) and transformers' Qwen2-VL vision tower do.
    """
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    cos = cos.unsqueeze(1).to(compute_dtype)  # broadcast over heads; no-ops for fp32 tables and activations
    sin = sin.unsqueeze(1).to(compute_dtype)
    q_float, k_float = q.to(compute_dtype), k.to(compute_dtype)
    q_embed = (q_float * cos) + (rotate_half(q_float) * sin)
    k_embed = (k_float * cos) + (rotate_half(k_float) * sin)
    return q_embed.to(q.dtype), k_embed.to(k.dtype)


@dataclass
class PackedSequences:
    """Facts about one pack, computed once per forward and shared by every layer."""

    cu_seqlens: torch.Tensor  # (num_images + 1,) int32 on the activations' device
    max_seqlen: int
    # host copy of the segments for the per-image kernels, as runs of equal-length neighbours:
    # (start, length, count) = `count` images of `length` patches each, starting at patch `start`
    runs: Optional[list[tuple[int, int, int]]]
    kernel: str  # "eager" | "sdpa" | "varlen" | "flash_attention_2"


def check_attn_implementation(name: Optional[str], requested: Optional[str] = None, at_load: bool = False) -> None:
    """ValueError unless `name` is a backend we run (None: the default, sdpa). `requested`: what the user asked
    for, when transformers turned it into `name`. `at_load`: flash_attention_2 also needs flash-attn importable
    (its CUDA device is checked at the forward: the model may be moved there after loading)."""
    if not (name is None or (isinstance(name, str) and name in SUPPORTED_ATTN_IMPLEMENTATIONS)):
        via = f" (transformers chose it for {requested!r})" if requested not in (None, name) else ""
        raise ValueError(
            f"Unsupported attn_implementation {name!r}{via} for SigLIP-NaViT; supported: "
            f"{', '.join(repr(n) for n in SUPPORTED_ATTN_IMPLEMENTATIONS)}."
        )
    if at_load and name == "flash_attention_2" and flash_attn_varlen_func is None:
        raise ValueError(
            "attn_implementation='flash_attention_2' needs the `flash-attn` package (not importable here) and a "
            "CUDA device. Install flash-attn on a CUDA machine, or use attn_implementation='sdpa' (default) or 'eager'."
        )


def check_output_attentions(attn_implementation: Optional[str]) -> None:
    """`output_attentions=True` needs the eager kernel: sdpa and flash never materialise the probabilities."""
    if attn_implementation != "eager":
        raise ValueError(
            f"output_attentions=True needs attn_implementation='eager', but this model runs "
            f"{attn_implementation or 'sdpa'!r}, whose kernels never form the attention probabilities. Load it with "
            "`from_pretrained(..., attn_implementation=\"eager\")` (or from_config) to get the attention maps."
        )


def _flash_attn_available(device: torch.device) -> bool:
    """flash-attn is importable and the activations live on a CUDA device."""
    return flash_attn_varlen_func is not None and device.type == "cuda"


def select_attention_kernel(
    attn_implementation: Optional[str], device: torch.device, dtype: torch.dtype, dropout: float
) -> str:
    """The ONE place that turns `config._attn_implementation` into the kernel used by every layer.

    - `eager`: softmax(QK^T / sqrt(d)) V per image (the readable reference).
    - `sdpa` (default, also for `None`): torch's varlen flash kernel on CUDA in fp16/bf16 when the installed
      torch has it (and no attention dropout is active); otherwise SDPA once per image — never a
      `(total x total)` mask.
    - `flash_attention_2`: `flash_attn.flash_attn_varlen_func`; needs flash-attn and a CUDA device.
    """
    impl = "sdpa" if attn_implementation is None else attn_implementation
    if impl == "eager":
        return "eager"
    if impl == "sdpa":
        half_precision = dtype in (torch.float16, torch.bfloat16)
        if varlen_attn is not None and device.type == "cuda" and half_precision and dropout == 0.0:
            return "varlen"
        return "sdpa"
    if impl == "flash_attention_2":
        if not _flash_attn_available(device):
            raise ValueError(
                "attn_implementation='flash_attention_2' needs the `flash-attn` package and a CUDA device "
                f"(flash-attn importable: {flash_attn_varlen_func is not None}, device: {device}). "
                "Install flash-attn on a CUDA machine, or use attn_implementation='sdpa' (default) or 'eager'."
            )
        return "flash_attention_2"
    check_attn_implementation(impl)
    raise AssertionError(impl)  # unreachable: check_attn_implementation raised


def eager_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, dropout: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(QK^T * scale) V on `(..., n, head_dim)` inputs -> (output, probabilities `(..., n, n)`).

    As transformers' SigLIP `eager_attention_forward`: softmax in float32, cast back, dropout when `dropout > 0`
    (the returned probabilities are the ones used, after dropout).
    """
    weights = torch.matmul(query, key.transpose(-1, -2)) * scale
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=dropout > 0.0)
    return torch.matmul(weights, value), weights


def packed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    packed: PackedSequences,
    scale: float,
    dropout: float = 0.0,
    attention_maps: Optional[list[torch.Tensor]] = None,
) -> torch.Tensor:
    """Variable-length, non-causal attention over a pack. q/k/v and the result are `(total, heads, head_dim)`.

    `attention_maps` (eager kernel only): a list that receives each image's `(heads, n_i, n_i)` probabilities.
    """
    if packed.kernel == "flash_attention_2":
        # flash-attn runs in half precision only: like upstream BAGEL, fp32 activations go through bf16.
        kernel_dtype = query.dtype if query.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        out = flash_attn_varlen_func(
            query.to(kernel_dtype),
            key.to(kernel_dtype),
            value.to(kernel_dtype),
            cu_seqlens_q=packed.cu_seqlens,
            cu_seqlens_k=packed.cu_seqlens,
            max_seqlen_q=packed.max_seqlen,
            max_seqlen_k=packed.max_seqlen,
            dropout_p=dropout,
            softmax_scale=scale,
            causal=False,
        )
        return out.to(query.dtype)
    if packed.kernel == "varlen":
        # Positional arguments only: the keywords changed between torch 2.10 and 2.13 (is_causal -> window_size,
        # `scale` added). Non-causal is the default, and so is scale = head_dim ** -0.5, which is ours.
        cu, max_len = packed.cu_seqlens, packed.max_seqlen
        return varlen_attn(query, key, value, cu, cu, max_len, max_len)

    # Per-image kernels. Heads go first once for the whole pack; a run of `count` equal-length neighbours is one
    # (count, heads, n, d) strided view, so equal-size images share one call. SDPA picks its fused CPU kernel
    # for 4-D inputs (3-D inputs fall back to the n x n math path). Each result is written straight into the
    # (total, heads, d) output, which the out-projection then reads without another copy; a pack that is a
    # single run (one image, or images all of one size) needs no output buffer at all.
    q_all, k_all, v_all = (t.transpose(0, 1) for t in (query, key, value))
    heads, head_dim = query.shape[1], query.shape[2]
    output = torch.empty_like(query) if len(packed.runs) > 1 else None
    for start, length, count in packed.runs:
        end = start + length * count
        q, k, v = (t[:, start:end].view(heads, count, length, head_dim).transpose(0, 1) for t in (q_all, k_all, v_all))
        if packed.kernel == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale)
        else:  # eager
            out, weights = eager_attention(q, k, v, scale, dropout)
            if attention_maps is not None:
                attention_maps.extend(weights.unbind(0))  # (count, heads, n, n) -> one (heads, n, n) per image
        out = out.transpose(1, 2)  # (count, length, heads, head_dim)
        if output is None:
            return out.reshape(query.shape)  # a view when the kernel wrote (count, length, heads, d) memory
        output[start:end].view(count, length, heads, head_dim).copy_(out)
    return output


# Index tensors may have any of these dtypes (widened to int64 once per forward). Not bool, floating point,
# complex, quantised or the sub-byte int1..int7 types (torch cannot even copy those).
_INDEX_DTYPES = frozenset(
    getattr(torch, name)
    for name in ("uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64")
    if hasattr(torch, name)  # uint16/32/64 exist from torch 2.3
)


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    """A whole-byte integer dtype, signed or unsigned."""
    return dtype in _INDEX_DTYPES


def _check_pixels(config: SiglipNaViTConfig, x: torch.Tensor, model_weight: torch.Tensor) -> int:
    """Free checks of `packed_pixel_values` (type, rank, dtype, shape, device); returns the number of patches."""
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


def _index_tensor(name: str, value, ndim: int, device: torch.device) -> torch.Tensor:
    """An integer index tensor of rank `ndim`, widened to int64 on `device` (once per forward)."""
    # Any integer dtype is accepted: torch indexes only with int64/int32 (uint8 would even act as a boolean mask),
    # and no id of a valid pack needs more than 63 bits.
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of integers, got {type(value).__name__}.")
    if value.dim() != ndim or not _is_integer_dtype(value.dtype):
        raise TypeError(
            f"`{name}` must be a {ndim}-D integer tensor, got a {value.dim()}-D tensor of dtype {value.dtype}."
        )
    return value.to(device=device, dtype=torch.int64)


def _check_index_shapes(
    total: int, position_ids, cu_seqlens, max_seqlen, image_grid_hw, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Free checks of the index arguments; returns position ids, cu_seqlens and the grid, as int64 on `device`."""
    position_ids = _index_tensor("packed_flattened_position_ids", position_ids, 1, device)
    if position_ids.shape[0] != total:
        raise ValueError(
            f"`packed_flattened_position_ids` must hold one id per patch: got {position_ids.shape[0]} ids "
            f"for {total} patches."
        )
    cu = _index_tensor("cu_seqlens", cu_seqlens, 1, device)
    if cu.shape[0] < 2:
        raise ValueError(f"`cu_seqlens` must be [0, n1, n1+n2, ...] with at least 2 entries, got {cu.tolist()}.")
    num_images = cu.shape[0] - 1
    if isinstance(max_seqlen, torch.Tensor):
        if max_seqlen.numel() != 1 or not _is_integer_dtype(max_seqlen.dtype):
            raise TypeError(
                f"`max_seqlen` must be an int or a 0-d integer tensor, got a tensor of shape "
                f"{tuple(max_seqlen.shape)} and dtype {max_seqlen.dtype}."
            )
    elif not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool):
        raise TypeError(f"`max_seqlen` must be an int or a 0-d integer tensor, got {type(max_seqlen).__name__}.")
    if image_grid_hw is not None:
        image_grid_hw = _index_tensor("image_grid_hw", image_grid_hw, 2, device)
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


def _check_pack_values(config: SiglipNaViTConfig, values: _HostValues, total: int) -> None:
    """The value checks: cu_seqlens monotone and ending at `total`, max_seqlen, position-id range, grid agreement."""
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
    num_positions = config.num_patches_per_side**2
    pos_min, pos_max = values.position_range
    if pos_min < 0 or pos_max >= num_positions:
        raise ValueError(
            f"`packed_flattened_position_ids` must lie in [0, {num_positions}) "
            f"((image_size // patch_size)**2 grid cells), got values in [{pos_min}, {pos_max}]."
        )
    side = config.num_patches_per_side
    for i, ((h, w), n) in enumerate(zip(values.grid or [], lengths)):
        if h * w != n:
            raise ValueError(
                f"`image_grid_hw[{i}]` = ({h}, {w}) gives {h * w} patches but cu_seqlens gives image {i} {n} patches."
            )
        if not (1 <= h <= side and 1 <= w <= side):
            raise ValueError(
                f"`image_grid_hw[{i}]` = ({h}, {w}) is outside the model's {side}x{side} patch grid "
                f"(image_size // patch_size per side)."
            )


def _runs_of_equal_lengths(bounds: list[int], lengths: list[int]) -> list[tuple[int, int, int]]:
    """`(start, length, count)`: neighbouring images of equal length merged into one run."""
    runs = []
    for start, length in zip(bounds[:-1], lengths):
        if runs and runs[-1][1] == length:
            runs[-1] = (runs[-1][0], length, runs[-1][2] + 1)
        else:
            runs.append((start, length, 1))
    return runs


def prepare_packed_sequences(
    config: SiglipNaViTConfig,
    packed_pixel_values: torch.Tensor,
    packed_flattened_position_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: Union[int, torch.Tensor],
    image_grid_hw: Optional[torch.Tensor],
    model_weight: torch.Tensor,
    dropout: float,
    validate_inputs: bool,
) -> tuple[PackedSequences, torch.Tensor]:
    """Check the pack once per forward, pick the attention kernel, and build the per-layer `PackedSequences`.

    Shape and dtype checks are free. The value checks (cu_seqlens monotone and ending at the number of
    patches, max_seqlen, position-id range, image_grid_hw agreement) read the index tensors on the host in
    ONE transfer; on a GPU that is one device->host sync per forward. The per-image kernels (eager, and
    sdpa off the CUDA varlen path) need the segment bounds on the host anyway. With `validate_inputs=False`
    the value checks are skipped, and the varlen / flash paths then sync only if `max_seqlen` is a tensor.

    Returns the `PackedSequences` and the position ids moved to the pixels' device.
    """
    x = packed_pixel_values
    total = _check_pixels(config, x, model_weight)
    kernel = select_attention_kernel(config._attn_implementation, x.device, model_weight.dtype, dropout)
    position_ids, cu, image_grid_hw = _check_index_shapes(
        total, packed_flattened_position_ids, cu_seqlens, max_seqlen, image_grid_hw, x.device
    )
    need_host_bounds = kernel in ("eager", "sdpa")
    if not (validate_inputs or need_host_bounds):
        max_len = int(max_seqlen)  # a tensor here costs one sync: flash/varlen take a host int
        return PackedSequences(cu.to(torch.int32), max_len, None, kernel), position_ids

    values = _read_host_values(cu, position_ids, max_seqlen, image_grid_hw, validate_inputs)
    if validate_inputs:
        _check_pack_values(config, values, total)
        max_seqlen = values.max_seqlen
    runs = _runs_of_equal_lengths(values.bounds, values.lengths) if need_host_bounds else None
    return PackedSequences(cu.to(torch.int32), int(max_seqlen), runs, kernel), position_ids


class SiglipVisionEmbeddings(nn.Module):
    """Patch embedding (+ learned position table when `rope=False`) for packed, pre-patchified pixels.

    Built with a `Conv2d` (the upstream contract) and converted to the equivalent `Linear` by
    `convert_conv2d_to_linear`; the forward takes the Linear layout `(total_patches, P*P*C)`.
    """

    def __init__(self, config: SiglipNaViTConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size

        self.patch_embedding = nn.Conv2d(
            in_channels=config.num_channels,
            out_channels=self.embed_dim,
            kernel_size=self.patch_size,
            stride=self.patch_size,
            padding="valid",
        )

        self.num_patches_per_side = self.image_size // self.patch_size
        self.num_patches = self.num_patches_per_side**2
        self.num_positions = self.num_patches
        if not config.rope:
            self.position_embedding = nn.Embedding(self.num_positions, self.embed_dim)

    def convert_conv2d_to_linear(self, config: SiglipNaViTConfig, meta: bool = False) -> None:
        """Swap the Conv2d patch embedding for the equivalent Linear, in place (no-op if already Linear).

        `W_lin = W_conv.permute(0, 2, 3, 1).reshape(hidden, P*P*C)`; the bias is unchanged. With `meta=True`
        (or when the conv lives on the meta device) the Linear is created on the meta device, without copying.
        """
        conv = self.patch_embedding
        if isinstance(conv, nn.Linear):
            return
        in_features = config.num_channels * self.patch_size**2
        on_meta = meta or conv.weight.device.type == "meta"
        linear = nn.Linear(
            in_features,
            self.embed_dim,
            bias=True,
            device="meta" if on_meta else conv.weight.device,
            dtype=conv.weight.dtype,
        )
        if not on_meta:
            with torch.no_grad():
                linear.weight.copy_(conv2d_weight_to_linear(conv.weight))
                linear.bias.copy_(conv.bias)
        self.patch_embedding = linear

    def convert_linear_to_conv2d(self, config: SiglipNaViTConfig) -> None:
        """Exact inverse of `convert_conv2d_to_linear`, for export to stock SigLIP (no-op if already Conv2d)."""
        linear = self.patch_embedding
        if isinstance(linear, nn.Conv2d):
            return
        conv = nn.Conv2d(
            config.num_channels,
            self.embed_dim,
            kernel_size=self.patch_size,
            stride=self.patch_size,
            padding="valid",
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        if linear.weight.device.type != "meta":
            with torch.no_grad():
                conv.weight.copy_(linear_weight_to_conv2d(linear.weight, config.num_channels, self.patch_size))
                conv.bias.copy_(linear.bias)
        self.patch_embedding = conv

    def forward(self, packed_pixel_values: torch.Tensor, packed_flattened_position_ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.patch_embedding, nn.Linear):
            raise RuntimeError(
                "The patch embedding is still a Conv2d: call `convert_conv2d_to_linear(config)` before a packed "
                "forward."
            )
        embeddings = self.patch_embedding(packed_pixel_values.to(self.patch_embedding.weight.dtype))
        if not self.config.rope:
            # Absolute positions: cell (row, col) of the 70x70 table is row * 70 + col, whatever the image width.
            embeddings = embeddings + self.position_embedding(packed_flattened_position_ids)
        return embeddings


class SiglipAttention(nn.Module):
    """Multi-head self-attention over a pack; images never attend to each other."""

    def __init__(self, config: SiglipNaViTConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.scale = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.is_causal = False

        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        packed: PackedSequences,
        position_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        attention_maps: Optional[list] = None,
    ) -> torch.Tensor:
        """-> `(total, hidden)` (a plain tensor, as upstream); with an `attention_maps` list, one `(heads, n_i, n_i)`
        map per image is appended to it (eager attention only)."""
        total = hidden_states.shape[0]
        shape = (total, self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(shape)
        key = self.k_proj(hidden_states).view(shape)
        value = self.v_proj(hidden_states).view(shape)

        if position_embeddings is not None:
            # 2D RoPE: view each head as (row half, column half) so one rotate-half rotation handles both;
            # cos/sin are (total, 2, head_dim / 2): [:, 0] the row angles, [:, 1] the column angles.
            cos, sin = position_embeddings
            halves = (total, self.num_heads, 2, self.head_dim // 2)
            query, key = apply_rotary_pos_emb(query.view(halves), key.view(halves), cos, sin)
            query, key = query.view(shape), key.view(shape)

        dropout = self.dropout if self.training else 0.0
        attn_output = packed_attention(query, key, value, packed, self.scale, dropout, attention_maps=attention_maps)
        return self.out_proj(attn_output.reshape(total, self.embed_dim))


# Upstream's name for the packed flash-attention subclass. Here one class serves every backend (chosen by
# `config._attn_implementation`), so the name is an alias with the same parameters.
SiglipFlashAttention2 = SiglipAttention


class SiglipMLP(nn.Module):
    def __init__(self, config: SiglipNaViTConfig):
        super().__init__()
        self.config = config
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.fc1(hidden_states)
        hidden_states = self.activation_fn(hidden_states)
        hidden_states = self.fc2(hidden_states)
        return hidden_states


class SiglipEncoderLayer(nn.Module):
    def __init__(self, config: SiglipNaViTConfig):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.layer_norm1 = nn.LayerNorm(self.embed_dim, eps=config.layer_norm_eps)
        self.self_attn = SiglipAttention(config)
        self.layer_norm2 = nn.LayerNorm(self.embed_dim, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        packed: PackedSequences,
        position_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        attention_maps: Optional[list] = None,
    ) -> torch.Tensor:
        """-> `(total, hidden)` (a plain tensor, as upstream); `attention_maps`: see `SiglipAttention.forward`."""
        residual = hidden_states
        hidden_states = self.layer_norm1(hidden_states)
        hidden_states = self.self_attn(hidden_states, packed, position_embeddings, attention_maps)
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.layer_norm2(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


class SiglipEncoder(nn.Module):
    """Stack of `config.num_hidden_layers` encoder layers over one pack."""

    def __init__(self, config: SiglipNaViTConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList([SiglipEncoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        packed: PackedSequences,
        position_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> BaseModelOutput:
        hidden_states = inputs_embeds
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            maps = [] if output_attentions else None
            if self.gradient_checkpointing and self.training:
                # positional arguments only: reentrant checkpointing does not forward kwargs
                hidden_states = self._gradient_checkpointing_func(
                    layer.__call__, hidden_states, packed, position_embeddings, maps
                )
            else:
                hidden_states = layer(hidden_states, packed, position_embeddings, maps)
            if output_hidden_states:
                all_hidden_states = all_hidden_states + (hidden_states,)
            if output_attentions:
                # a copy: a checkpointed layer re-runs (and appends again) during the backward pass
                all_attentions = all_attentions + (list(maps),)
        return BaseModelOutput(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, attentions=all_attentions
        )


class SiglipVisionTransformer(nn.Module):
    """Embeddings -> encoder -> post-layernorm over a pack. Returns a plain tensor by default (upstream contract)."""

    def __init__(self, config: SiglipNaViTConfig):
        super().__init__()
        check_config(config)  # again: a field may have changed since the config was built
        self.config = config
        self.embeddings = SiglipVisionEmbeddings(config)
        if config.rope:
            side = config.num_patches_per_side
            head_dim = config.hidden_size // config.num_attention_heads
            self.rope = RotaryEmbedding2D(head_dim // 2, side, side)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        packed_pixel_values: torch.Tensor,
        packed_flattened_position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: Union[int, torch.Tensor],
        image_grid_hw: Optional[torch.Tensor] = None,
        output_hidden_states: bool = False,
        return_dict: bool = False,
        validate_inputs: bool = True,
        output_attentions: bool = False,
    ) -> Union[torch.Tensor, BaseModelOutput]:
        r"""
        packed_pixel_values (`torch.Tensor` of shape `(total_patches, num_channels * patch_size**2)`):
            Every image's patches, concatenated image after image; each patch flattened (row, col, channel),
            channel fastest. Cast to the model's dtype; must be on the model's device.
        packed_flattened_position_ids (integer tensor of shape `(total_patches,)`):
            Grid cell of each patch, `row * (image_size // patch_size) + col`.
        cu_seqlens (integer tensor of shape `(num_images + 1,)`):
            `[0, n1, n1 + n2, ...]`: where each image starts in the pack.
        max_seqlen (`int` or 0-d integer tensor):
            Patches in the longest image (an upper bound is accepted).
        image_grid_hw (integer tensor of shape `(num_images, 2)`, *optional*):
            Patch rows and columns of each image; only used to validate the pack.
            Index tensors may have any integer dtype (int8 ... int64, uint8 ... uint64): they are widened to int64
            once per forward. bool, floating-point and complex tensors are a TypeError naming the argument.
        output_hidden_states (`bool`): also return the packed input of every layer and the last layer's
            output (before post-layernorm).
        return_dict (`bool`): return a `BaseModelOutput` instead of the bare `last_hidden_state`.
        validate_inputs (`bool`, defaults to `True`): check the index tensors' values; this reads them on the
            host (one device->host sync per forward on a GPU). Turn off for CUDA-graph / sync-free loops.
        output_attentions (`bool`): also return every layer's per-image attention maps (eager attention only;
            see `SiglipVisionModel.forward`). Needs `return_dict=True` to be returned.
        """
        if output_attentions:
            check_output_attentions(self.config._attn_implementation)
        packed, position_ids = prepare_packed_sequences(
            self.config,
            packed_pixel_values,
            packed_flattened_position_ids,
            cu_seqlens,
            max_seqlen,
            image_grid_hw,
            self.embeddings.patch_embedding.weight,
            self.config.attention_dropout if self.training else 0.0,
            validate_inputs,
        )

        hidden_states = self.embeddings(packed_pixel_values, position_ids)
        position_embeddings = None
        if self.config.rope:
            # gathered once per forward for all layers: (total, 2, head_dim / 2) = (row angles, column angles)
            # in float32 (or the activations' dtype if wider): the rotation is done at that precision
            cos_h, sin_h, cos_w, sin_w = self.rope(position_ids)
            dtype = torch.promote_types(hidden_states.dtype, torch.float32)
            cos = torch.stack([cos_h, cos_w], dim=1).to(dtype)
            sin = torch.stack([sin_h, sin_w], dim=1).to(dtype)
            position_embeddings = (cos, sin)
        encoder_outputs = self.encoder(
            hidden_states, packed, position_embeddings, output_hidden_states, output_attentions
        )
        last_hidden_state = self.post_layernorm(encoder_outputs.last_hidden_state)
        if not return_dict:
            return last_hidden_state
        return BaseModelOutput(
            last_hidden_state=last_hidden_state,
            hidden_states=encoder_outputs.hidden_states,
            attentions=encoder_outputs.attentions,
        )


class SiglipPreTrainedModel(PreTrainedModel):
    config_class = SiglipNaViTConfig
    config: SiglipNaViTConfig
    base_model_prefix = "siglip"
    main_input_name = "packed_pixel_values"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SiglipVisionEmbeddings", "SiglipEncoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn_2 = True  # read by transformers 4.x
    _supports_flash_attn = True  # read by transformers 5.x
    # upstream BAGEL stored the RoPE tables persistently; they are recomputed here, never loaded
    _keys_to_ignore_on_load_unexpected = [r"rope\.(cos|sin)_[hw]$"]

    # Backends we do not run are refused when the model is built, not at the first forward: transformers 5.x
    # checks the choice in `_check_and_adjust_attn_implementation` (called by `__init__`, hence by from_pretrained
    # and from_config), 4.49 in the classmethod `_autoset_attn_implementation` (called by from_pretrained,
    # from_config and `__init__`). Each major never calls the other's hook.
    def _check_and_adjust_attn_implementation(self, attn_implementation: Optional[str], *args, **kwargs) -> str:
        check_attn_implementation(attn_implementation, at_load=True)
        chosen = super()._check_and_adjust_attn_implementation(attn_implementation, *args, **kwargs)
        check_attn_implementation(chosen, requested=attn_implementation)
        return chosen

    @classmethod
    def _autoset_attn_implementation(cls, config: SiglipNaViTConfig, *args, **kwargs) -> SiglipNaViTConfig:
        requested = config._attn_implementation_internal
        check_attn_implementation(requested, at_load=True)
        config = super()._autoset_attn_implementation(config, *args, **kwargs)
        check_attn_implementation(config._attn_implementation, requested=requested)
        return config

    def _init_weights(self, module: nn.Module) -> None:
        """Initialise one module's OWN parameters (transformers 5.x skips containers whose leaves are loaded)."""
        if isinstance(module, RotaryEmbedding2D):
            module.reset_tables()
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=module.embedding_dim**-0.5)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class SiglipVisionModel(SiglipPreTrainedModel):
    """BAGEL's SigLIP vision tower (stored at `vit_model` in BAGEL). Takes a pack, returns packed features."""

    def __init__(self, config: SiglipNaViTConfig):
        super().__init__(config)
        check_attn_implementation(self.config._attn_implementation)  # also when transformers skipped its hook
        self.vision_model = SiglipVisionTransformer(config)
        # Released checkpoints store the Linear layout: convert before any weights are loaded.
        convert_conv2d_to_linear(self, config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.vision_model.embeddings.patch_embedding

    def forward(
        self,
        packed_pixel_values: torch.Tensor,
        packed_flattened_position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: Union[int, torch.Tensor],
        image_grid_hw: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        validate_inputs: bool = True,
        output_attentions: Optional[bool] = None,
    ) -> Union[BaseModelOutput, tuple]:
        r"""
        Encode a pack of images. Arguments as in `SiglipVisionTransformer.forward` (the processor returns them);
        `output_attentions` / `output_hidden_states` / `return_dict` default to the config's values.

        Returns a `BaseModelOutput`: `last_hidden_state` is `(total_patches, hidden_size)` after
        post-layernorm, packed like the input; `hidden_states` (if asked) holds `num_hidden_layers + 1` packed
        tensors (embeddings, then each layer's output). Upstream returned the bare tensor: BAGEL code that
        swaps this model in adds `.last_hidden_state`.

        `attentions` (if `output_attentions`): a tuple with one entry per layer; each entry is a LIST with one
        tensor per image, `attentions[layer][i]` of shape `(num_heads, n_i, n_i)` (n_i: image i's patches, in
        its row-major patch order), the softmax probabilities the layer used (after attention dropout, as
        transformers' eager attention). Unlike stock SigLIP's `(batch, heads, n, n)`, a pack holds images of
        different lengths, so there is no batch tensor. Needs `attn_implementation="eager"`: with sdpa or
        flash_attention_2 it is a ValueError saying so (their kernels never form the probabilities).
        """
        if output_attentions is None:
            output_attentions = bool(getattr(self.config, "output_attentions", False))
        if output_hidden_states is None:
            output_hidden_states = bool(getattr(self.config, "output_hidden_states", False))
        if return_dict is None:
            return_dict = bool(getattr(self.config, "return_dict", True))
        outputs = self.vision_model(
            packed_pixel_values,
            packed_flattened_position_ids,
            cu_seqlens,
            max_seqlen,
            image_grid_hw=image_grid_hw,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            validate_inputs=validate_inputs,
            output_attentions=output_attentions,
        )
        return outputs if return_dict else outputs.to_tuple()


def convert_conv2d_to_linear(vit_model: SiglipVisionModel, config: SiglipNaViTConfig, meta: bool = False) -> None:
    """Module-level helper (BAGEL's scripts call it): `vit_model.vision_model.embeddings.convert_conv2d_to_linear`."""
    vit_model.vision_model.embeddings.convert_conv2d_to_linear(config, meta=meta)


def convert_linear_to_conv2d(vit_model: SiglipVisionModel, config: SiglipNaViTConfig) -> None:
    """Inverse helper, for export: `vit_model.vision_model.embeddings.convert_linear_to_conv2d`."""
    vit_model.vision_model.embeddings.convert_linear_to_conv2d(config)


SiglipVisionModel.register_for_auto_class("AutoModel")

__all__ = [
    "RotaryEmbedding2D",
    "rotate_half",
    "apply_rotary_pos_emb",
    "SiglipVisionEmbeddings",
    "SiglipAttention",
    "SiglipFlashAttention2",
    "SiglipMLP",
    "SiglipEncoderLayer",
    "SiglipEncoder",
    "SiglipVisionTransformer",
    "SiglipPreTrainedModel",
    "SiglipVisionModel",
    "convert_conv2d_to_linear",
    "convert_linear_to_conv2d",
    "conv2d_weight_to_linear",
    "linear_weight_to_conv2d",
]
