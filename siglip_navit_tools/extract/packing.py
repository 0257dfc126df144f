# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Token-budget packing: which images share a forward.

Owns the pure packers (patch counts in, groups out), testable without a model: `plan_batches` over a list whose sizes
are all known, `plan_windows` over a stream whose sizes become known only as it is read (a tar, a parquet file),
one bounded look-ahead window at a time. Must not compute patch counts itself (the image processor's `patch_grid`
gives them) nor read images.
"""

from __future__ import annotations

from itertools import islice
from typing import Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")


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


def plan_windows(sized: Iterable[tuple[T, int]], budget: int, window: int) -> Iterator[list[T]]:
    """Forwards of at most `budget` patches over a stream of (item, patch count): the stream is read `window` items
    at a time and each window is packed first-fit decreasing (`plan_batches`), so at most `window` items are held
    however long the stream is. Yields lists of items, each ordered largest first; every item appears exactly once."""
    if window <= 0:
        raise ValueError(f"window must be a positive number of items, got {window}")
    stream = iter(sized)
    while chunk := list(islice(stream, window)):
        for batch in plan_batches([patches for _, patches in chunk], budget):
            yield [chunk[i][0] for i in batch]
