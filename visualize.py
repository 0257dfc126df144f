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

The helpers behind these (argument checks, text, stacking, the PCA and attention math, the pack strip's layout)
live in `siglip_navit_tools.pictures`; this module is the public face and draws the pictures.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence, Union

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

from siglip_navit_tools import repo_code
# the helpers keep a leading underscore here: they are not part of this module's public names
from siglip_navit_tools.pictures._draw import WHITE, Color, ImageLike, PathLike, save_png
from siglip_navit_tools.pictures._draw import NEAREST as _NEAREST
from siglip_navit_tools.pictures._draw import as_grid as _as_grid
from siglip_navit_tools.pictures._draw import as_grid_list as _as_grid_list
from siglip_navit_tools.pictures._draw import as_int_list as _as_int_list
from siglip_navit_tools.pictures._draw import as_rgb as _as_rgb
from siglip_navit_tools.pictures._draw import cell_size as _cell_size
from siglip_navit_tools.pictures._draw import check_gap as _check_gap
from siglip_navit_tools.pictures._draw import check_int as _check_int
from siglip_navit_tools.pictures._draw import finish as _finish
from siglip_navit_tools.pictures._draw import font as _font
from siglip_navit_tools.pictures._draw import get_input as _get
from siglip_navit_tools.pictures._draw import put_text as _put_text
from siglip_navit_tools.pictures._draw import stack as _stack
from siglip_navit_tools.pictures._draw import text_size as _text_size
from siglip_navit_tools.pictures.attention import attention_grid
from siglip_navit_tools.pictures.attention import grid_for as _grid_for
from siglip_navit_tools.pictures.attention import hot_rgb as _hot_rgb
from siglip_navit_tools.pictures.attention import select_map as _select_map
from siglip_navit_tools.pictures.pack import StripSpec as _StripSpec
from siglip_navit_tools.pictures.pack import label_options as _label_options
from siglip_navit_tools.pictures.pack import place_labels as _place_labels
from siglip_navit_tools.pictures.pack import segment_edges as _segment_edges
from siglip_navit_tools.pictures.pack import strip_spec as _strip_spec
from siglip_navit_tools.pictures.pca import pca_rgb, pca_rgb_joint

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
MARKER: Color = (0, 200, 255)  # the outline of the query patch in `attention_map`


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
    _draw_grid_lines(draw, grid, cell, img.size, line_color)
    if ids is not None:
        _draw_position_ids(draw, ids, grid, cell, img.size, label_every)
    out = PIL.Image.alpha_composite(img.convert("RGBA"), overlay).convert("RGB")
    return _finish(out, save_to)


def _draw_grid_lines(
    draw: PIL.ImageDraw.ImageDraw, grid: tuple[int, int], cell: int, size: tuple[int, int], line_color: Color
) -> None:
    """The patch boundaries, semi-transparent; the last line in each direction is kept inside the picture."""
    (h, w), (width, height) = grid, size
    line = (*line_color, 150)
    for j in range(w + 1):
        x = min(j * cell, width - 1)
        draw.line([(x, 0), (x, height - 1)], fill=line, width=1)
    for i in range(h + 1):
        y = min(i * cell, height - 1)
        draw.line([(0, y), (width - 1, y)], fill=line, width=1)


def _draw_position_ids(
    draw: PIL.ImageDraw.ImageDraw,
    ids: list[int],
    grid: tuple[int, int],
    cell: int,
    size: tuple[int, int],
    label_every: Optional[int],
) -> None:
    """Every `label_every`-th patch's position id on a dark box in its top-left corner, where it fits (default
    `label_every`: the smallest k whose cells fit the longest label)."""
    (h, w), (width, height) = grid, size
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
            if x + bw + 2 >= width or y + bh + 3 >= height:
                continue  # no room inside the picture
            draw.rectangle([x, y, x + bw + 2, y + bh + 3], fill=(0, 0, 0, 150))
            _put_text(draw, x + 1, y + 1, text, font, (255, 255, 255, 255))


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
# (b) PCA of patch features (the colours, `pca_rgb` / `pca_rgb_joint`, come from pictures.pca)
# --------------------------------------------------------------------------------------------------------------
def _pca_panel(img: PIL.Image.Image, rgb: np.ndarray, gap: int, name: str, image_name: str) -> PIL.Image.Image:
    h, w = rgb.shape[:2]
    try:
        _cell_size(img, (h, w), None, image_name)
    except ValueError as err:
        raise ValueError(f"`{name}` is a {h}x{w} grid that does not match `{image_name}`: {err}") from None
    pca = PIL.Image.fromarray(rgb).resize(img.size, _NEAREST)
    return hstack([img, pca], gap=gap)


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
    spec = _strip_spec(cu_seqlens, grid_hw, labels, width, height)
    width, height = spec.width, spec.height
    xs = _segment_edges(spec.cu, width)
    text = height >= 48
    band = (height - 4) // 3 if text else 0
    top, bottom = (band + 2, height - band - 2) if text else (0, height)
    pic = PIL.Image.new("RGB", (width, height), WHITE)
    draw = PIL.ImageDraw.Draw(pic)
    for i in range(len(spec.lengths)):
        draw.rectangle([xs[i], top, xs[i + 1] - 1, bottom - 1], fill=PALETTE[i % len(PALETTE)])
    if text:
        font = _font(max(8, min(12, band - 2)))
        _draw_segment_labels(draw, spec, xs, top, font)
        _draw_cu_values(draw, spec.cu, xs, bottom, width, font)
    return _finish(pic, save_to)


def _draw_segment_labels(draw: PIL.ImageDraw.ImageDraw, spec: _StripSpec, xs: list[int], top: int, font) -> None:
    """Above the bar, centred on each segment: the first of its label candidates that fits (or none)."""
    for i in range(len(spec.lengths)):
        room = xs[i + 1] - xs[i]
        for option in _label_options(spec, i):
            tw, th = _text_size(draw, option, font)
            if tw + 2 <= room:
                _put_text(draw, (xs[i] + xs[i + 1] - tw) / 2, top - 3 - th, option, font, (0, 0, 0))
                break


def _draw_cu_values(
    draw: PIL.ImageDraw.ImageDraw, cu: list[int], xs: list[int], bottom: int, width: int, font
) -> None:
    """Under the bar: a tick at every segment edge, and the `cu_seqlens` values where they do not overlap (N first,
    so it is always there)."""
    ticks = [min(x, width - 1) for x in xs]
    for x_tick in ticks:
        draw.line([(x_tick, bottom), (x_tick, bottom + 3)], fill=(0, 0, 0))
    values = [str(c) for c in cu]
    lefts = _place_labels(ticks, [_text_size(draw, v, font)[0] for v in values], width)
    for value, left in zip(values, lefts):
        if left is not None:
            _put_text(draw, left, bottom + 5, value, font, (0, 0, 0))


# --------------------------------------------------------------------------------------------------------------
# (d) attention maps (the numbers, `attention_grid`, come from pictures.attention)
# --------------------------------------------------------------------------------------------------------------
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
