# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""The images the model saw, and picture (a): each resized input with its patch grid and position ids.

`resized_images` recovers the exact resized images from a processor output through the processor's own
`pack_to_uint8_images` (the one owner of the patch layout and the pixel normalisation); `draw_patch_grid` /
`patch_grids` draw over them. Must not re-derive any image <-> pack geometry.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

from .. import repo_code
from ._draw import (
    NEAREST, WHITE, Color, ImageLike, PathLike, as_grid, as_grid_list, as_int_list, as_rgb, cell_size, check_int,
    finish, get_input, hstack, load_font, put_text, save_png, text_size,
)  # fmt: skip


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
    pixels = get_input(inputs, "packed_pixel_values")
    grids = as_grid_list(get_input(inputs, "image_grid_hw"), "inputs['image_grid_hw']")
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
    for hwc in repo_code.image_processing().pack_to_uint8_images(pixels, grids, p, num_channels):
        array = hwc.numpy()
        images.append(PIL.Image.fromarray(array[..., 0] if num_channels == 1 else array).convert("RGB"))
    return images


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
    img = as_rgb(image, "image")
    grid = as_grid(grid_hw)
    scale = check_int(scale, "scale", 1)
    label_every = check_int(label_every, "label_every", 1, allow_none=True)
    p = cell_size(img, grid, patch_size, "image")
    h, w = grid
    ids = None
    if position_ids is not None:
        ids = as_int_list(position_ids, "position_ids")
        if len(ids) != h * w:
            raise ValueError(
                f"`position_ids` has {len(ids)} entries but the {h}x{w} grid has {h * w} patches"
            )
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), NEAREST)
    cell = p * scale

    overlay = PIL.Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = PIL.ImageDraw.Draw(overlay)
    _draw_grid_lines(draw, grid, cell, img.size, line_color)
    if ids is not None:
        _draw_position_ids(draw, ids, grid, cell, img.size, label_every)
    out = PIL.Image.alpha_composite(img.convert("RGBA"), overlay).convert("RGB")
    return finish(out, save_to)


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
    font = load_font(max(8, min(12, cell - 2)))
    longest = max((str(v) for v in ids), key=len)
    tw, th = text_size(draw, longest, font)
    if label_every is None:
        label_every = max(1, math.ceil((tw + 3) / cell), math.ceil((th + 3) / cell))
    for i in range(0, h, label_every):
        for j in range(0, w, label_every):
            text = str(ids[i * w + j])
            x, y = j * cell + 1, i * cell + 1
            bw, bh = text_size(draw, text, font)
            if x + bw + 2 >= width or y + bh + 3 >= height:
                continue  # no room inside the picture
            draw.rectangle([x, y, x + bw + 2, y + bh + 3], fill=(0, 0, 0, 150))
            put_text(draw, x + 1, y + 1, text, font, (255, 255, 255, 255))


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
    grids = as_grid_list(get_input(inputs, "image_grid_hw"), "inputs['image_grid_hw']")
    ids = as_int_list(torch.as_tensor(get_input(inputs, "packed_flattened_position_ids")).flatten(),
                       "inputs['packed_flattened_position_ids']")
    cu = as_int_list(get_input(inputs, "cu_seqlens"), "inputs['cu_seqlens']")
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
