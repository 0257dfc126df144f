# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Picture (c), the pack strip (`pack_strip`: where each image's tokens sit in the packed sequence), and its layout
as plain numbers: the argument checks (`strip_spec`), the segments' column edges, each segment's label candidates
(longest first) and where the `cu_seqlens` values fit under the bar.

Must not re-derive a grid: the grids it checks are the processor's `image_grid_hw`, taken as given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

from ._draw import (
    WHITE, Color, PathLike, as_grid_list, as_int_list, check_int, finish, load_font, put_text, text_size,
)  # fmt: skip

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


@dataclass(frozen=True)
class StripSpec:
    """`pack_strip`'s arguments, checked against each other."""

    cu: list[int]  # cu_seqlens: [0, n1, n1 + n2, ..., N], strictly increasing
    lengths: list[int]  # each image's token count (the differences of `cu`)
    grids: Optional[list[tuple[int, int]]]  # each image's (rows, cols), or None when not given
    labels: Optional[list[str]]  # one label per image, or None for the default "image k"
    width: int  # picture width in pixels (>= the number of images)
    height: int  # picture height in pixels (>= 8)


def strip_spec(cu_seqlens: Any, grid_hw: Any, labels: Optional[Sequence[Any]], width: Any, height: Any) -> StripSpec:
    """Check `pack_strip`'s arguments (in this order: cu_seqlens, grid_hw, labels, width and height)."""
    cu = as_int_list(cu_seqlens, "cu_seqlens")
    if len(cu) < 2 or cu[0] != 0 or any(b <= a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"`cu_seqlens` must be [0, n1, n1+n2, ...], strictly increasing, >= 2 entries; got {cu}")
    k = len(cu) - 1
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    grids = None
    if grid_hw is not None:
        grids = as_grid_list(grid_hw)
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
    width, height = check_int(width, "width", 2), check_int(height, "height", 8)
    if width < k:
        raise ValueError(f"`width` = {width} px is too narrow for {k} images (one column each); pass width >= {k}")
    return StripSpec(cu, lengths, grids, labels, width, height)


def label_options(spec: StripSpec, i: int) -> list[str]:
    """Image `i`'s label candidates, longest first: with its grid and token count, the bare label, its index."""
    base = spec.labels[i] if spec.labels is not None else f"image {i}"
    if spec.grids is not None:
        first = f"{base}: {spec.grids[i][0]}x{spec.grids[i][1]} = {spec.lengths[i]}"
    else:
        first = f"{base}: {spec.lengths[i]}"
    return [first, base, str(i)]


def segment_edges(cu: Sequence[int], width: int) -> list[int]:
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


def place_labels(centres: Sequence[float], widths: Sequence[int], width: int, gap: int = 3) -> list[Optional[int]]:
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
    spec = strip_spec(cu_seqlens, grid_hw, labels, width, height)
    width, height = spec.width, spec.height
    xs = segment_edges(spec.cu, width)
    text = height >= 48
    band = (height - 4) // 3 if text else 0
    top, bottom = (band + 2, height - band - 2) if text else (0, height)
    pic = PIL.Image.new("RGB", (width, height), WHITE)
    draw = PIL.ImageDraw.Draw(pic)
    for i in range(len(spec.lengths)):
        draw.rectangle([xs[i], top, xs[i + 1] - 1, bottom - 1], fill=PALETTE[i % len(PALETTE)])
    if text:
        font = load_font(max(8, min(12, band - 2)))
        _draw_segment_labels(draw, spec, xs, top, font)
        _draw_cu_values(draw, spec.cu, xs, bottom, width, font)
    return finish(pic, save_to)


def _draw_segment_labels(draw: PIL.ImageDraw.ImageDraw, spec: StripSpec, xs: list[int], top: int, font) -> None:
    """Above the bar, centred on each segment: the first of its label candidates that fits (or none)."""
    for i in range(len(spec.lengths)):
        room = xs[i + 1] - xs[i]
        for option in label_options(spec, i):
            tw, th = text_size(draw, option, font)
            if tw + 2 <= room:
                put_text(draw, (xs[i] + xs[i + 1] - tw) / 2, top - 3 - th, option, font, (0, 0, 0))
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
    lefts = place_labels(ticks, [text_size(draw, v, font)[0] for v in values], width)
    for value, left in zip(values, lefts):
        if left is not None:
            put_text(draw, left, bottom + 5, value, font, (0, 0, 0))
