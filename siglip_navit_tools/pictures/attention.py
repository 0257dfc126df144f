# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Picture (d), attention: `attention_grid` (one query patch's row of an image's eager attention map, as a grid),
picking a layer / image / head out of the model's `output.attentions` with messages that name the argument, the
grid an image of a given patch count has, the "hot" heat colours, and `attention_map` (the heat map over the image,
the query patch outlined).

Must not run the model.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence, Union

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

from ._draw import NEAREST, Color, ImageLike, PathLike, as_grid, as_rgb, cell_size, check_int, finish

MARKER: Color = (0, 200, 255)  # the outline of the query patch in `attention_map`

# The "hot" colour scale, black -> red -> yellow -> white: brightness (R + G + B) rises strictly with the value.
HOT_STOPS = np.array([[0, 0, 0], [230, 0, 0], [255, 210, 0], [255, 255, 255]], dtype=np.float64)


def hot_rgb(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB on the hot scale (piecewise linear between `HOT_STOPS`)."""
    x = np.clip(values, 0.0, 1.0) * (len(HOT_STOPS) - 1)
    low = np.minimum(np.floor(x).astype(np.int64), len(HOT_STOPS) - 2)
    t = (x - low)[..., None]
    return np.round(HOT_STOPS[low] * (1 - t) + HOT_STOPS[low + 1] * t).astype(np.uint8)


def pick(items: Sequence[Any], index: Any, name: str, what: str) -> Any:
    """`items[index]` for an integer index in [-len, len); ValueError naming the argument otherwise."""
    n = len(items)
    if not isinstance(index, numbers.Integral) or isinstance(index, (bool, np.bool_)) or not -n <= index < n:
        raise ValueError(f"`{name}` must be an integer in [-{n}, {n}) ({n} {what}), got {index!r}")
    return items[int(index)]


def select_map(attentions: Any, layer: Any, image_index: Any) -> torch.Tensor:
    """`attentions[layer][image_index]` as a float64 `(heads, n, n)` CPU tensor; ValueError naming what is wrong."""
    attentions = getattr(attentions, "attentions", attentions)  # the model output itself is fine too
    if not isinstance(attentions, (list, tuple)) or not attentions:
        raise ValueError(
            "`attentions` must be the model's `output.attentions` (a tuple per layer of per-image maps), got "
            f"{type(attentions).__name__}: run the model with attn_implementation='eager' and output_attentions=True"
        )
    maps = pick(attentions, layer, "layer", "layers")
    if not isinstance(maps, (list, tuple)):
        raise ValueError(f"`attentions[{layer}]` must be a list of per-image maps, got {type(maps).__name__}")
    probs = pick(maps, image_index, "image_index", "images in the pack")
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
    probs = select_map(attentions, layer, image_index)
    h, w = as_grid(grid_hw)
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
    row = rows.mean(0) if head is None else pick(rows, head, "head", "heads")
    return row.reshape(h, w).numpy()


def grid_for(img: PIL.Image.Image, n: int) -> tuple[int, int]:
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
    img = as_rgb(image, "image")
    scale = check_int(scale, "scale", 1)
    if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be a number in [0, 1], got {alpha!r}")
    if grid_hw is None:
        grid_hw = grid_for(img, select_map(attentions, layer, image_index).shape[1])
    grid = attention_grid(attentions, grid_hw, patch, layer=layer, image_index=image_index, head=head)
    cell = cell_size(img, grid.shape, None, "image") * scale
    peak = grid.max()
    heat = PIL.Image.fromarray(hot_rgb(grid / peak if peak > 0 else grid))
    size = (img.width * scale, img.height * scale)
    out = PIL.Image.blend(img.resize(size, NEAREST), heat.resize(size, NEAREST), float(alpha))
    (row, col), width = patch, max(1, cell // 8)
    box = [col * cell, row * cell, (col + 1) * cell - 1, (row + 1) * cell - 1]
    PIL.ImageDraw.Draw(out).rectangle(box, outline=MARKER, width=width)
    return finish(out, save_to)
