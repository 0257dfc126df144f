# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Image processor for SigLIP-NaViT: images -> one packed batch; packed outputs -> one (h, w, C) map per image.

This file is the ONE place that owns the image <-> pack geometry:

- `bagel_resize_size`: BAGEL's ViT size rule (`MaxLongEdgeMinShortEdgeResize`), with Python rounding.
- `to_rgb_pil`: any supported input -> an RGB PIL image (BAGEL's `pil_img2rgb` rule, word for word).
- `patchify_hwc` / `unpatchify_hwc` (and `patchify` / `unpatchify` for `(C, H, W)`): the patch layout, both ways,
  patches row-major, channel fastest; `pack_to_uint8_images` recovers the resized images from a pack.
- `position_ids_extrapolate` / `position_ids_interpolate`: BAGEL's two position-id schemes.
- `build_cu_seqlens`, `unpack_features`, `mean_pool_features`: the pack's boundaries, splitting packed features per
  image, and each image's float32 mean feature (what the pipeline's `pool=True` and the extractor's `pooled` are).

`SiglipNaViTImageProcessor.__call__` returns exactly the model's forward arguments:
`packed_pixel_values`, `packed_flattened_position_ids`, `cu_seqlens`, `max_seqlen`, `image_grid_hw`.
"""

import struct
import textwrap
import types
import zlib
from numbers import Integral
from typing import Any, NamedTuple, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from .configuration_siglip_navit import MAX_PATCHES_PER_SIDE, SIZE_FIELD_BOUNDS

try:  # the TypedDict transformers 5.x reads (`valid_kwargs`) to route `from_pretrained(..., key=value)` kwargs
    from transformers.processing_utils import ImagesKwargs as _ImagesKwargs
except ImportError:  # pragma: no cover - very old transformers
    from typing import TypedDict as _ImagesKwargs


_BICUBIC = PIL.Image.Resampling.BICUBIC if hasattr(PIL.Image, "Resampling") else PIL.Image.BICUBIC

POSITION_ID_MODES = ("extrapolate", "interpolate")

# BAGEL's ViT transform (`ImageTransform(980, 224, 14)`) for its 980 px / 14 px tower: THE one place these
# defaults are written (the processor's arguments, the size rule's defaults and the converter's template use them).
BAGEL_VIT_MAX_IMAGE_SIZE = 980
BAGEL_VIT_MIN_IMAGE_SIZE = 224
BAGEL_VIT_IMAGE_STRIDE = 14
BAGEL_MAX_PIXELS = 14 * 14 * 9 * 1024  # ImageTransform's default max_pixels (= 1_806_336), both transforms
BAGEL_MAX_NUM_PATCHES_PER_SIDE = BAGEL_VIT_MAX_IMAGE_SIZE // BAGEL_VIT_IMAGE_STRIDE  # 70
# BAGEL's VAE-side transform (`ImageTransform(1024, 512, 16)`), applied first on its interleaved inference path.
BAGEL_VAE_MAX_IMAGE_SIZE = 1024
BAGEL_VAE_MIN_IMAGE_SIZE = 512
BAGEL_VAE_IMAGE_STRIDE = 16
BAGEL_VAE_MAX_PIXELS = BAGEL_MAX_PIXELS

# 16- and 32-bit integer PIL modes: PIL's convert("RGB") would CLIP them (1000 -> 255); they are scaled instead.
_HIGH_BIT_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


# --------------------------------------------------------------------------------------------------------------
# Size rule
# --------------------------------------------------------------------------------------------------------------
def bagel_fit(value: float, stride: int) -> int:
    """BAGEL's `_make_divisible`: the nearest multiple of `stride` (Python `round`, ties to even), at least `stride`."""
    return max(stride, int(round(value / stride) * stride))


def bagel_apply_scale(width: int, height: int, scale: float, stride: int) -> tuple[int, int]:
    """BAGEL's `_apply_scale`: scale both sides, round them (Python `round`), then snap each to the stride."""
    return bagel_fit(round(width * scale), stride), bagel_fit(round(height * scale), stride)


def bagel_resize_size(
    width: int,
    height: int,
    max_image_size: int = BAGEL_VIT_MAX_IMAGE_SIZE,
    min_image_size: int = BAGEL_VIT_MIN_IMAGE_SIZE,
    image_stride: int = BAGEL_VIT_IMAGE_STRIDE,
    max_pixels: int = BAGEL_MAX_PIXELS,
    img_num: int = 1,
) -> tuple[int, int]:
    """The `(width, height)` BAGEL's ViT transform resizes a `width x height` image to.

    Three steps, exactly as BAGEL's `MaxLongEdgeMinShortEdgeResize.forward`:

    1. `s = min(max / max(w, h), 1.0)`; `s = max(s, min / min(w, h))`; `(w, h) = apply(w, h, s)`.
    2. If `w * h > max_pixels / img_num`: `s = max_pixels / img_num / (w * h)` -- an AREA ratio applied to each
       side (BAGEL's quirk, kept for parity) -- and `(w, h) = apply(w, h, s)`.
    3. If `max(w, h) > max`: `s = max / max(w, h)`; `(w, h) = apply(w, h, s)`.

    `apply(w, h, s) = fit(round(w * s)), fit(round(h * s))` with `fit(v) = max(stride, int(round(v / stride) *
    stride))`, Python's `round` (ties to even). Steps 2 and 3 rescale the size from the previous step; the image
    itself is resized once, from its original size, to the final result.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    scale = min(max_image_size / max(width, height), 1.0)
    scale = max(scale, min_image_size / min(width, height))
    new_width, new_height = bagel_apply_scale(width, height, scale, image_stride)

    if new_width * new_height > max_pixels / img_num:
        scale = max_pixels / img_num / (new_width * new_height)
        new_width, new_height = bagel_apply_scale(new_width, new_height, scale, image_stride)

    if max(new_width, new_height) > max_image_size:
        scale = max_image_size / max(new_width, new_height)
        new_width, new_height = bagel_apply_scale(new_width, new_height, scale, image_stride)
    return new_width, new_height


def resize_bicubic(image: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
    """PIL bicubic resize (what torchvision's `F.resize` does for PIL input, where `antialias` has no effect)."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), _BICUBIC)


# --------------------------------------------------------------------------------------------------------------
# Inputs -> RGB PIL
# --------------------------------------------------------------------------------------------------------------
def _bad(index: int, message: str, exc: type = ValueError) -> Exception:
    return exc(f"image {index}: {message}")


# What reading / converting one image can raise (PIL's decoders raise most of these for corrupt files).
_IMAGE_ERRORS = (
    OSError, ValueError, TypeError, RuntimeError, SyntaxError, EOFError, struct.error, zlib.error,
    PIL.Image.DecompressionBombError, MemoryError,
)  # fmt: skip


def with_image_index(err: Exception, index: int, replaces: Optional[int] = None) -> Exception:
    """`err` with "image {index}: " in front of its message (instead of "image {replaces}: " when given: a caller
    that processed the image alone renumbers it), of the same type where it can be rebuilt (OSErrors keep their
    errno and filename, so callers can still tell a failing disk from a bad file); else a ValueError."""
    if replaces is None and str(err).startswith(f"image {index}:"):
        return err

    def named(text: Any) -> str:
        text = str(text) or type(err).__name__  # e.g. a bare MemoryError()
        old = f"image {replaces}: "
        return f"image {index}: {text[len(old):] if replaces is not None and text.startswith(old) else text}"

    if isinstance(err, OSError) and err.errno is not None:
        return type(err)(err.errno, named(err.strerror), err.filename)
    try:
        return type(err)(named(err))
    except Exception:  # noqa: BLE001 - an exception type that needs other constructor arguments
        return ValueError(f"image {index}: {type(err).__name__}: {err}")


def _check_input_pixels(width: int, height: int, index: int, what: str) -> None:
    """Refuse (a ValueError naming the image) an input too large to be converted: checked before any conversion
    widens it (a 40000 x 40000 1-bit image would take 4.8 GB as RGB)."""
    if width * height > MAX_INPUT_PIXELS:
        raise _bad(
            index,
            f"{what} of {width}x{height} (WxH) = {width * height:,} pixels is more than the {MAX_INPUT_PIXELS:,} this "
            "processor converts (PIL's own decompression-bomb limit; only RGB and 1-bit / 8-bit gray PIL images, "
            "which need no widening, may be larger). Downscale it first, e.g. with `image.thumbnail((8192, 8192))`.",
        )


def _high_bit_to_8bit(image: PIL.Image.Image, index: int) -> PIL.Image.Image:
    """16-bit (`I;16*`) and 32-bit integer (`I`) images -> `L`, scaled by 1/257 (65535 -> 255), rounded.

    `I` is read as 16-bit data (what 16-bit PNG/TIFF files decode to); values outside [0, 65535] are an error.
    """
    values = np.asarray(image)
    if values.dtype.byteorder not in ("=", "|"):
        values = values.astype(values.dtype.newbyteorder("="))
    values = values.astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise _bad(
            index,
            f"PIL mode {image.mode!r} holds values in [{values.min()}, {values.max()}]; expected 16-bit data in "
            "[0, 65535]. Scale it to 8 bits (uint8) yourself first.",
        )
    return PIL.Image.fromarray(np.rint(values / 257.0).astype(np.uint8))  # 2-D uint8 -> mode L


def _float_to_uint8(values: np.ndarray, index: int, what: str) -> np.ndarray:
    """Float pixels in [0, 1] -> uint8 by `round(x * 255)` (ties to even), computed in float64."""
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise _bad(index, f"{what} contains NaN or infinite values.")
    if values.size and (values.min() < 0.0 or values.max() > 1.0):
        raise _bad(
            index,
            f"{what} has values in [{values.min():.6g}, {values.max():.6g}]; float images must lie in [0, 1] "
            "(divide 0..255 data by 255, or pass uint8).",
        )
    return np.rint(values * 255.0).astype(np.uint8)


def _array_to_pil(values: np.ndarray, index: int, what: str) -> PIL.Image.Image:
    """An (H, W) or (H, W, C) array, C in {1, 2, 3, 4} -> PIL L / LA / RGB / RGBA (uint8)."""
    if values.ndim == 3 and values.shape[-1] == 1:
        values = values[..., 0]
    if values.ndim not in (2, 3):
        raise _bad(index, f"{what} must be 2-D (H, W) or 3-D, got shape {tuple(values.shape)}.")
    if values.ndim == 3 and values.shape[-1] not in (2, 3, 4):
        raise _bad(
            index,
            f"{what} has {values.shape[-1]} channels (shape {tuple(values.shape)}); expected 1 (gray), 2 (gray + "
            "alpha), 3 (RGB) or 4 (RGBA). numpy arrays are channels-last (H, W, C), torch tensors channels-first "
            "(C, H, W).",
        )
    if values.shape[0] == 0 or values.shape[1] == 0:
        raise _bad(index, f"{what} is empty (shape {tuple(values.shape)}).")
    _check_input_pixels(values.shape[1], values.shape[0], index, what)

    if values.dtype.byteorder not in ("=", "|"):  # big-endian data (e.g. from a file): native order first
        values = values.astype(values.dtype.newbyteorder("="))
    if values.dtype == np.bool_:
        raise _bad(index, f"{what} has dtype bool; pass uint8 (0..255) or float (0..1) pixels.", TypeError)
    if np.issubdtype(values.dtype, np.floating):
        values = _float_to_uint8(values, index, what)
    elif values.dtype == np.uint16:  # 16-bit data: the same 1/257 scaling as PIL's I;16 mode
        values = np.rint(values.astype(np.float64) / 257.0).astype(np.uint8)
    elif np.issubdtype(values.dtype, np.integer):
        if values.dtype != np.uint8:
            low, high = int(values.min()), int(values.max())
            if low < 0 or high > 255:
                raise _bad(
                    index,
                    f"{what} has integer dtype {values.dtype} with values in [{low}, {high}]; integer pixels must "
                    "lie in [0, 255] (uint16 arrays are read as 16-bit images).",
                )
            values = values.astype(np.uint8)
    else:
        raise _bad(index, f"{what} has unsupported dtype {values.dtype}.", TypeError)

    # uint8 (H, W) / (H, W, 2) / (H, W, 3) / (H, W, 4) -> PIL mode L / LA / RGB / RGBA
    return PIL.Image.fromarray(np.ascontiguousarray(values))


def to_pil(image: Any, index: int = 0) -> PIL.Image.Image:
    """Any supported input -> a PIL image (not yet RGB). Errors name the image's `index`.

    - PIL images: returned as they are.
    - numpy arrays: channels-last `(H, W)`, `(H, W, 1|2|3|4)`.
    - torch tensors: channels-first `(H, W)`, `(1|2|3|4, H, W)`.
    uint8 is used as is; floats must lie in [0, 1] and are quantised with `round(x * 255)` (float64, ties to
    even); uint16 is 16-bit data (scaled by 1/257); other integer dtypes must lie in [0, 255].
    """
    if isinstance(image, PIL.Image.Image):
        if image.width == 0 or image.height == 0:
            raise _bad(index, f"the PIL image is empty ({image.width}x{image.height}).")
        return image
    if isinstance(image, torch.Tensor):
        if image.is_meta:
            raise _bad(index, "is a tensor on the meta device: it has a shape but no pixel values.")
        if image.dim() in (2, 3):  # (H, W) or (C, H, W): refused before it is copied or widened
            _check_input_pixels(image.shape[-1], image.shape[-2], index, "torch tensor")
        tensor = image.detach().cpu()
        if tensor.dim() == 3:
            if tensor.shape[0] not in (1, 2, 3, 4):
                hint = " (it looks channels-last: permute it to (C, H, W))" if tensor.shape[-1] in (1, 3, 4) else ""
                raise _bad(
                    index,
                    f"torch tensor of shape {tuple(tensor.shape)} has {tensor.shape[0]} channels; expected a "
                    f"channels-first (C, H, W) tensor with C in 1..4{hint}.",
                )
            tensor = tensor.permute(1, 2, 0)
        elif tensor.dim() != 2:
            raise _bad(index, f"torch tensor must be (C, H, W) or (H, W), got shape {tuple(tensor.shape)}.")
        if tensor.is_floating_point() and tensor.dtype not in (torch.float32, torch.float64):
            tensor = tensor.float()
        if tensor.dtype == torch.bool:
            raise _bad(index, "torch tensor has dtype bool; pass uint8 (0..255) or float (0..1) pixels.", TypeError)
        if tensor.is_complex():
            raise _bad(index, f"torch tensor has unsupported dtype {tensor.dtype}.", TypeError)
        return _array_to_pil(tensor.contiguous().numpy(), index, "torch tensor")
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[-1] not in (1, 2, 3, 4) and image.shape[0] in (1, 3, 4):
            raise _bad(
                index,
                f"numpy array of shape {image.shape} looks channels-first; numpy images must be channels-last "
                "(H, W, C): transpose it with `.transpose(1, 2, 0)`.",
            )
        return _array_to_pil(image, index, "numpy array")
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        raise _bad(
            index,
            f"got a {type(image).__name__}, not an image; paths and URLs are not opened here "
            "(use `PIL.Image.open(path)`).",
            TypeError,
        )
    raise _bad(
        index,
        f"unsupported input type {type(image).__name__}; pass a PIL image, a numpy array (H, W, C) or a torch "
        "tensor (C, H, W).",
        TypeError,
    )


def to_rgb_pil(image: Any, index: int = 0) -> PIL.Image.Image:
    """Any supported input -> an RGB PIL image, by BAGEL's `pil_img2rgb` rule word for word, with one exception.

    BAGEL's rule: if `mode == "RGBA"` or `info["transparency"]` is set, convert to RGBA and paste it onto a WHITE
    RGB canvas with the alpha as mask; otherwise `convert("RGB")`. So `LA` / `PA` images lose their alpha without
    compositing (parity), while `P` / `L` / `RGB` images with a `transparency` entry are composited.

    The exception: 16- and 32-bit integer modes (`I;16*`, `I`), which PIL's `convert("RGB")` CLIPS at 255 (most
    16-bit photos would turn white), are first scaled to 8 bits (`round(v / 257)`); `F` (32-bit float) images are
    treated like float arrays (values in [0, 1], `round(x * 255)`). EXIF orientation is NOT applied (as in BAGEL).
    """
    image = to_pil(image, index)
    try:
        if image.mode in _HIGH_BIT_INT_MODES:
            image = _high_bit_to_8bit(image, index)
        elif image.mode == "F":
            image = PIL.Image.fromarray(_float_to_uint8(np.asarray(image), index, "PIL mode 'F' image"))
        if image.mode == "RGBA" or image.info.get("transparency", None) is not None:
            image = image.convert("RGBA")
            white = PIL.Image.new(mode="RGB", size=image.size, color=(255, 255, 255))
            white.paste(image, mask=image.split()[3])
            return white
        return image if image.mode == "RGB" else image.convert("RGB")  # convert("RGB") of RGB is only a copy
    except (ValueError, TypeError) as err:
        if str(err).startswith(f"image {index}:"):
            raise
        raise _bad(index, f"cannot convert PIL mode {image.mode!r} to RGB: {err}") from err


# --------------------------------------------------------------------------------------------------------------
# Pixels, patches, positions
# --------------------------------------------------------------------------------------------------------------
def _normalization_table() -> np.ndarray:
    """float32 value of every uint8 level: `x = u8.float() / 255`, then `(x - 0.5) / 0.5` (torchvision's
    ToTensor + Normalize(0.5, 0.5) as BAGEL runs them, in float32)."""
    x = torch.arange(256, dtype=torch.uint8).to(torch.float32).div(255)
    mean = torch.tensor([0.5], dtype=torch.float32)
    std = torch.tensor([0.5], dtype=torch.float32)
    return x.sub(mean).div(std).numpy()


_NORMALIZE_LUT = _normalization_table()


def normalize_uint8(pixels: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1], bit-identical to `(u8.float() / 255 - 0.5) / 0.5` in float32."""
    if isinstance(pixels, torch.Tensor):
        pixels = pixels.cpu().numpy()
    if pixels.dtype != np.uint8:
        raise TypeError(f"normalize_uint8 expects uint8 pixels, got {pixels.dtype}")
    return torch.from_numpy(np.take(_NORMALIZE_LUT, pixels))


def denormalize_to_uint8(values: torch.Tensor) -> torch.Tensor:
    """Exact inverse of `normalize_uint8` for its float32 output: `round((x + 1) / 2 * 255)` as uint8."""
    return ((values.to(torch.float32) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


# The patch layout, in ONE place (both directions): patches row-major over the grid; inside a patch (row, col,
# channel), channel fastest -- BAGEL's `patchify`, and the layout of the model's Linear patch embedding.
def patchify_hwc(pixels: Union[np.ndarray, torch.Tensor], patch_size: int) -> Union[np.ndarray, torch.Tensor]:
    """`(H, W, C) -> (H/P * W/P, P * P * C)` for a numpy array or torch tensor of any dtype."""
    p = patch_size
    h, w, c = pixels.shape
    if h % p or w % p:
        raise ValueError(f"patchify: image size {h}x{w} (HxW) is not divisible by the patch size {p}")
    grid = pixels.reshape(h // p, p, w // p, p, c)
    grid = grid.transpose(0, 2, 1, 3, 4) if isinstance(grid, np.ndarray) else grid.permute(0, 2, 1, 3, 4)
    return grid.reshape(-1, p * p * c)


def unpatchify_hwc(
    patches: torch.Tensor, grid_h: int, grid_w: int, patch_size: int, num_channels: int = 3
) -> torch.Tensor:
    """Exact inverse of `patchify_hwc`: `(grid_h * grid_w, P * P * C)` (or `(grid_h, grid_w, P * P * C)`) ->
    `(H, W, C)`."""
    p, c = patch_size, num_channels
    if patches.numel() != grid_h * grid_w * p * p * c:
        raise ValueError(
            f"unpatchify: {tuple(patches.shape)} does not hold a {grid_h}x{grid_w} grid of {p}x{p}x{c} patches"
        )
    return patches.reshape(grid_h, grid_w, p, p, c).permute(0, 2, 1, 3, 4).reshape(grid_h * p, grid_w * p, c)


def patchify(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`(C, H, W) -> (H/P * W/P, P * P * C)` (`patchify_hwc` of the channels-last view)."""
    return patchify_hwc(image.permute(1, 2, 0), patch_size)


def unpatchify(patches: torch.Tensor, grid_h: int, grid_w: int, patch_size: int, num_channels: int = 3) -> torch.Tensor:
    """Exact inverse of `patchify`: `(grid_h * grid_w, P * P * C)` (or `(grid_h, grid_w, P * P * C)`) -> `(C, H, W)`."""
    return unpatchify_hwc(patches, grid_h, grid_w, patch_size, num_channels).permute(2, 0, 1)


def pack_to_uint8_images(
    packed_pixel_values: torch.Tensor, grid_hw: Sequence[tuple[int, int]], patch_size: int, num_channels: int = 3
) -> list[torch.Tensor]:
    """The processor's resized uint8 images, recovered exactly from its packed float32 pixels: one `(H, W, C)`
    uint8 tensor per `(rows, cols)` grid."""
    lengths = [h * w for h, w in grid_hw]
    if sum(lengths) != packed_pixel_values.shape[0]:
        raise ValueError(
            f"the pack holds {packed_pixel_values.shape[0]} patches but the grids describe {sum(lengths)} "
            f"({list(grid_hw)})"
        )
    u8 = denormalize_to_uint8(packed_pixel_values)
    return [
        unpatchify_hwc(chunk, h, w, patch_size, num_channels) for chunk, (h, w) in zip(torch.split(u8, lengths), grid_hw)
    ]


def position_ids_extrapolate(grid_h: int, grid_w: int, max_num_patches_per_side: int) -> torch.Tensor:
    """BAGEL's default: patch (i, j) -> `i * M + j`, M = max_num_patches_per_side (never the image's own width)."""
    coords_h = torch.arange(0, grid_h)
    coords_w = torch.arange(0, grid_w)
    return (coords_h[:, None] * max_num_patches_per_side + coords_w).flatten()


def position_ids_interpolate(grid_h: int, grid_w: int, max_num_patches_per_side: int) -> torch.Tensor:
    """BAGEL's `get_flattened_position_ids_interpolate`, word for word, in float32: each row / column is mapped to
    the bucket of the M x M table that its fractional coordinate falls into (M = max_num_patches_per_side)."""
    m = max_num_patches_per_side
    boundaries = torch.arange(1 / m, 1.0, 1 / m, dtype=torch.float32)
    fractional_coords_h = torch.arange(0, 1 - 1e-6, 1 / grid_h, dtype=torch.float32)
    fractional_coords_w = torch.arange(0, 1 - 1e-6, 1 / grid_w, dtype=torch.float32)
    bucket_coords_h = torch.bucketize(fractional_coords_h, boundaries, right=True)
    bucket_coords_w = torch.bucketize(fractional_coords_w, boundaries, right=True)
    return (bucket_coords_h[:, None] * m + bucket_coords_w).flatten()


def build_cu_seqlens(lengths: Sequence[int]) -> torch.Tensor:
    """`[0, n1, n1 + n2, ...]` as int32 (what the varlen kernels take)."""
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + int(n))
    return torch.tensor(cu, dtype=torch.int32)


def concatenate_packs(packs: Sequence[Any]) -> BatchFeature:
    """Join packs the processor made separately (torch tensors, `return_tensors="pt"` or None) into one pack, equal
    to processing all their images in one call: positions are per image, so only the boundaries are rebuilt."""
    if not packs:
        raise ValueError("concatenate_packs: no packs given")
    grids = torch.cat([torch.as_tensor(p["image_grid_hw"]).reshape(-1, 2) for p in packs])
    lengths = (grids[:, 0] * grids[:, 1]).tolist()
    pixels = torch.cat([torch.as_tensor(p["packed_pixel_values"]) for p in packs])
    if pixels.shape[0] != sum(lengths):
        raise ValueError(f"concatenate_packs: {pixels.shape[0]} patches, but the grids describe {sum(lengths)}")
    return BatchFeature(
        data={
            "packed_pixel_values": pixels,
            "packed_flattened_position_ids": torch.cat(
                [torch.as_tensor(p["packed_flattened_position_ids"]) for p in packs]
            ),
            "cu_seqlens": build_cu_seqlens(lengths),
            "max_seqlen": max(lengths),
            "image_grid_hw": grids.to(torch.int64),
        }
    )


def _grid_from(inputs: Any) -> list[tuple[int, int]]:
    if isinstance(inputs, (dict, BatchFeature)) or hasattr(inputs, "keys"):
        if "image_grid_hw" not in inputs:
            raise KeyError("unpack: `inputs` has no 'image_grid_hw' entry (pass the processor's output)")
        inputs = inputs["image_grid_hw"]
    if isinstance(inputs, (torch.Tensor, np.ndarray)):
        inputs = inputs.tolist()
    grid = [tuple(int(v) for v in hw) for hw in inputs]
    if not grid or any(len(hw) != 2 or hw[0] <= 0 or hw[1] <= 0 for hw in grid):
        raise ValueError(f"unpack: image_grid_hw must be a non-empty list of positive (h, w) pairs, got {grid}")
    return grid


def unpack_features(features: torch.Tensor, grid_hw: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """Split packed `(N, C)` features into one `(h, w, C)` grid per image (views when `features` is contiguous)."""
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"unpack: expected packed features of shape (num_patches, channels), got {shape}")
    lengths = [h * w for h, w in grid_hw]
    if features.shape[0] != sum(lengths):
        raise ValueError(
            f"unpack: the features hold {features.shape[0]} patches but image_grid_hw describes {sum(lengths)} "
            f"({len(lengths)} images, grids {list(grid_hw)})"
        )
    return [
        chunk.reshape(h, w, features.shape[1]) for chunk, (h, w) in zip(torch.split(features, lengths), grid_hw)
    ]


def mean_pool_features(features: torch.Tensor, grid_hw: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The mean of each image's patch features in packed `(N, C)` features, computed and returned in float32 whatever
    the model's dtype: `(k, C)`, one row per image (one reduction per image: deterministic, no atomics)."""
    return torch.stack([fmap.flatten(0, 1).float().mean(0) for fmap in unpack_features(features, grid_hw)])


# --------------------------------------------------------------------------------------------------------------
# The processor's settings: ONE table
# --------------------------------------------------------------------------------------------------------------
# Upper bounds that keep one image's tensors to a sane size (BAGEL: 980 px, 14 px patches, a 70 x 70 table): larger
# settings are refused when the processor is built, never found out by a multi-GB allocation at the first call. With
# them no image the processor makes has more than about MAX_PIXELS pixels (the size rule's steps 2 and 3 keep every
# image within `max_pixels / img_num` and `max_image_size`, up to the stride rounding) nor more than
# MAX_PATCHES_PER_SIDE patches per side.
MAX_IMAGE_SIDE = 8192  # pixels: `max_image_size`, `min_image_size`
MAX_PATCH_SIZE = SIZE_FIELD_BOUNDS["patch_size"][1]  # the model's own bound (1024): `patch_size`, `image_stride`
MAX_PIXELS = 4096 * 4096  # `max_pixels`, and an image taken as it is (`do_resize=False`)
MAX_IMG_NUM = 1024  # `img_num` (it only divides the pixel budget: a larger value is a typo, not a setting)
# An input larger than this (PIL's own decompression-bomb limit, 2 * 89_478_485 pixels) is refused before it is
# widened by a conversion; RGB inputs need none, and 1-bit / 8-bit gray ones are first resized in their own mode.
MAX_INPUT_PIXELS = 178_956_970


class Setting(NamedTuple):
    """One processor setting: its type, default, accepted values and what it does."""

    type: type  # int (a positive integer), bool or str
    default: Any
    limit: Any  # int: the largest accepted value; str: the accepted values; bool: None
    doc: str


# THE declaration of the processor's settings: `__init__`, the TypedDict transformers 5.x routes `from_pretrained`
# kwargs through, the validation of every call's overrides, the saved keys and the class docstring all come from it.
SETTINGS: dict[str, Setting] = {
    "max_image_size": Setting(int, BAGEL_VIT_MAX_IMAGE_SIZE, MAX_IMAGE_SIDE,
                              "longest side after resizing (BAGEL's ViT `max_image_size`)."),
    "min_image_size": Setting(int, BAGEL_VIT_MIN_IMAGE_SIZE, MAX_IMAGE_SIDE,
                              "shortest side is scaled up to at least this (step 1 of the rule)."),
    "image_stride": Setting(int, BAGEL_VIT_IMAGE_STRIDE, MAX_PATCH_SIZE,
                            "both sides are snapped to multiples of it; must equal `patch_size`."),
    "max_pixels": Setting(int, BAGEL_MAX_PIXELS, MAX_PIXELS,
                          "pixel budget of one image (divided by `img_num`); BAGEL's is 14 * 14 * 9 * 1024."),
    "img_num": Setting(int, 1, MAX_IMG_NUM,
                       "BAGEL's `img_num` setting (divides the pixel budget) -- NOT the number of images in a call."),
    "patch_size": Setting(int, BAGEL_VIT_IMAGE_STRIDE, MAX_PATCH_SIZE, "the model's patch size."),
    "max_num_patches_per_side": Setting(int, BAGEL_MAX_NUM_PATCHES_PER_SIDE, MAX_PATCHES_PER_SIDE,
                                        "the model's `image_size // patch_size` (27 for a 384 px stock SigLIP); the "
                                        "position-id row stride."),
    "position_id_mode": Setting(str, "extrapolate", POSITION_ID_MODES,
                                '`"extrapolate"` (BAGEL\'s default: patch (i, j) -> `i * M + j`) or `"interpolate"` '
                                "(the image's grid is stretched over the whole M x M table)."),
    "bagel_interleaved_resize": Setting(bool, False, None,
                                        "first resize every image with BAGEL's VAE-side rule (max 1024, min 512, "
                                        "stride 16), as BAGEL's interleaved inference path does, then the ViT rule."),
    "do_resize": Setting(bool, True, None,
                         "`False` takes images as they are; both sides must then be multiples of `patch_size`."),
}  # fmt: skip
_PYTHON_TYPES = {int: "int", bool: "bool", str: "str"}

# The TypedDict transformers 5.x reads (`valid_kwargs`) to route `from_pretrained(..., key=value)` kwargs, built from
# the table (a class body would name every setting a second time).
SiglipNaViTImagesKwargs = types.new_class(
    "SiglipNaViTImagesKwargs",
    (_ImagesKwargs,),
    {"total": False},
    lambda ns: ns.update(
        __annotations__={name: spec.type for name, spec in SETTINGS.items()},
        __doc__="Settings of `SiglipNaViTImageProcessor` (transformers 5.x routes `from_pretrained` kwargs through "
        "this); see `SETTINGS`.",
        __module__=__name__,
    ),
)


def _settings_docs() -> str:
    """The class docstring's `Args:` section, from the table."""
    lines = ["    Args:"]
    for name, spec in SETTINGS.items():
        default = f'"{spec.default}"' if spec.type is str else f"{spec.default:,}" if spec.type is int else spec.default
        bound = f", at most {spec.limit:,}" if spec.type is int else ""
        text = f"{name} (`{_PYTHON_TYPES[spec.type]}`, defaults to {default}{bound}): {spec.doc}"
        lines += textwrap.wrap(text, 116, initial_indent=" " * 8, subsequent_indent=" " * 12)
    return "\n".join(lines)


def _checked_setting(name: str, value: Any) -> Any:
    """`value` of setting `name`, checked against the table (a ValueError naming the setting otherwise)."""
    spec = SETTINGS[name]
    if spec.type is int:
        if not isinstance(value, Integral) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"SiglipNaViTImageProcessor: `{name}` must be a positive integer, got {value!r}.")
        if value > spec.limit:
            raise ValueError(
                f"SiglipNaViTImageProcessor: `{name}` = {value} is more than the supported {spec.limit} "
                "(BAGEL's tower: 980 px images, 14 px patches, a 70 x 70 position table)."
            )
        return int(value)
    if spec.type is bool:
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"SiglipNaViTImageProcessor: `{name}` must be True or False, got {value!r}.")
        return bool(value)
    if not isinstance(value, str) or value not in spec.limit:  # (an array would compare element by element)
        raise ValueError(f"SiglipNaViTImageProcessor: `{name}` must be one of {spec.limit}, got {value!r}.")
    return value


def _check_setting_relations(s: dict) -> None:
    """The checks between settings (each one already checked on its own): a ValueError naming them."""
    if s["image_stride"] != s["patch_size"]:
        raise ValueError(
            f"SiglipNaViTImageProcessor: `image_stride` ({s['image_stride']}) must equal `patch_size` "
            f"({s['patch_size']}): the resize rule snaps both sides to multiples of the stride, and the model "
            "cuts them into patch_size patches."
        )
    if not s["do_resize"]:
        return
    longest = bagel_fit(s["max_image_size"], s["image_stride"]) // s["patch_size"]
    if longest > MAX_PATCHES_PER_SIDE:
        raise ValueError(
            f"SiglipNaViTImageProcessor: `max_image_size` {s['max_image_size']} with `patch_size` "
            f"{s['patch_size']} gives up to {longest} patches per side, more than the supported "
            f"{MAX_PATCHES_PER_SIDE}."
        )
    if s["position_id_mode"] == "extrapolate" and longest > s["max_num_patches_per_side"]:
        raise ValueError(
            f"SiglipNaViTImageProcessor: `max_image_size` {s['max_image_size']} gives up to {longest} "
            f"patches per side, more than `max_num_patches_per_side` ({s['max_num_patches_per_side']}, the "
            "model's image_size // patch_size) allows in 'extrapolate' mode. Set max_image_size <= "
            f"{s['max_num_patches_per_side'] * s['patch_size']} (e.g. 378 for a 384 px SigLIP)."
        )


def _check_grid(width: int, height: int, index: int, s: dict) -> None:
    """A `width x height` image fits the position table in 'extrapolate' mode (a ValueError naming it otherwise)."""
    grid_h, grid_w = height // s["patch_size"], width // s["patch_size"]
    m = s["max_num_patches_per_side"]
    if s["position_id_mode"] == "extrapolate" and (grid_h > m or grid_w > m):
        raise ValueError(
            f"image {index}: its {grid_h}x{grid_w} patch grid exceeds the model's {m}x{m} position table "
            "('extrapolate' mode); resize it smaller or use position_id_mode='interpolate'."
        )


def _check_as_is(width: int, height: int, index: int, s: dict) -> None:
    """An image taken as it is (`do_resize=False`) can be cut into patches and is not too large, checked before it is
    converted."""
    p = s["patch_size"]
    if width % p or height % p:
        raise ValueError(
            f"image {index}: with do_resize=False both sides must be multiples of patch_size {p}, got "
            f"{width}x{height} (WxH). Resize or crop it first, or leave do_resize=True."
        )
    _check_grid(width, height, index, s)
    if width * height > MAX_PIXELS or max(width, height) // p > MAX_PATCHES_PER_SIDE:
        raise ValueError(
            f"image {index}: with do_resize=False it is used as it is, and {width}x{height} (WxH) = "
            f"{width * height:,} pixels ({height // p}x{width // p} patches) is more than the supported "
            f"{MAX_PIXELS:,} pixels and {MAX_PATCHES_PER_SIDE} patches per side. Resize it first, or leave "
            "do_resize=True."
        )


def _is_plain_gray(image: PIL.Image.Image) -> bool:
    """A 1-bit or 8-bit gray image without a transparency entry: BAGEL's RGB rule converts it channel by channel, so
    resizing it before the conversion gives the same pixels."""
    return image.mode in ("1", "L") and image.info.get("transparency", None) is None


# --------------------------------------------------------------------------------------------------------------
# The processor
# --------------------------------------------------------------------------------------------------------------
class SiglipNaViTImageProcessor(BaseImageProcessor):
    r"""
    Turns one image or a list of images into ONE packed batch for `SiglipVisionModel`, with BAGEL's ViT transform.

    Per image: RGB conversion (`to_rgb_pil`, BAGEL's rule), BAGEL's size rule (`bagel_resize_size`) and ONE PIL
    bicubic resize of the original image, float32 `[-1, 1]` normalisation, `patchify`, position ids. The call
    returns the model's forward arguments:

    - `packed_pixel_values`: float32 `(N, P * P * 3)`, every image's patches, image after image;
    - `packed_flattened_position_ids`: int64 `(N,)`;
    - `cu_seqlens`: int32 `(k + 1,)`, `[0, n1, n1 + n2, ...]`;
    - `max_seqlen`: the longest image's patch count (0-d int64 tensor with `return_tensors="pt"`, else an int);
    - `image_grid_hw`: int64 `(k, 2)`, each image's patch rows and columns.

    `unpack(features, inputs)` splits the model's packed output back into one `(h, w, C)` map per image;
    `mean_pool(features, inputs)` gives each image's mean feature, float32 `(k, C)`.

    Every setting can also be overridden for one call: `processor(images, max_pixels=..., return_tensors="pt")`.
    The settings (one line each, from `SETTINGS`, the one table they are declared in) follow.
    """

    model_input_names = [
        "packed_pixel_values",
        "packed_flattened_position_ids",
        "cu_seqlens",
        "max_seqlen",
        "image_grid_hw",
    ]
    valid_kwargs = SiglipNaViTImagesKwargs

    def __init__(self, **kwargs: Any):
        # Keys the saved JSON carries for transformers' bookkeeping; never settings of ours.
        kwargs.pop("image_processor_type", None)
        settings = {name: kwargs.pop(name, spec.default) for name, spec in SETTINGS.items()}
        super().__init__(**kwargs)
        for name, value in settings.items():
            setattr(self, name, value)
        self._resolve_settings({})

    # ---- settings --------------------------------------------------------------------------------------------
    def _resolve_settings(self, overrides: dict) -> dict:
        """This processor's settings with one call's `overrides`, validated (every call: transformers 4.x sets
        `from_pretrained` kwargs as attributes after `__init__`)."""
        unknown = sorted(set(overrides) - set(SETTINGS))
        if unknown:
            raise TypeError(
                f"SiglipNaViTImageProcessor got unexpected keyword argument(s) {unknown}; valid: "
                f"{', '.join(SETTINGS)}, return_tensors."
            )
        s = {name: getattr(self, name) for name in SETTINGS}
        s.update({k: v for k, v in overrides.items() if v is not None})
        s = {name: _checked_setting(name, value) for name, value in s.items()}
        _check_setting_relations(s)
        return s

    @classmethod
    def from_dict(cls, image_processor_dict: dict[str, Any], **kwargs):
        """As transformers' `from_dict`, then validate: transformers 4.x applies `from_pretrained(..., key=value)`
        kwargs with `setattr` after `__init__`, so a bad override would otherwise surface only at the first call."""
        result = super().from_dict(image_processor_dict, **kwargs)
        processor = result[0] if isinstance(result, tuple) else result
        processor._resolve_settings({})
        return result

    @classmethod
    def settings_for_model(cls, config: Any, template: Optional[dict] = None) -> dict[str, Any]:
        """The settings (a `preprocessor_config.json` dict, no `auto_map`) that fit a model `config`: `template`'s
        (default: BAGEL's ViT transform, this class's defaults) with the model's geometry filled in.

        patch_size / image_stride / max_num_patches_per_side / max_image_size always follow the model. The size
        budget (min_image_size = min(224, image_size), max_pixels = min(1_806_336, image_size**2)) is recomputed only
        when the template was written for another geometry: for BAGEL's own 980 px / 14 px tower the template's BAGEL
        values stay (BAGEL divides max_pixels = 1_806_336 by img_num, so lowering it would change results for
        img_num > 1).
        """
        defaults = {name: spec.default for name, spec in SETTINGS.items()}
        d = dict(template) if template is not None else dict(defaults)
        # no "image_processor_type": auto_map alone selects the class, and with that key transformers 4.49 warns
        # about a "slow" image processor on every load
        for bookkeeping in ("image_processor_type", "auto_map"):
            d.pop(bookkeeping, None)
        image_size, patch_size = int(config.image_size), int(config.patch_size)
        same_geometry = (d.get("max_image_size"), d.get("patch_size")) == (image_size, patch_size)
        if not same_geometry or "min_image_size" not in d or "max_pixels" not in d:
            d["min_image_size"] = min(defaults["min_image_size"], image_size)
            d["max_pixels"] = min(defaults["max_pixels"], image_size**2)
        d["patch_size"] = patch_size
        d["image_stride"] = patch_size
        d["max_num_patches_per_side"] = image_size // patch_size
        d["max_image_size"] = image_size
        return d

    def to_dict(self) -> dict[str, Any]:
        """The saved settings. `image_processor_type` is left out on purpose: `auto_map` alone selects this class,
        and transformers 4.x's AutoImageProcessor warns about "slow" processors whenever that key is present."""
        output = super().to_dict()
        output.pop("image_processor_type", None)
        output.pop("_valid_kwargs_names", None)
        return output

    # ---- images -> pack --------------------------------------------------------------------------------------
    @staticmethod
    def _as_image_list(images: Any) -> list:
        if images is None:
            raise ValueError("SiglipNaViTImageProcessor: no images given (pass `images=`).")
        if isinstance(images, (list, tuple)):
            if len(images) == 0:
                raise ValueError("SiglipNaViTImageProcessor: `images` is an empty list; pass at least one image.")
            for i, image in enumerate(images):
                if isinstance(image, (list, tuple)):
                    raise TypeError(
                        f"image {i}: nested lists are not supported; pass one flat list of images (one pack)."
                    )
            return list(images)
        # a 4-D array / tensor is a batch of same-size images
        if isinstance(images, np.ndarray) and images.ndim == 4:
            if images.shape[0] == 0:
                raise ValueError("SiglipNaViTImageProcessor: `images` is an empty batch (0 images).")
            return list(images)
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            if images.shape[0] == 0:
                raise ValueError("SiglipNaViTImageProcessor: `images` is an empty batch (0 images).")
            return list(images.unbind(0))
        return [images]

    @staticmethod
    def _vae_size(width: int, height: int) -> tuple[int, int]:
        """BAGEL's VAE-side size, the first resize of `bagel_interleaved_resize`."""
        return bagel_resize_size(
            width, height, BAGEL_VAE_MAX_IMAGE_SIZE, BAGEL_VAE_MIN_IMAGE_SIZE, BAGEL_VAE_IMAGE_STRIDE,
            BAGEL_VAE_MAX_PIXELS, 1,
        )  # fmt: skip

    @staticmethod
    def _vit_size(width: int, height: int, s: dict) -> tuple[int, int]:
        return bagel_resize_size(
            width, height, s["max_image_size"], s["min_image_size"], s["image_stride"], s["max_pixels"], s["img_num"]
        )

    def patch_grid(self, width: int, height: int, **kwargs) -> tuple[int, int]:
        """The `(grid_h, grid_w)` patch grid a `width x height` image gets, without decoding or resizing it (e.g. to
        plan token-budget batches from image headers). `kwargs`: one-call setting overrides, as in `preprocess`."""
        s = self._resolve_settings(kwargs)
        if s["do_resize"]:
            if s["bagel_interleaved_resize"]:
                width, height = self._vae_size(width, height)
            width, height = self._vit_size(width, height, s)
        return height // s["patch_size"], width // s["patch_size"]

    def max_patches_per_image(self, **kwargs) -> Optional[int]:
        """The most patches any one image can get with these settings (None with do_resize=False): the resize rule
        leaves every side at most `fit(max_image_size)` (its last step scales the long side to exactly that)."""
        s = self._resolve_settings(kwargs)
        if not s["do_resize"]:
            return None
        side = bagel_fit(s["max_image_size"], s["image_stride"]) // s["patch_size"]
        return side * side

    concatenate_packs = staticmethod(concatenate_packs)
    with_image_index = staticmethod(with_image_index)

    def _resized(self, image: PIL.Image.Image, s: dict) -> PIL.Image.Image:
        """`image` resized by the size rule (after BAGEL's VAE-side resize with `bagel_interleaved_resize`)."""
        if s["bagel_interleaved_resize"]:
            image = resize_bicubic(image, *self._vae_size(*image.size))
        return resize_bicubic(image, *self._vit_size(*image.size, s))

    def _image_to_uint8(self, image: Any, index: int, s: dict) -> np.ndarray:
        """One input -> its resized (H, W, 3) uint8 pixels. Nothing is widened before it is known to fit: arrays
        above MAX_INPUT_PIXELS are refused by `to_pil`, PIL images that need a conversion here; an image taken as it is
        (`do_resize=False`) is checked before it is converted; a huge 1-bit or 8-bit gray image is resized in its own
        mode first (exact: BAGEL's convert-then-resize gives the same pixels, each RGB channel being the gray one)."""
        pil = to_pil(image, index)
        if not s["do_resize"]:
            _check_as_is(pil.width, pil.height, index, s)
            return np.asarray(to_rgb_pil(pil, index))
        if pil.width * pil.height > MAX_INPUT_PIXELS and _is_plain_gray(pil):
            gray = pil if pil.mode == "L" else pil.convert("L")  # "1" -> 0 / 255, as its convert("RGB") does
            pil = to_rgb_pil(self._resized(gray, s), index)
        else:
            if pil.mode != "RGB" or pil.info.get("transparency", None) is not None:  # a conversion: never when huge
                _check_input_pixels(pil.width, pil.height, index, f"a PIL mode {pil.mode!r} image")
            pil = self._resized(to_rgb_pil(pil, index), s)
        _check_grid(pil.width, pil.height, index, s)
        return np.asarray(pil)

    def preprocess(self, images: Any = None, return_tensors: Optional[str] = None, **kwargs) -> BatchFeature:
        """Preprocess one image or a list of images into one pack. See the class docstring for the outputs.

        Args:
            images: a PIL image, a numpy array `(H, W[, C])`, a torch tensor `([C,] H, W)`, a list of them, or a 4-D
                array / tensor holding a batch of same-size images.
            return_tensors (`str`, *optional*): `"pt"` (torch tensors; `max_seqlen` a 0-d tensor), `"np"` (numpy),
                or `None` (torch tensors, `max_seqlen` a Python int).
            **kwargs: one-call overrides of the settings (see the class docstring).
        """
        if return_tensors is not None and str(getattr(return_tensors, "value", return_tensors)) not in ("pt", "np"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        return_tensors = None if return_tensors is None else str(getattr(return_tensors, "value", return_tensors))
        s = self._resolve_settings(kwargs)
        image_list = self._as_image_list(images)

        p = s["patch_size"]
        patches, grids = [], []
        for index, image in enumerate(image_list):
            try:  # every failure names its image (e.g. PIL's "image file is truncated", a closed image)
                pixels = self._image_to_uint8(image, index, s)
            except _IMAGE_ERRORS as err:
                named = with_image_index(err, index)
                if named is err:
                    raise
                raise named from err
            grids.append((pixels.shape[0] // p, pixels.shape[1] // p))
            patches.append(patchify_hwc(pixels, p))
        packed_u8 = patches[0] if len(patches) == 1 else np.concatenate(patches)
        packed_pixel_values = normalize_uint8(packed_u8)

        position_fn = position_ids_extrapolate if s["position_id_mode"] == "extrapolate" else position_ids_interpolate
        m = s["max_num_patches_per_side"]
        position_ids = torch.cat([position_fn(h, w, m) for h, w in grids]).to(torch.int64)
        lengths = [h * w for h, w in grids]
        data = {
            "packed_pixel_values": packed_pixel_values,
            "packed_flattened_position_ids": position_ids,
            "cu_seqlens": build_cu_seqlens(lengths),
            "max_seqlen": max(lengths),
            "image_grid_hw": torch.tensor(grids, dtype=torch.int64),
        }
        if return_tensors == "pt":
            data["max_seqlen"] = torch.tensor(data["max_seqlen"], dtype=torch.int64)
        elif return_tensors == "np":
            data = {k: (v.numpy() if isinstance(v, torch.Tensor) else np.int64(v)) for k, v in data.items()}
        return BatchFeature(data=data)

    def __call__(self, images: Any = None, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    # ---- pack -> per-image maps ------------------------------------------------------------------------------
    def unpack(
        self,
        features: Union[torch.Tensor, Sequence[torch.Tensor]],
        inputs: Any,
    ) -> Union[list[torch.Tensor], list[list[torch.Tensor]]]:
        """Split packed model outputs into one `(h, w, C)` map per image.

        Args:
            features: `last_hidden_state` (a packed `(N, C)` tensor), or a tuple / list of them (`hidden_states`).
            inputs: what this processor returned (anything with `"image_grid_hw"`), or the `(k, 2)` grid itself.

        Returns:
            a list of `(h_i, w_i, C)` tensors (views of `features`), or for a tuple / list of tensors one such list
            per tensor. Raises if N does not match the grids.
        """
        grid = _grid_from(inputs)
        if isinstance(features, (tuple, list)):
            return [unpack_features(f, grid) for f in features]
        return unpack_features(features, grid)

    def mean_pool(self, features: torch.Tensor, inputs: Any) -> torch.Tensor:
        """Each image's mean patch feature, float32 `(k, C)` whatever the model's dtype (BAGEL's tower has no pooling
        head): what the pipeline's `pool=True` and the extractor's `pooled` tensor are. `features`: a packed `(N, C)`
        `last_hidden_state`; `inputs`: what this processor returned, or the `(k, 2)` grid itself."""
        return mean_pool_features(features, _grid_from(inputs))


SiglipNaViTImageProcessor.__doc__ = SiglipNaViTImageProcessor.__doc__.rstrip() + "\n\n" + _settings_docs() + "\n"
SiglipNaViTImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "SiglipNaViTImageProcessor",
    "bagel_fit",
    "bagel_apply_scale",
    "bagel_resize_size",
    "resize_bicubic",
    "to_pil",
    "to_rgb_pil",
    "normalize_uint8",
    "denormalize_to_uint8",
    "patchify",
    "unpatchify",
    "patchify_hwc",
    "unpatchify_hwc",
    "pack_to_uint8_images",
    "position_ids_extrapolate",
    "position_ids_interpolate",
    "build_cu_seqlens",
    "concatenate_packs",
    "unpack_features",
    "mean_pool_features",
    "with_image_index",
]
