# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""The layout of `visualize.pack_strip`, as plain numbers: its argument checks (`strip_spec`), the segments' column
edges, each segment's label candidates (longest first) and where the `cu_seqlens` values fit under the bar.

Must not draw (the strip itself is drawn in `visualize`) and must not re-derive a grid: the grids it checks are the
processor's `image_grid_hw`, taken as given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from ._draw import as_grid_list, as_int_list, check_int


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
