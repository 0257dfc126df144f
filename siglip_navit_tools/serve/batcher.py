# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Continuous packing: which waiting images share the next forward, and the one model thread that runs them.

Owns the queue of admitted images (each with its patch count, which the caller got from the image processor's
`patch_grid` of the image header), admission against `max_queue_patches` (503 at once, never a dropped accepted
request), the packing rules and the model thread:

- first-fit in arrival order: the oldest waiting image always goes into the next forward (no starvation), later ones
  join while they fit `budget`; an image is never split and nothing is padded;
- a forward starts when the waiting patches fill the budget, when no admitted image is still being prepared (nothing
  more is on its way: waiting would only add latency), or `max_wait` after the oldest waiting image arrived;
- `mode="none"`: the oldest request's images alone (the baseline: one request per forward, as a plain handler does).

Results go back per request through its `Ticket` (`on_done` runs once, on the model thread, when every image of the
request has its result or the request failed). The pure rules (`first_fit`, `forward_delay`) are functions, testable
without threads. Must not know HTTP, models or images: the forward is a callable given at construction.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

logger = logging.getLogger(__name__)

MODES = ("continuous", "none")
# Image states inside a ticket.
PREPARING, QUEUED, STARTED, DONE, DROPPED = "preparing", "queued", "started", "done", "dropped"


class QueueFull(Exception):
    """Admitting the request would overflow the queue; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class TooLarge(Exception):
    """The request holds more patches than the whole queue: it can never be admitted."""


class Closed(Exception):
    """The batcher is shutting down and takes no new requests."""


# --------------------------------------------------------------------------------------------------------------
# The pure rules
# --------------------------------------------------------------------------------------------------------------
def first_fit(patches: Sequence[int], budget: int) -> list[int]:
    """Indices of the waiting images (given in arrival order) that make the next forward: the oldest always, then
    every later one that still fits the budget (first-fit). `patches[0]` must fit the budget on its own."""
    if not patches:
        return []
    if patches[0] > budget:
        raise ValueError(f"the oldest waiting image has {patches[0]} patches, more than the budget of {budget}")
    chosen, room = [0], budget - patches[0]
    for i in range(1, len(patches)):
        if patches[i] <= room:
            chosen.append(i)
            room -= patches[i]
    return chosen


def forward_delay(waiting_patches: int, oldest_age: float, budget: int, max_wait: float, preparing: int) -> float:
    """Seconds until the next forward should start (0: now), given the waiting patches, how long the oldest waiting
    image has waited, and how many admitted images are still being prepared (decoded and preprocessed)."""
    if waiting_patches <= 0:
        return math.inf
    if waiting_patches >= budget or preparing == 0:
        return 0.0
    return max(0.0, max_wait - oldest_age)


# --------------------------------------------------------------------------------------------------------------
# Requests and queued images
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Ticket:
    """One admitted request: its images' patch counts, states and results, and what happened to it."""

    request_id: str
    patches: list[int]
    on_done: Callable[["Ticket"], None]
    states: list[str] = field(default_factory=list)
    results: list[Any] = field(default_factory=list)
    error: Optional[BaseException] = None
    finished: bool = False
    queue_wait: float = 0.0  # longest time one of its images waited in the queue, seconds
    forward_seconds: float = 0.0  # time of the forwards that held its images, seconds
    forwards: int = 0  # forwards that held its images

    def __post_init__(self) -> None:
        self.states = [PREPARING] * len(self.patches)
        self.results = [None] * len(self.patches)

    @property
    def cancelled(self) -> bool:
        """No more work is wanted for it (it failed, was cancelled, or is finished)."""
        return self.finished


@dataclass
class Waiting:
    """One prepared image waiting for a forward."""

    ticket: Ticket
    index: int  # the image's place in its request
    patches: int
    payload: Any  # what the forward callable needs (a pack)
    arrived: float  # clock time it joined the queue


# --------------------------------------------------------------------------------------------------------------
# The batcher
# --------------------------------------------------------------------------------------------------------------
class Batcher:
    """The queue of admitted images and the one model thread packing them into forwards.

    `forward(items)` (called on the model thread) gets the `Waiting` items of one forward and returns one result per
    item, in order; an exception fails every request in that forward. `on_forward(items, seconds)` (optional) is
    told about each forward that ran (metrics)."""

    def __init__(
        self,
        forward: Callable[[list[Waiting]], list[Any]],
        budget: int,
        max_queue_patches: int,
        max_wait: float,
        mode: str = "continuous",
        on_forward: Optional[Callable[[list[Waiting], float], None]] = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if budget <= 0 or max_queue_patches < budget:
            raise ValueError(f"need 0 < budget <= max_queue_patches, got {budget} and {max_queue_patches}")
        self.forward, self.budget, self.max_queue_patches = forward, budget, max_queue_patches
        self.max_wait, self.mode, self.on_forward, self.clock = max_wait, mode, on_forward, clock
        self._cond = threading.Condition()
        self._waiting: list[Waiting] = []  # arrival order
        self._reserved = 0  # patches admitted and not yet in a forward (the queue's fill)
        self._preparing = 0  # admitted images not yet put
        self._closed = False  # no new requests
        self._stopping = False  # the model thread ends once nothing is left
        self._rate = 0.0  # recent patches per second of the model (for Retry-After)
        self.running_patches = 0  # patches in the forward now running (0: the model is idle)
        self._thread: Optional[threading.Thread] = None

    # ---- what the request side calls ---------------------------------------------------------------------------
    @property
    def queued_patches(self) -> int:
        """Patches admitted but not yet in a forward."""
        return self._reserved

    def admit(self, request_id: str, patches: Sequence[int], on_done: Callable[[Ticket], None]) -> Ticket:
        """Reserve queue room for a request's images, all or nothing. Raises QueueFull (retry later), TooLarge (never
        fits) or Closed (shutting down)."""
        patches = [int(n) for n in patches]
        if not patches or any(n <= 0 for n in patches):
            raise ValueError(f"a request needs one or more positive patch counts, got {patches}")
        too_big = [n for n in patches if n > self.budget]
        if too_big:
            raise TooLarge(f"an image of {max(too_big)} patches does not fit one forward (budget {self.budget})")
        total = sum(patches)
        if total > self.max_queue_patches:
            raise TooLarge(f"the request's {total} patches are more than the whole queue ({self.max_queue_patches})")
        with self._cond:
            if self._closed:
                raise Closed("the server is shutting down")
            if self._reserved + total > self.max_queue_patches:
                raise QueueFull(
                    f"the queue holds {self._reserved} of {self.max_queue_patches} patches; this request needs {total}",
                    self._retry_after(total),
                )
            self._reserved += total
            self._preparing += len(patches)
            return Ticket(request_id, patches, on_done)

    def put(self, ticket: Ticket, index: int, payload: Any) -> None:
        """Image `index` of `ticket` is prepared: it joins the queue (dropped if the request is over already)."""
        with self._cond:
            if ticket.states[index] != PREPARING:
                return
            self._preparing -= 1
            if ticket.finished:
                ticket.states[index] = DROPPED
                self._reserved -= ticket.patches[index]
                return
            ticket.states[index] = QUEUED
            self._waiting.append(Waiting(ticket, index, ticket.patches[index], payload, self.clock()))
            self._cond.notify_all()

    def abandon(self, ticket: Ticket, index: int) -> None:
        """Image `index` of `ticket` will never be put (its request is over, or preparing it failed): release it."""
        with self._cond:
            if ticket.states[index] == PREPARING:
                ticket.states[index] = DROPPED
                self._preparing -= 1
                self._reserved -= ticket.patches[index]
                self._cond.notify_all()

    def fail(self, ticket: Ticket, error: BaseException) -> None:
        """The request failed (e.g. an image could not be decoded): drop its images that have not started, report."""
        with self._cond:
            if ticket.finished:
                return
            ticket.error = error
            self._finish_locked(ticket)
        _notify(ticket)

    def cancel(self, ticket: Ticket) -> None:
        """The request is no longer wanted (client gone, timeout): drop its images that have not started. Images in
        a running forward finish; their results are discarded. `on_done` is not called."""
        with self._cond:
            if not ticket.finished:
                self._finish_locked(ticket)

    def _finish_locked(self, ticket: Ticket) -> None:
        ticket.finished = True
        for i, state in enumerate(ticket.states):
            if state == QUEUED:
                ticket.states[i] = DROPPED
                self._reserved -= ticket.patches[i]
        if any(state == DROPPED for state in ticket.states):
            self._waiting = [item for item in self._waiting if item.ticket is not ticket]
        self._cond.notify_all()
        # images still PREPARING release their room when they are put or abandoned

    def _retry_after(self, need: int) -> int:
        """Seconds until the queue has likely drained enough room: from the model's recent patches per second."""
        excess = self._reserved + need - self.max_queue_patches
        if self._rate <= 0:
            return 1
        return int(min(60, max(1, math.ceil(excess / self._rate))))

    # ---- the model thread ----------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="siglip-navit-model", daemon=True)
        self._thread.start()

    def close(self, timeout: Optional[float] = None) -> bool:
        """Take no new requests, finish every admitted image, stop the model thread. Returns False if it was still
        busy after `timeout` seconds (the thread is a daemon: it dies with the process)."""
        with self._cond:
            self._closed = True
            self._stopping = True
            self._cond.notify_all()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            items = self._next_forward()
            if items is None:
                return
            self._run(items)

    def _next_forward(self) -> Optional[list[Waiting]]:
        """Block until the next forward is due; take its images out of the queue. None: stopping, nothing left."""
        with self._cond:
            while True:
                if not self._waiting:
                    if self._stopping and self._preparing == 0:
                        return None
                    self._cond.wait(0.5 if self._stopping else None)
                    continue
                delay = 0.0 if self._stopping else self._delay_locked()
                if delay <= 0:
                    break
                self._cond.wait(None if math.isinf(delay) else delay)
            chosen = self._choose_locked()
            taken = [self._waiting[i] for i in chosen]
            chosen_set = set(chosen)
            self._waiting = [item for i, item in enumerate(self._waiting) if i not in chosen_set]
            for item in taken:
                item.ticket.states[item.index] = STARTED
                self._reserved -= item.patches
            return taken

    def _delay_locked(self) -> float:
        if self.mode == "none":  # the oldest request goes as soon as all its images are prepared
            ticket = self._waiting[0].ticket
            return 0.0 if PREPARING not in ticket.states else math.inf
        waiting = sum(item.patches for item in self._waiting)
        age = self.clock() - self._waiting[0].arrived
        return forward_delay(waiting, age, self.budget, self.max_wait, self._preparing)

    def _choose_locked(self) -> list[int]:
        if self.mode == "none":
            ticket = self._waiting[0].ticket
            mine = [i for i, item in enumerate(self._waiting) if item.ticket is ticket]
            return [mine[j] for j in first_fit([self._waiting[i].patches for i in mine], self.budget)]
        return first_fit([item.patches for item in self._waiting], self.budget)

    def _run(self, items: list[Waiting]) -> None:
        start = self.clock()
        patches = sum(item.patches for item in items)
        self.running_patches = patches
        try:
            results = self.forward(items)
            if len(results) != len(items):
                raise RuntimeError(f"the forward returned {len(results)} results for {len(items)} images")
        except Exception as exc:  # noqa: BLE001 - reported to every request in the forward, logged with its trace
            logger.exception("a forward of %d images failed", len(items))
            for ticket in {id(item.ticket): item.ticket for item in items}.values():
                self.fail(ticket, exc)
            return
        finally:
            self.running_patches = 0
        seconds = self.clock() - start
        if seconds > 0:
            self._rate = patches / seconds if self._rate == 0 else 0.8 * self._rate + 0.2 * patches / seconds
        if self.on_forward is not None:
            try:
                self.on_forward(items, seconds)
            except Exception:  # noqa: BLE001 - metrics must never stop the model thread
                logger.exception("on_forward failed")
        self._deliver(items, results, start, seconds)

    def _deliver(self, items: list[Waiting], results: list[Any], start: float, seconds: float) -> None:
        done: list[Ticket] = []
        with self._cond:
            for ticket in {id(item.ticket): item.ticket for item in items}.values():
                ticket.forwards += 1
                ticket.forward_seconds += seconds
            for item, result in zip(items, results):
                ticket = item.ticket
                ticket.queue_wait = max(ticket.queue_wait, start - item.arrived)
                if ticket.finished:
                    continue
                ticket.results[item.index] = result
                ticket.states[item.index] = DONE
                if all(state == DONE for state in ticket.states):
                    ticket.finished = True
                    done.append(ticket)
        for ticket in done:
            _notify(ticket)


def _notify(ticket: Ticket) -> None:
    """Run the ticket's `on_done`; its failure is logged, never allowed to stop the model thread."""
    try:
        ticket.on_done(ticket)
    except Exception:  # noqa: BLE001
        logger.exception("on_done of request %s failed", ticket.request_id)
