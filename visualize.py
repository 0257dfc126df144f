# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Pictures of a SigLIP-NaViT pack: how the pack sees each image, what the features look like, where tokens sit.

Not one of the remote-code files (it is not downloaded with a model); it imports torch, numpy, PIL and the repo's
image processor (the one owner of the patch layout and pixel normalisation, through `siglip_navit_tools.repo_code`),
and draws with `PIL.ImageDraw` and PIL's built-in font (nothing is downloaded). Every picture function returns a
`PIL.Image.Image` (RGB) and, with `save_to=path`, also writes it as a PNG.

    inputs = processor(images=[a, b, c], return_tensors="pt")
    maps = processor.unpack(model(**inputs).last_hidden_state, inputs)
    grids = patch_grids(inputs)                                  # (a) patch grid + position ids per resized image
    views = pca_views(resized_images(inputs), maps)               # (b) PCA of the features, beside each image
    strip = pack_strip(inputs["cu_seqlens"], inputs["image_grid_hw"])          # (c) the packed sequence

Functions:

* `resized_images(inputs)`: the exact resized RGB images the model saw, recovered from the processor's output
  (the processor's `pack_to_uint8_images`: un-patchified and de-normalised; no geometry is repeated here).
* `draw_patch_grid(image, grid_hw, ...)` / `patch_grids(inputs)`: patch grid and position ids over each image.
* `pca_rgb(feature_map)`: the first three principal components of an `(h, w, C)` map as an `(h, w, 3)` uint8 image.
* `pca_rgb_joint(feature_maps)`: the same with one PCA fitted on all images, so colours compare across images.
* `pca_view(image, feature_map)`: the input beside its PCA picture, upsampled nearest-neighbour (patches stay sharp);
  `pca_views(images, feature_maps)` for a whole pack (joint colours by default).
* `pack_strip(cu_seqlens, grid_hw=None, labels=None)`: where each image's tokens sit in the packed sequence.
* `attention_grid(attentions, grid_hw, patch)` / `attention_map(image, attentions, patch=(row, col), layer=-1,
  image_index=0)`: where one patch looks (the model's eager `output_attentions`), as numbers and as a heat map.
* `hstack`, `vstack`, `save_png`: small layout and output helpers.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch

from siglip_navit_tools import repo_code

__all__ = [
    "PALETTE",
    "resized_images",
    "draw_patch_grid",
    "patch_grids",
    "pca_rgb",
    "pca_rgb_joint",
    "pca_view",
    "pca_views",
    "pack_strip",
    "attention_grid",
    "attention_map",
    "hstack",
    "vstack",
    "save_png",
]

PathLike = Union[str, Path]
ImageLike = Union[PIL.Image.Image, np.ndarray]
Color = tuple[int, int, int]

# Ten well-separated colours (the "tab10" set); neighbours in a pack never share a colour.
PALETTE: tuple[Color, ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
WHITE: Color = (255, 255, 255)
_NEAREST = PIL.Image.Resampling.NEAREST if hasattr(PIL.Image, "Resampling") else PIL.Image.NEAREST


# --------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------
def save_png(image: PIL.Image.Image, path: PathLike) -> Path:
    """Write `image` as a PNG (parent folders are created) and return the path."""
    if not isinstance(image, PIL.Image.Image):
        raise ValueError(f"save_png: `image` must be a PIL image, got {type(image).__name__}")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_png: `path` must end in .png, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=True)
    return path


def _finish(image: PIL.Image.Image, save_to: Optional[PathLike]) -> PIL.Image.Image:
    if save_to is not None:
        save_png(image, save_to)
    return image


def _font(size: int) -> PIL.ImageFont.ImageFont:
    """PIL's built-in font (no download); sized where this Pillow supports it (>= 10.1), else the fixed bitmap."""
    try:
        return PIL.ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size argument
        return PIL.ImageFont.load_default()


def _text_size(draw: PIL.ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _put_text(draw: PIL.ImageDraw.ImageDraw, left: float, top: float, text: str, font, fill) -> None:
    """Draw `text` with its inked box's top-left corner at (left, top) (no `anchor=`: bitmap fonts lack it)."""
    l, t, _, _ = draw.textbbox((0, 0), text, font=font)
    draw.text((round(left - l), round(top - t)), text, font=font, fill=fill)


_IMAGE_KINDS = "a PIL image, or an (H, W, 3) or (H, W) uint8 numpy array or torch tensor"


def _as_rgb(image: Any, name: str) -> PIL.Image.Image:
    """A PIL image (converted to RGB) or an (H, W, 3) / (H, W) uint8 array or tensor -> RGB PIL image."""
    if isinstance(image, PIL.Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"`{name}` is an empty image ({image.width}x{image.height})")
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8:  # checked first: .numpy() itself fails on bfloat16 with a TypeError
            raise ValueError(
                f"`{name}` must be {_IMAGE_KINDS}; got a {image.dtype} tensor of shape {tuple(image.shape)}"
            )
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
            raise ValueError(
                f"`{name}` must be {_IMAGE_KINDS}; got shape {image.shape} and dtype {image.dtype}"
            )
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"`{name}` is empty (shape {image.shape})")
        return PIL.Image.fromarray(image).convert("RGB")
    raise ValueError(f"`{name}` must be {_IMAGE_KINDS}; got {type(image).__name__}")


def _check_int(value: Any, name: str, least: int, allow_none: bool = False) -> Optional[int]:
    """An integer >= `least` (Python or numpy integers; not bool) -> int; ValueError otherwise."""
    if value is None and allow_none:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)) or value < least:
        kind = f"an integer >= {least}" + (" or None" if allow_none else "")
        raise ValueError(f"`{name}` must be {kind}, got {value!r}")
    return int(value)


def _as_int_list(values: Any, name: str) -> list[int]:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        if values.is_floating_point():
            raise ValueError(f"`{name}` must hold integers, got a {values.dtype} tensor")
        values = values.tolist()
    elif isinstance(values, np.ndarray):
        if not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"`{name}` must hold integers, got an array of dtype {values.dtype}")
        values = values.tolist()
    try:
        out = [int(v) for v in values]
    except (TypeError, ValueError) as err:
        raise ValueError(f"`{name}` must be a 1-D sequence of integers: {err}") from err
    for v, orig in zip(out, values):
        if isinstance(orig, float) and orig != v:
            raise ValueError(f"`{name}` must hold integers, got {orig!r}")
    return out


def _as_grid(grid_hw: Any, name: str = "grid_hw") -> tuple[int, int]:
    if isinstance(grid_hw, (torch.Tensor, np.ndarray)):
        grid_hw = grid_hw.tolist()
    try:
        h, w = (int(v) for v in grid_hw)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`{name}` must be a (rows, cols) pair of positive integers, got {grid_hw!r}") from err
    if h <= 0 or w <= 0:
        raise ValueError(f"`{name}` must be a (rows, cols) pair of positive integers, got {(h, w)}")
    return h, w


def _as_grid_list(grid_hw: Any, name: str = "grid_hw") -> list[tuple[int, int]]:
    if isinstance(grid_hw, (torch.Tensor, np.ndarray)):
        grid_hw = grid_hw.tolist()
    if not isinstance(grid_hw, (list, tuple)) or len(grid_hw) == 0:
        raise ValueError(f"`{name}` must be a non-empty (k, 2) list / tensor of (rows, cols), got {grid_hw!r}")
    return [_as_grid(hw, f"{name}[{i}]") for i, hw in enumerate(grid_hw)]


def _get(inputs: Any, key: str) -> Any:
    try:
        return inputs[key]
    except (KeyError, TypeError, IndexError) as err:
        raise ValueError(
            f"`inputs` must be the image processor's output (a mapping with {key!r}); it has no {key!r}"
        ) from err


def _cell_size(image: PIL.Image.Image, grid: tuple[int, int], patch_size: Optional[int], name: str) -> int:
    """The patch size in pixels of `image` for a `grid` of patches; ValueError unless the image IS that grid."""
    h, w = grid
    if patch_size is not None:
        if int(patch_size) <= 0:
            raise ValueError(f"`patch_size` must be a positive integer, got {patch_size!r}")
        p = int(patch_size)
        if image.size != (w * p, h * p):
            raise ValueError(
                f"`{name}` is {image.width}x{image.height} (WxH) but a {h}x{w} (rows x cols) grid of {p} px patches "
                f"is {w * p}x{h * p}; pass the processor's resized image (see resized_images())"
            )
        return p
    if image.width % w or image.height % h or image.width // w != image.height // h:
        raise ValueError(
            f"`{name}` is {image.width}x{image.height} (WxH), which is not a {h}x{w} (rows x cols) grid of square "
            "patches; pass the processor's resized image (see resized_images())"
        )
    return image.width // w


def _processing():
    """The repo's image-processing module: the patch layout and the pixel normalisation live there."""
    return repo_code.image_processing()


# --------------------------------------------------------------------------------------------------------------
# The images the model saw
# --------------------------------------------------------------------------------------------------------------
def resized_images(inputs: Any, num_channels: int = 3) -> list[PIL.Image.Image]:
    """The resized RGB images exactly as the model sees them, recovered from the image processor's output.

    Un-patchifies each image's rows of `packed_pixel_values` (patches row-major over the `image_grid_hw` grid;
    `(row, col, channel)` inside a patch) and undoes the `[-1, 1]` normalisation (`round((x + 1) / 2 * 255)`), which
    gives back the processor's uint8 pixels exactly for float32 inputs. The patch size is read off the feature
    width (`P * P * num_channels`).

    Args:
        inputs: the processor's output (a `BatchFeature` / dict with `packed_pixel_values` and `image_grid_hw`).
        num_channels: channels per pixel in the pack (3).

    Returns:
        one RGB `PIL.Image.Image` per image, each `(cols * P) x (rows * P)` pixels.
    """
    pixels = _get(inputs, "packed_pixel_values")
    grids = _as_grid_list(_get(inputs, "image_grid_hw"), "inputs['image_grid_hw']")
    pixels = torch.as_tensor(pixels).detach().cpu()
    if pixels.dim() != 2:
        raise ValueError(
            f"`inputs['packed_pixel_values']` must be (num_patches, P*P*C), got shape {tuple(pixels.shape)}"
        )
    dim = pixels.shape[1]
    p = int(round(math.sqrt(dim / num_channels)))
    if p * p * num_channels != dim:
        raise ValueError(
            f"`inputs['packed_pixel_values']` rows have {dim} values, not P*P*{num_channels} for any patch size P"
        )
    described = sum(h * w for h, w in grids)
    if described != pixels.shape[0]:
        raise ValueError(
            f"`inputs['packed_pixel_values']` holds {pixels.shape[0]} patches but `inputs['image_grid_hw']` "
            f"describes {described} ({grids})"
        )
    images = []
    for hwc in _processing().pack_to_uint8_images(pixels, grids, p, num_channels):
        array = hwc.numpy()
        images.append(PIL.Image.fromarray(array[..., 0] if num_channels == 1 else array).convert("RGB"))
    return images


# --------------------------------------------------------------------------------------------------------------
# (a) patch grid + position ids
# --------------------------------------------------------------------------------------------------------------
def draw_patch_grid(
    image: ImageLike,
    grid_hw: Union[Sequence[int], torch.Tensor],
    patch_size: Optional[int] = None,
    position_ids: Optional[Union[Sequence[int], torch.Tensor, np.ndarray]] = None,
    *,
    scale: int = 1,
    label_every: Optional[int] = None,
    line_color: Color = WHITE,
    save_to: Optional[PathLike] = None,
) -> PIL.Image.Image:
    """The patch grid (and optionally each patch's position id) drawn over a resized input image.

    Args:
        image: the resized image the model saw (see `resized_images`), a PIL image or an (H, W, 3) uint8 array;
            it must be exactly `grid_hw` patches (W = cols * P, H = rows * P).
        grid_hw: `(rows, cols)` of the image's patch grid (a row of the processor's `image_grid_hw`).
        patch_size: P in pixels; inferred from the image and the grid when omitted.
        position_ids: the image's `rows * cols` position ids, row-major (its slice of
            `packed_flattened_position_ids`); shown in the top-left corner of every `label_every`-th patch in both
            directions.
        scale: integer upscaling (nearest-neighbour) before drawing, so small patches have room for labels.
        label_every: label every k-th row and column of patches; default: the smallest k whose cells fit the
            longest label.
        line_color: RGB colour of the grid lines (drawn semi-transparent).
        save_to: also write the picture to this PNG path.

    Returns:
        an RGB image of `(W * scale) x (H * scale)` pixels.
    """
    img = _as_rgb(image, "image")
    grid = _as_grid(grid_hw)
    scale = _check_int(scale, "scale", 1)
    label_every = _check_int(label_every, "label_every", 1, allow_none=True)
    p = _cell_size(img, grid, patch_size, "image")
    h, w = grid
    ids = None
    if position_ids is not None:
        ids = _as_int_list(position_ids, "position_ids")
        if len(ids) != h * w:
            raise ValueError(
                f"`position_ids` has {len(ids)} entries but the {h}x{w} grid has {h * w} patches"
            )
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), _NEAREST)
    cell = p * scale

    overlay = PIL.Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = PIL.ImageDraw.Draw(overlay)
    line = (*line_color, 150)
    for j in range(w + 1):
        x = min(j * cell, img.width - 1)
        draw.line([(x, 0), (x, img.height - 1)], fill=line, width=1)
    for i in range(h + 1):
        y = min(i * cell, img.height - 1)
        draw.line([(0, y), (img.width - 1, y)], fill=line, width=1)

    if ids is not None:
        font = _font(max(8, min(12, cell - 2)))
        longest = max((str(v) for v in ids), key=len)
        tw, th = _text_size(draw, longest, font)
        if label_every is None:
            label_every = max(1, math.ceil((tw + 3) / cell), math.ceil((th + 3) / cell))
        for i in range(0, h, label_every):
            for j in range(0, w, label_every):
                text = str(ids[i * w + j])
                x, y = j * cell + 1, i * cell + 1
                bw, bh = _text_size(draw, text, font)
                if x + bw + 2 >= img.width or y + bh + 3 >= img.height:
                    continue  # no room inside the picture
                draw.rectangle([x, y, x + bw + 2, y + bh + 3], fill=(0, 0, 0, 150))
                _put_text(draw, x + 1, y + 1, text, font, (255, 255, 255, 255))
    out = PIL.Image.alpha_composite(img.convert("RGBA"), overlay).convert("RGB")
    return _finish(out, save_to)


def patch_grids(inputs: Any, *, scale: int = 1, save_to: Optional[PathLike] = None) -> list[PIL.Image.Image]:
    """`draw_patch_grid` for every image of a processor output, with its position ids.

    Args:
        inputs: the processor's output (`packed_pixel_values`, `packed_flattened_position_ids`, `cu_seqlens`,
            `image_grid_hw`).
        scale: see `draw_patch_grid`.
        save_to: also write the pictures side by side (`hstack`) to this PNG path.

    Returns:
        one picture per image (see `draw_patch_grid`).
    """
    images = resized_images(inputs)
    grids = _as_grid_list(_get(inputs, "image_grid_hw"), "inputs['image_grid_hw']")
    ids = _as_int_list(torch.as_tensor(_get(inputs, "packed_flattened_position_ids")).flatten(),
                       "inputs['packed_flattened_position_ids']")
    cu = _as_int_list(_get(inputs, "cu_seqlens"), "inputs['cu_seqlens']")
    if len(cu) != len(grids) + 1 or cu[-1] != len(ids):
        raise ValueError(
            f"`inputs['cu_seqlens']` {cu} does not describe {len(grids)} images over {len(ids)} position ids"
        )
    pictures = [
        draw_patch_grid(img, hw, position_ids=ids[cu[k] : cu[k + 1]], scale=scale)
        for k, (img, hw) in enumerate(zip(images, grids))
    ]
    if save_to is not None:
        save_png(hstack(pictures), save_to)
    return pictures


# --------------------------------------------------------------------------------------------------------------
# (b) PCA of patch features
# --------------------------------------------------------------------------------------------------------------
def _as_feature_map(feature_map: Any, name: str) -> tuple[torch.Tensor, float]:
    """-> (the map in float64, the relative precision of the values as given: eps of their float dtype, or of
    float64 for integers)."""
    if not isinstance(feature_map, (torch.Tensor, np.ndarray)):
        raise ValueError(f"`{name}` must be an (h, w, C) tensor or array, got {type(feature_map).__name__}")
    x = torch.as_tensor(feature_map).detach().cpu()
    if x.dim() != 3 or min(x.shape) == 0:
        raise ValueError(f"`{name}` must have shape (h, w, C) with no zero sizes, got {tuple(x.shape)}")
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"`{name}` must hold numbers, got dtype {x.dtype}")
    eps = torch.finfo(x.dtype if x.is_floating_point() else torch.float64).eps
    x = x.to(torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError(f"`{name}` contains NaN or infinite values")
    return x, eps


def _check_quantile(quantile: float) -> float:
    if not isinstance(quantile, (int, float)) or not 0.0 <= float(quantile) < 0.5:
        raise ValueError(f"`quantile` must be in [0, 0.5), got {quantile!r}")
    return float(quantile)


def _top_components(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values (k,) and right singular vectors (k, C), largest first, of a centred (n, C) float64 matrix,
    from the eigendecomposition of the smaller of the C x C covariance and the n x n Gram matrix (no n x C factor
    is ever built, as a full SVD would)."""
    n, c = x.shape
    if c <= n:
        lam, vecs = torch.linalg.eigh(x.T @ x)  # ascending
        lam, vh = lam.flip(0)[:k], vecs.flip(1)[:, :k].T
        return lam.clamp_min(0).sqrt(), vh
    lam, u = torch.linalg.eigh(x @ x.T)
    lam, u = lam.flip(0)[:k], u.flip(1)[:, :k]
    s = lam.clamp_min(0).sqrt()
    vh = (x.T @ u / torch.where(s > 0, s, torch.ones_like(s))).T  # rows with s == 0 are never used
    return s, vh


def _pca_uint8(x: torch.Tensor, quantile: float, eps: float) -> torch.Tensor:
    """(n, C) float64 -> (n, 3) uint8: centre, top components, sign rule, robust per-component scaling (see
    `pca_rgb`). `eps`: the relative precision of the values as given (their dtype's machine epsilon)."""
    n, c = x.shape
    raw_norm = torch.linalg.vector_norm(x)
    x = x - x.mean(dim=0, keepdim=True)
    out = torch.full((n, 3), 128.0, dtype=torch.float64)
    k = min(3, n, c)
    if k > 0 and x.abs().max() > 0:
        s, vh = _top_components(x, k)
        # "no variance": a singular value within the input's rounding error (each value is off by <= eps * |value|,
        # so by Weyl's inequality a direction the data does not have shows up at most at eps * ||x||_F), or within
        # what the float64 covariance / eigendecomposition can resolve
        tol = max(eps * raw_norm.item(), math.sqrt(max(n, c) * torch.finfo(torch.float64).eps)
                  * torch.linalg.vector_norm(x).item())
        # sign: the largest-|loading| entry of each component is positive
        signs = torch.sign(vh[torch.arange(k), vh.abs().argmax(dim=1)])
        signs[signs == 0] = 1.0
        comps = (x @ vh.T) * signs
        for i in range(k):
            if s[i] <= tol:
                continue  # no variance along this direction: stays grey
            col = comps[:, i]
            lo, hi = torch.quantile(col, quantile), torch.quantile(col, 1.0 - quantile)
            if hi - lo <= col.abs().max() * 1e-12:
                continue
            out[:, i] = ((col - lo) / (hi - lo)).clamp(0, 1) * 255.0
    return out.round().to(torch.uint8)


def pca_rgb(feature_map: Union[torch.Tensor, np.ndarray], *, quantile: float = 0.01) -> np.ndarray:
    """The first three principal components of an `(h, w, C)` feature map as an `(h, w, 3)` uint8 RGB image.

    The `h * w` feature vectors are centred and their principal components found in float64 (eigendecomposition
    of the C x C covariance, or of the n x n Gram matrix when there are fewer patches than channels); component k
    (k = 0, 1, 2) becomes channel k (R, G, B). Each component's sign is fixed deterministically (its loading
    vector's largest-|value| entry is made positive) and each is scaled to 0..255 independently with a robust
    min / max (the `quantile` and `1 - quantile` quantiles; values beyond are clipped). Components that do not
    exist (fewer than 3 patches or channels) or carry no variance are mid-grey (128); "no variance" means a
    singular value within the rounding error of the input's dtype (`eps * ||map||_F`: float32, bfloat16 and float16
    maps each get their own), or below what the float64 computation resolves.

    Args:
        feature_map: `(h, w, C)` tensor or array, e.g. one entry of `processor.unpack(...)`.
        quantile: the fraction clipped at each end of every component's range (0 <= quantile < 0.5).

    Returns:
        an `(h, w, 3)` uint8 numpy array.
    """
    q = _check_quantile(quantile)
    x, eps = _as_feature_map(feature_map, "feature_map")
    h, w, c = x.shape
    return _pca_uint8(x.reshape(h * w, c), q, eps).reshape(h, w, 3).numpy()


def pca_rgb_joint(
    feature_maps: Sequence[Union[torch.Tensor, np.ndarray]], *, quantile: float = 0.01
) -> list[np.ndarray]:
    """`pca_rgb` with ONE PCA fitted on the patches of all maps together, so a colour means the same feature in every
    image (the per-image `pca_rgb` picks each image's own axes and colours).

    Args:
        feature_maps: `(h_i, w_i, C)` maps with the same C (e.g. the list `processor.unpack(...)` returns).
        quantile: see `pca_rgb` (the range is taken over all patches).

    Returns:
        one `(h_i, w_i, 3)` uint8 array per map.
    """
    q = _check_quantile(quantile)
    if not isinstance(feature_maps, (list, tuple)) or not feature_maps:
        raise ValueError("`feature_maps` must be a non-empty list of (h, w, C) maps")
    maps, epss = zip(*(_as_feature_map(m, f"feature_maps[{i}]") for i, m in enumerate(feature_maps)))
    channels = {m.shape[2] for m in maps}
    if len(channels) != 1:
        raise ValueError(f"`feature_maps` must share one channel count C, got {[m.shape[2] for m in maps]}")
    rgb = _pca_uint8(torch.cat([m.reshape(-1, m.shape[2]) for m in maps]), q, max(epss))
    sizes = [m.shape[0] * m.shape[1] for m in maps]
    return [part.reshape(m.shape[0], m.shape[1], 3).numpy() for part, m in zip(torch.split(rgb, sizes), maps)]


def _pca_panel(img: PIL.Image.Image, rgb: np.ndarray, gap: int, name: str, image_name: str) -> PIL.Image.Image:
    h, w = rgb.shape[:2]
    try:
        _cell_size(img, (h, w), None, image_name)
    except ValueError as err:
        raise ValueError(f"`{name}` is a {h}x{w} grid that does not match `{image_name}`: {err}") from None
    pca = PIL.Image.fromarray(rgb).resize(img.size, _NEAREST)
    return hstack([img, pca], gap=gap)


def _check_gap(gap: Any) -> int:
    return _check_int(gap, "gap", 0)


def pca_view(
    image: ImageLike,
    feature_map: Union[torch.Tensor, np.ndarray],
    *,
    gap: int = 8,
    quantile: float = 0.01,
    save_to: Optional[PathLike] = None,
) -> PIL.Image.Image:
    """The input image side by side with the PCA picture of its features (`pca_rgb`), upsampled nearest-neighbour
    to the image's size so every patch stays a visible square.

    Args:
        image: the resized image the model saw (see `resized_images`); its size must be the feature map's `(h, w)`
            grid times the patch size.
        feature_map: `(h, w, C)` features of that image (one entry of `processor.unpack(...)`).
        gap: white pixels between the two panels.
        quantile: see `pca_rgb`.
        save_to: also write the picture to this PNG path.

    Returns:
        an RGB image of `(2 * W + gap) x H` pixels (W x H: the image's size).
    """
    img = _as_rgb(image, "image")
    gap = _check_gap(gap)
    return _finish(_pca_panel(img, pca_rgb(feature_map, quantile=quantile), gap, "feature_map", "image"), save_to)


def pca_views(
    images: Sequence[ImageLike],
    feature_maps: Sequence[Union[torch.Tensor, np.ndarray]],
    *,
    joint: bool = True,
    gap: int = 8,
    quantile: float = 0.01,
    save_to: Optional[PathLike] = None,
) -> list[PIL.Image.Image]:
    """`pca_view` for several images; with `joint=True` (default) the colours come from one PCA over all of them
    (`pca_rgb_joint`), so they can be compared across images.

    Args:
        images: the resized images (`resized_images(inputs)`).
        feature_maps: their `(h, w, C)` maps (`processor.unpack(...)`), in the same order.
        joint: one PCA for all images (True) or one per image (False, as `pca_view`).
        gap, quantile: see `pca_view`.
        save_to: also write the pictures one below the other (`vstack`) to this PNG path.

    Returns:
        one `(2 * W_i + gap) x H_i` picture per image.
    """
    if not isinstance(images, (list, tuple)) or not isinstance(feature_maps, (list, tuple)):
        raise ValueError("`images` and `feature_maps` must be lists")
    if len(images) != len(feature_maps) or not images:
        raise ValueError(f"got {len(images)} `images` and {len(feature_maps)} `feature_maps`; pass one map per image")
    gap = _check_gap(gap)
    imgs = [_as_rgb(im, f"images[{i}]") for i, im in enumerate(images)]
    if joint:
        rgbs = pca_rgb_joint(feature_maps, quantile=quantile)
    else:
        rgbs = [pca_rgb(m, quantile=quantile) for m in feature_maps]
    pictures = [
        _pca_panel(im, rgb, gap, f"feature_maps[{i}]", f"images[{i}]") for i, (im, rgb) in enumerate(zip(imgs, rgbs))
    ]
    if save_to is not None:
        save_png(vstack(pictures, gap=gap), save_to)
    return pictures


# --------------------------------------------------------------------------------------------------------------
# (c) the pack
# --------------------------------------------------------------------------------------------------------------
def _segment_edges(cu: Sequence[int], width: int) -> list[int]:
    """Column edges of the pack strip's segments: `round(cu[k] * width / N)`, moved (right, then left near the end)
    just enough that every image gets at least one column (needs `width >= len(cu) - 1`): edges are strictly
    increasing, 0 first and `width` last."""
    total, k = cu[-1], len(cu) - 1
    xs = [int(round(c * width / total)) for c in cu]
    for i in range(1, k + 1):  # push right past tiny segments...
        xs[i] = max(xs[i], xs[i - 1] + 1)
    xs[k] = width
    for i in range(k - 1, 0, -1):  # ... and back left where that ran past the end
        xs[i] = min(xs[i], xs[i + 1] - 1)
    return xs


def _place_labels(centres: Sequence[float], widths: Sequence[int], width: int, gap: int = 3) -> list[Optional[int]]:
    """Left edges for labels centred at `centres` (clamped inside `[0, width)`), or None where a label would come
    within `gap` px of one already placed (or is wider than the picture). The LAST label is placed first (the
    pack's total length is always shown), then the others from left to right."""
    lefts: list[Optional[int]] = [None] * len(centres)
    placed: list[tuple[int, int]] = []
    order = [len(centres) - 1, *range(len(centres) - 1)] if centres else []
    for i in order:
        if widths[i] > width:
            continue
        left = int(min(max(0, centres[i] - widths[i] // 2), width - widths[i]))
        right = left + widths[i]
        if all(right + gap < a or left > b + gap for a, b in placed):
            lefts[i] = left
            placed.append((left, right))
    return lefts


def pack_strip(
    cu_seqlens: Union[Sequence[int], torch.Tensor, np.ndarray],
    grid_hw: Optional[Union[Sequence[Sequence[int]], torch.Tensor, np.ndarray]] = None,
    labels: Optional[Sequence[str]] = None,
    *,
    width: int = 800,
    height: int = 72,
    save_to: Optional[PathLike] = None,
) -> PIL.Image.Image:
    """A strip picture of one pack: where each image's tokens sit in the packed sequence.

    Image k's tokens `[cu_seqlens[k], cu_seqlens[k+1])` fill the columns `[x_k, x_{k+1})` of a horizontal bar in
    colour `PALETTE[k % 10]`, where `x_k = round(cu_seqlens[k] * width / N)` (N = `cu_seqlens[-1]`), so colour
    changes sit at the scaled `cu_seqlens` -- except that every image gets at least one column: an image shorter
    than about N / width tokens still shows, and the edges after it move right (or, near the end, left) just
    enough to make room. So every image is visible and neighbours never share a colour. Labels (above the bar) and
    the `cu_seqlens` values (below it) are drawn only where they fit, N first (so it is always there); row
    `height // 2` is always inside the bar and holds nothing but segment colours.

    Args:
        cu_seqlens: `[0, n1, n1 + n2, ..., N]` (the processor's / model's `cu_seqlens`).
        grid_hw: optional `(k, 2)` patch grids; each must hold its image's token count. Added to the labels.
        labels: optional one label per image (default `"image k"`).
        width, height: picture size in pixels (width >= the number of images, height >= 8; text needs
            height >= 48).
        save_to: also write the picture to this PNG path.

    Returns:
        an RGB image of `width x height` pixels.
    """
    cu = _as_int_list(cu_seqlens, "cu_seqlens")
    if len(cu) < 2 or cu[0] != 0 or any(b <= a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"`cu_seqlens` must be [0, n1, n1+n2, ...], strictly increasing, >= 2 entries; got {cu}")
    k = len(cu) - 1
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    grids = None
    if grid_hw is not None:
        grids = _as_grid_list(grid_hw)
        if len(grids) != k:
            raise ValueError(f"`grid_hw` has {len(grids)} grids but `cu_seqlens` describes {k} images")
        for i, ((gh, gw), n) in enumerate(zip(grids, lengths)):
            if gh * gw != n:
                raise ValueError(
                    f"`grid_hw[{i}]` = {gh}x{gw} = {gh * gw} patches, but `cu_seqlens` gives image {i} {n}"
                )
    if labels is not None:
        labels = [str(t) for t in labels]
        if len(labels) != k:
            raise ValueError(f"`labels` has {len(labels)} entries but `cu_seqlens` describes {k} images")
    width, height = _check_int(width, "width", 2), _check_int(height, "height", 8)
    if width < k:
        raise ValueError(f"`width` = {width} px is too narrow for {k} images (one column each); pass width >= {k}")

    xs = _segment_edges(cu, width)
    text = height >= 48
    band = (height - 4) // 3 if text else 0
    top, bottom = (band + 2, height - band - 2) if text else (0, height)
    pic = PIL.Image.new("RGB", (width, height), WHITE)
    draw = PIL.ImageDraw.Draw(pic)
    for i in range(k):
        draw.rectangle([xs[i], top, xs[i + 1] - 1, bottom - 1], fill=PALETTE[i % len(PALETTE)])
    if text:
        font = _font(max(8, min(12, band - 2)))
        for i in range(k):
            base = labels[i] if labels is not None else f"image {i}"
            options = [base]
            if grids is not None:
                options.insert(0, f"{base}: {grids[i][0]}x{grids[i][1]} = {lengths[i]}")
            else:
                options.insert(0, f"{base}: {lengths[i]}")
            options.append(str(i))
            room = xs[i + 1] - xs[i]
            for option in options:
                tw, th = _text_size(draw, option, font)
                if tw + 2 <= room:
                    _put_text(draw, (xs[i] + xs[i + 1] - tw) / 2, top - 3 - th, option, font, (0, 0, 0))
                    break
        ticks = [min(x, width - 1) for x in xs]
        for x_tick in ticks:
            draw.line([(x_tick, bottom), (x_tick, bottom + 3)], fill=(0, 0, 0))
        # the cu_seqlens values under the bar, where they do not overlap (N first, so it is always there)
        values = [str(c) for c in cu]
        lefts = _place_labels(ticks, [_text_size(draw, v, font)[0] for v in values], width)
        for value, left in zip(values, lefts):
            if left is not None:
                _put_text(draw, left, bottom + 5, value, font, (0, 0, 0))
    return _finish(pic, save_to)


# --------------------------------------------------------------------------------------------------------------
# (d) attention maps
# --------------------------------------------------------------------------------------------------------------
# The "hot" colour scale, black -> red -> yellow -> white: brightness (R + G + B) rises strictly with the value.
_HOT_STOPS = np.array([[0, 0, 0], [230, 0, 0], [255, 210, 0], [255, 255, 255]], dtype=np.float64)
MARKER: Color = (0, 200, 255)


def _hot_rgb(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB on the hot scale (piecewise linear between `_HOT_STOPS`)."""
    x = np.clip(values, 0.0, 1.0) * (len(_HOT_STOPS) - 1)
    low = np.minimum(np.floor(x).astype(np.int64), len(_HOT_STOPS) - 2)
    t = (x - low)[..., None]
    return np.round(_HOT_STOPS[low] * (1 - t) + _HOT_STOPS[low + 1] * t).astype(np.uint8)


def _pick(items: Sequence[Any], index: Any, name: str, what: str) -> Any:
    """`items[index]` for an integer index in [-len, len); ValueError naming the argument otherwise."""
    n = len(items)
    if not isinstance(index, numbers.Integral) or isinstance(index, (bool, np.bool_)) or not -n <= index < n:
        raise ValueError(f"`{name}` must be an integer in [-{n}, {n}) ({n} {what}), got {index!r}")
    return items[int(index)]


def _select_map(attentions: Any, layer: Any, image_index: Any) -> torch.Tensor:
    """`attentions[layer][image_index]` as a float64 `(heads, n, n)` CPU tensor; ValueError naming what is wrong."""
    attentions = getattr(attentions, "attentions", attentions)  # the model output itself is fine too
    if not isinstance(attentions, (list, tuple)) or not attentions:
        raise ValueError(
            "`attentions` must be the model's `output.attentions` (a tuple per layer of per-image maps), got "
            f"{type(attentions).__name__}: run the model with attn_implementation='eager' and output_attentions=True"
        )
    maps = _pick(attentions, layer, "layer", "layers")
    if not isinstance(maps, (list, tuple)):
        raise ValueError(f"`attentions[{layer}]` must be a list of per-image maps, got {type(maps).__name__}")
    probs = _pick(maps, image_index, "image_index", "images in the pack")
    if not isinstance(probs, (torch.Tensor, np.ndarray)) or probs.ndim != 3 or probs.shape[1] != probs.shape[2]:
        raise ValueError(f"`attentions[{layer}][{image_index}]` must be a (heads, n, n) map, got {probs!r:.80}")
    return torch.as_tensor(probs).detach().cpu().to(torch.float64)


def attention_grid(
    attentions: Any,
    grid_hw: Union[Sequence[int], torch.Tensor],
    patch: tuple[int, int],
    *,
    layer: int = -1,
    image_index: int = 0,
    head: Optional[int] = None,
) -> np.ndarray:
    """Where one patch looks: its row of an image's attention map, as a `(rows, cols)` float64 grid.

    Args:
        attentions: the model's `output.attentions` (run with `attn_implementation="eager"` and
            `output_attentions=True`): one entry per layer, each a list of `(heads, n_i, n_i)` maps, one per image.
            The model output itself is accepted too.
        grid_hw: `(rows, cols)` of the image's patch grid (its row of the processor's `image_grid_hw`).
        patch: `(row, col)` of the query patch in that grid.
        layer: which layer (Python indexing: -1 is the last).
        image_index: which image of the pack (Python indexing).
        head: one attention head (Python indexing), or None for the mean over heads.

    Returns:
        the attention probabilities from `patch` to every patch of the image (they sum to 1), row-major.
    """
    probs = _select_map(attentions, layer, image_index)
    h, w = _as_grid(grid_hw)
    if probs.shape[1] != h * w:
        raise ValueError(
            f"`attentions[{layer}][{image_index}]` covers {probs.shape[1]} patches, not the {h * w} of `grid_hw` "
            f"{(h, w)}"
        )
    integral = isinstance(patch, (tuple, list)) and len(patch) == 2 and all(
        isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)) for v in patch
    )
    if not integral or not (0 <= patch[0] < h and 0 <= patch[1] < w):
        raise ValueError(f"`patch` must be a (row, col) pair of integers inside the {h}x{w} grid, got {patch!r}")
    rows = probs[:, patch[0] * w + patch[1]]  # (heads, n): what the query patch attends to, per head
    row = rows.mean(0) if head is None else _pick(rows, head, "head", "heads")
    return row.reshape(h, w).numpy()


def _grid_for(img: PIL.Image.Image, n: int) -> tuple[int, int]:
    """`(rows, cols)` of the square patches that tile `img` into `n` patches."""
    p = math.isqrt(img.width * img.height // n)
    if p <= 0 or img.width % p or img.height % p or (img.width // p) * (img.height // p) != n:
        raise ValueError(
            f"`image` is {img.width}x{img.height} (WxH), which is not a grid of {n} square patches (the map's "
            "size); pass the processor's resized image, or `grid_hw`"
        )
    return img.height // p, img.width // p


def attention_map(
    image: ImageLike,
    attentions: Any,
    patch: tuple[int, int],
    layer: int = -1,
    image_index: int = 0,
    *,
    head: Optional[int] = None,
    grid_hw: Optional[Union[Sequence[int], torch.Tensor]] = None,
    alpha: float = 0.6,
    scale: int = 1,
    save_to: Optional[PathLike] = None,
) -> PIL.Image.Image:
    """One patch's attention over its image: a heat map over the resized image, the query patch outlined.

    The colours use the "hot" scale (black, red, yellow, white) relative to the hottest patch (the grid of
    `attention_grid` divided by its maximum); each patch is one flat square (nearest-neighbour upsampling), and
    the query patch gets a `MARKER` (cyan) outline.

    Args:
        image: the resized image the model saw (`resized_images(inputs)[image_index]`).
        attentions, patch, layer, image_index, head: see `attention_grid` (head None: the mean over heads).
        grid_hw: the image's `(rows, cols)`; default: inferred from the image's size and the map's size.
        alpha: weight of the heat colours over the image, in [0, 1].
        scale: integer upscaling (nearest-neighbour), so small patches stay visible.
        save_to: also write the picture to this PNG path.

    Returns:
        an RGB image of `(W * scale) x (H * scale)` pixels (W x H: the image's size).
    """
    img = _as_rgb(image, "image")
    scale = _check_int(scale, "scale", 1)
    if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be a number in [0, 1], got {alpha!r}")
    if grid_hw is None:
        grid_hw = _grid_for(img, _select_map(attentions, layer, image_index).shape[1])
    grid = attention_grid(attentions, grid_hw, patch, layer=layer, image_index=image_index, head=head)
    cell = _cell_size(img, grid.shape, None, "image") * scale
    peak = grid.max()
    heat = PIL.Image.fromarray(_hot_rgb(grid / peak if peak > 0 else grid))
    size = (img.width * scale, img.height * scale)
    out = PIL.Image.blend(img.resize(size, _NEAREST), heat.resize(size, _NEAREST), float(alpha))
    (row, col), width = patch, max(1, cell // 8)
    box = [col * cell, row * cell, (col + 1) * cell - 1, (row + 1) * cell - 1]
    PIL.ImageDraw.Draw(out).rectangle(box, outline=MARKER, width=width)
    return _finish(out, save_to)


# --------------------------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------------------------
def hstack(images: Sequence[ImageLike], *, gap: int = 8, background: Color = WHITE) -> PIL.Image.Image:
    """Images side by side (top-aligned) on a `background` canvas, `gap` pixels apart."""
    return _stack(images, gap, background, horizontal=True)


def vstack(images: Sequence[ImageLike], *, gap: int = 8, background: Color = WHITE) -> PIL.Image.Image:
    """Images one below the other (left-aligned) on a `background` canvas, `gap` pixels apart."""
    return _stack(images, gap, background, horizontal=False)


def _stack(images: Sequence[ImageLike], gap: int, background: Color, horizontal: bool) -> PIL.Image.Image:
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError("`images` must be a non-empty list of images")
    gap = _check_gap(gap)
    imgs = [_as_rgb(im, f"images[{i}]") for i, im in enumerate(images)]
    if horizontal:
        size = (sum(im.width for im in imgs) + gap * (len(imgs) - 1), max(im.height for im in imgs))
    else:
        size = (max(im.width for im in imgs), sum(im.height for im in imgs) + gap * (len(imgs) - 1))
    canvas = PIL.Image.new("RGB", size, tuple(background))
    offset = 0
    for im in imgs:
        canvas.paste(im, (offset, 0) if horizontal else (0, offset))
        offset += (im.width if horizontal else im.height) + gap
    return canvas
