# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""PyTorch SigLIP-NaViT: BAGEL's SigLIP vision tower over packed, variable-resolution patch sequences.

Many images of different sizes go through ONE forward call: their 14x14 patches are concatenated into a
`(total_patches, C*P*P)` tensor and `cu_seqlens` marks where each image starts, so attention never crosses
an image boundary and nothing is padded. Parameter paths match BAGEL's checkpoint (`vit_model.` prefix
stripped), so released weights load without key surgery.

Reads top to bottom as the architecture: embeddings (+ 2D RoPE) -> attention -> MLP -> layer -> encoder -> model.
The checks of a pack's arguments live in `packing_siglip_navit.py`.
"""

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutput
from transformers.modeling_utils import PreTrainedModel

from .configuration_siglip_navit import (
    SiglipNaViTConfig,
    check_attn_implementation,
    check_config,
    check_output_attentions,
)
from .packing_siglip_navit import Run, pack_indices, validated_patch_count

# Optional kernels: imported inside `try` so that remote-code loading never requires them.
try:
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

try:  # torch >= 2.10 on CUDA: flash-attention varlen kernel shipped with torch itself
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None


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


# --------------------------------------------------------------------------------------------------------------
# Embeddings: patches (a Linear, converted from the upstream Conv2d) + positions (a learned table, or 2D RoPE)
# --------------------------------------------------------------------------------------------------------------
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
        device = "meta" if on_meta else conv.weight.device
        linear = nn.Linear(in_features, self.embed_dim, bias=True, device=device, dtype=conv.weight.dtype)
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
            config.num_channels, self.embed_dim, kernel_size=self.patch_size, stride=self.patch_size, padding="valid",
            device=linear.weight.device, dtype=linear.weight.dtype,
        )  # fmt: skip
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
        return tuple(tables)  # cos_h, sin_h, cos_w, sin_w

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

    def position_embeddings(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`(cos, sin)` for `apply_rotary_pos_emb`, each `(total_patches, 2, dim)`: `[:, 0]` the row angles, `[:, 1]`
        the column angles; in float32 (or `dtype` if wider): the rotation is done at that precision."""
        cos_h, sin_h, cos_w, sin_w = self(position_ids)
        dtype = torch.promote_types(dtype, torch.float32)
        return torch.stack([cos_h, cos_w], dim=1).to(dtype), torch.stack([sin_h, sin_w], dim=1).to(dtype)


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


# --------------------------------------------------------------------------------------------------------------
# Attention kernels: one function per kernel, all with one signature (q, k, v, packed, scale, dropout, attention_maps;
# q/k/v and the result packed `(total, heads, head_dim)`). `select_attention_kernel` picks one per forward.
# --------------------------------------------------------------------------------------------------------------
@dataclass
class PackedSequences:
    """Facts about one pack, computed once per forward and shared by every layer."""

    cu_seqlens: torch.Tensor  # (num_images + 1,) int32 on the activations' device
    max_seqlen: int
    runs: Optional[list[Run]]  # host copy of the segments for the per-image kernels (runs of equal-length images)
    attention: Callable[..., torch.Tensor]  # the kernel every layer calls, chosen by `select_attention_kernel`


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


def _attend_per_image(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    runs: list[Run],
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Run `attend` on each run of equal-length images as one `(count, heads, n, head_dim)` batch.

    Heads go first once for the whole pack; a run of `count` equal-length neighbours is one strided view, so
    equal-size images share one call. Each result is written straight into the `(total, heads, d)` output, which the
    out-projection then reads without another copy; a pack that is a single run (one image, or images all of one
    size) needs no output buffer at all.
    """
    q_all, k_all, v_all = (t.transpose(0, 1) for t in (query, key, value))
    heads, head_dim = query.shape[1], query.shape[2]
    output = torch.empty_like(query) if len(runs) > 1 else None
    for start, length, count in runs:
        end = start + length * count
        q, k, v = (t[:, start:end].view(heads, count, length, head_dim).transpose(0, 1) for t in (q_all, k_all, v_all))
        out = attend(q, k, v).transpose(1, 2)  # (count, length, heads, head_dim)
        if output is None:
            return out.reshape(query.shape)  # a view when the kernel wrote (count, length, heads, d) memory
        output[start:end].view(count, length, heads, head_dim).copy_(out)
    return output


def eager_attention_per_image(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, packed: PackedSequences, scale: float,
    dropout: float = 0.0, attention_maps: Optional[list] = None,
) -> torch.Tensor:
    """The readable reference: `eager_attention` per image; the only kernel that can return the attention maps."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out, weights = eager_attention(q, k, v, scale, dropout)
        if attention_maps is not None:
            attention_maps.extend(weights.unbind(0))  # (count, heads, n, n) -> one (heads, n, n) per image
        return out

    return _attend_per_image(query, key, value, packed.runs, attend)


def sdpa_attention_per_image(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, packed: PackedSequences, scale: float,
    dropout: float = 0.0, attention_maps: Optional[list] = None,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention` per image, never with a `(total x total)` mask. 4-D inputs: SDPA picks its
    fused CPU kernel for them (3-D inputs fall back to the n x n math path)."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale)

    return _attend_per_image(query, key, value, packed.runs, attend)


def torch_varlen_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, packed: PackedSequences, scale: float,
    dropout: float = 0.0, attention_maps: Optional[list] = None,
) -> torch.Tensor:
    """torch's own variable-length flash kernel (`torch.nn.attention.varlen.varlen_attn`; CUDA, fp16/bf16, no
    dropout: `select_attention_kernel` picks it only then)."""
    # Positional arguments only: the keywords changed between torch 2.10 and 2.13 (is_causal -> window_size, `scale`
    # added). Non-causal is the default, and so is scale = head_dim ** -0.5, which is ours.
    cu, max_len = packed.cu_seqlens, packed.max_seqlen
    return varlen_attn(query, key, value, cu, cu, max_len, max_len)


def flash_attn_varlen_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, packed: PackedSequences, scale: float,
    dropout: float = 0.0, attention_maps: Optional[list] = None,
) -> torch.Tensor:
    """flash-attn 2's `flash_attn_varlen_func`. It runs in half precision only: like upstream BAGEL, fp32 activations
    go through bf16 and the result is cast back."""
    kernel_dtype = query.dtype if query.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    cu, max_len = packed.cu_seqlens, packed.max_seqlen
    out = flash_attn_varlen_func(
        query.to(kernel_dtype), key.to(kernel_dtype), value.to(kernel_dtype), cu_seqlens_q=cu, cu_seqlens_k=cu,
        max_seqlen_q=max_len, max_seqlen_k=max_len, dropout_p=dropout, softmax_scale=scale, causal=False,
    )  # fmt: skip
    return out.to(query.dtype)


# The kernels that attend image by image: they need the pack's segments on the host (`PackedSequences.runs`).
PER_IMAGE_KERNELS = (eager_attention_per_image, sdpa_attention_per_image)


def checked_attn_implementation(
    requested: Optional[str], transformers_choice: Callable[[Optional[str]], Optional[str]]
) -> Optional[str]:
    """The load-time check of `attn_implementation` (each transformers major's hook calls it once): the name the user
    asked for before transformers sees it (flash_attention_2 needs flash-attn importable), then the name
    `transformers_choice(requested)` turns it into. Returns the latter."""
    check_attn_implementation(requested, flash_attn_importable=flash_attn_varlen_func is not None)
    chosen = transformers_choice(requested)
    check_attn_implementation(chosen, requested=requested)
    return chosen


def _flash_attn_available(device: torch.device) -> bool:
    """flash-attn is importable and the activations live on a CUDA device."""
    return flash_attn_varlen_func is not None and device.type == "cuda"


def select_attention_kernel(
    attn_implementation: Optional[str], device: torch.device, dtype: torch.dtype, dropout: float
) -> Callable[..., torch.Tensor]:
    """The ONE place that turns `config._attn_implementation` into the kernel every layer calls.

    - `eager`: `eager_attention_per_image` (the readable reference).
    - `sdpa` (default, also for `None`): `torch_varlen_attention` on CUDA in fp16/bf16 when the installed torch has
      it (and no attention dropout is active); otherwise `sdpa_attention_per_image` -- never a `(total x total)` mask.
    - `flash_attention_2`: `flash_attn_varlen_attention`; needs flash-attn and a CUDA device.
    """
    impl = "sdpa" if attn_implementation is None else attn_implementation
    if impl == "eager":
        return eager_attention_per_image
    if impl == "sdpa":
        half_precision = dtype in (torch.float16, torch.bfloat16)
        if varlen_attn is not None and device.type == "cuda" and half_precision and dropout == 0.0:
            return torch_varlen_attention
        return sdpa_attention_per_image
    if impl == "flash_attention_2":
        if not _flash_attn_available(device):
            raise ValueError(
                "attn_implementation='flash_attention_2' needs the `flash-attn` package and a CUDA device "
                f"(flash-attn importable: {flash_attn_varlen_func is not None}, device: {device}). "
                "Install flash-attn on a CUDA machine, or use attn_implementation='sdpa' (default) or 'eager'."
            )
        return flash_attn_varlen_attention
    check_attn_implementation(impl)
    raise AssertionError(impl)  # unreachable: check_attn_implementation raised


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
    """Check the pack once per forward (`packing_siglip_navit`), pick the attention kernel, and build the per-layer
    `PackedSequences`. Returns it and the position ids, as int64 on the pixels' device.

    With `validate_inputs=True` the index VALUES are checked too, which reads them on the host (one device->host sync
    per forward on a GPU); the per-image kernels need the segment bounds on the host anyway.
    """
    total = validated_patch_count(config, packed_pixel_values, model_weight)
    device = packed_pixel_values.device
    attention = select_attention_kernel(config._attn_implementation, device, model_weight.dtype, dropout)
    indices = pack_indices(
        config, total, packed_flattened_position_ids, cu_seqlens, max_seqlen, image_grid_hw, device,
        need_runs=attention in PER_IMAGE_KERNELS, validate_inputs=validate_inputs,
    )  # fmt: skip
    packed = PackedSequences(indices.cu_seqlens, indices.max_seqlen, indices.runs, attention)
    return packed, indices.position_ids


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
        attn_output = packed.attention(query, key, value, packed, self.scale, dropout, attention_maps)
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
        """Arguments: see `SiglipVisionModel.forward`. Returns the bare `last_hidden_state` (upstream's contract)
        unless `return_dict`."""
        if output_attentions:
            check_output_attentions(self.config._attn_implementation)
        dropout = self.config.attention_dropout if self.training else 0.0
        packed, position_ids = prepare_packed_sequences(
            self.config, packed_pixel_values, packed_flattened_position_ids, cu_seqlens, max_seqlen, image_grid_hw,
            self.embeddings.patch_embedding.weight, dropout, validate_inputs,
        )  # fmt: skip

        hidden_states = self.embeddings(packed_pixel_values, position_ids)
        position_embeddings = None  # RoPE angles: gathered once per forward, for every layer
        if self.config.rope:
            position_embeddings = self.rope.position_embeddings(position_ids, hidden_states.dtype)
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


def check_loading_info(loading_info: dict, where: str) -> None:
    """RuntimeError (as torch's strict `load_state_dict`) naming every tensor `from_pretrained` reported missing,
    unexpected or of another shape. Not a ValueError: transformers 4.x pipelines catch those and try other classes."""
    kinds = (("missing_keys", "missing"), ("unexpected_keys", "unexpected"), ("mismatched_keys", "misshaped"))
    problems = [
        f"{what}: {', '.join(sorted(k if isinstance(k, str) else k[0] for k in loading_info[key]))}"
        for key, what in kinds
        if loading_info.get(key)
    ]
    if problems:
        raise RuntimeError(
            f"{where}: the checkpoint does not match the model ({'; '.join(problems)}); loading it anyway would leave "
            "tensors randomly initialised. Load a complete converted checkpoint (convert_checkpoint.py writes one), or "
            "pass output_loading_info=True to get this report instead of the error."
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
        choose = super()._check_and_adjust_attn_implementation
        return checked_attn_implementation(attn_implementation, lambda name: choose(name, *args, **kwargs))

    @classmethod
    def _autoset_attn_implementation(cls, config: SiglipNaViTConfig, *args, **kwargs) -> SiglipNaViTConfig:
        autoset = super()._autoset_attn_implementation

        def choose(name: Optional[str]) -> Optional[str]:
            nonlocal config  # transformers 4.x returns the config whose `_attn_implementation` it set
            config = autoset(config, *args, **kwargs)
            return config._attn_implementation

        checked_attn_implementation(config._attn_implementation_internal, choose)
        return config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """As transformers' `from_pretrained`, but strict: a checkpoint that lacks tensors of this model, holds tensors
        it does not use or stores one in another shape is a RuntimeError naming them, never a model with silently random
        weights (transformers' default). With `output_loading_info=True` the caller gets the report and decides."""
        if kwargs.get("output_loading_info"):
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        kwargs["output_loading_info"] = True
        model, loading_info = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        check_loading_info(loading_info, f"{cls.__name__}.from_pretrained({str(pretrained_model_name_or_path)!r})")
        return model

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
        Encode a pack of images (the image processor returns these arguments).

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
            Index tensors may have any integer dtype (widened to int64 once per forward); others are a TypeError.
        validate_inputs (`bool`, defaults to `True`): check the index tensors' values; this reads them on the
            host (one device->host sync per forward on a GPU). Turn off for CUDA-graph / sync-free loops.
        output_hidden_states / output_attentions / return_dict (`bool`, *optional*, default: the config's values):
            also return every layer's packed input and the last layer's output (before post-layernorm) / every
            layer's per-image attention maps (eager attention only) / a `BaseModelOutput` (else a tuple).

        Returns a `BaseModelOutput`: `last_hidden_state` is `(total_patches, hidden_size)` after
        post-layernorm, packed like the input; `hidden_states` (if asked) holds `num_hidden_layers + 1` packed
        tensors (embeddings, then each layer's output). Upstream returned the bare tensor: BAGEL code that
        swaps this model in adds `.last_hidden_state`.

        `attentions` (if `output_attentions`, eager attention only): one entry per layer, each a LIST with one
        `(num_heads, n_i, n_i)` tensor per image (row-major patch order), the probabilities the layer used (after
        attention dropout). A pack holds images of different lengths, so there is no `(batch, heads, n, n)` tensor.
        """
        if output_attentions is None:
            output_attentions = bool(getattr(self.config, "output_attentions", False))
        if output_hidden_states is None:
            output_hidden_states = bool(getattr(self.config, "output_hidden_states", False))
        if return_dict is None:
            return_dict = bool(getattr(self.config, "return_dict", True))
        outputs = self.vision_model(
            packed_pixel_values, packed_flattened_position_ids, cu_seqlens, max_seqlen, image_grid_hw=image_grid_hw,
            output_hidden_states=output_hidden_states, return_dict=True, validate_inputs=validate_inputs,
            output_attentions=output_attentions,
        )  # fmt: skip
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
    "check_loading_info",
    "linear_weight_to_conv2d",
]
