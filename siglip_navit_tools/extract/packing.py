# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Token-budget packing: which images share a forward.

Owns the pure packer (patch counts in, index groups out), testable without a model. Must not compute patch counts
itself (the image processor's `patch_grid` gives them) nor read images.
"""

from __future__ import annotations

from typing import Sequence


def plan_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Group items of the given patch counts into forwards of at most `budget` patches, first-fit decreasing.

    Returns lists of indices into `lengths`; each list is ordered largest first (equal sizes end up next to each
    other, which the model batches into one attention call). Every index appears exactly once.
    """
    if budget <= 0:
        raise ValueError(f"budget must be a positive number of patches, got {budget}")
    too_big = [n for n in lengths if n > budget]
    if too_big:
        raise ValueError(f"an item of {max(too_big)} patches does not fit a budget of {budget} patches")
    batches: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                batches[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            batches.append([i])
            room.append(budget - lengths[i])
    return batches
