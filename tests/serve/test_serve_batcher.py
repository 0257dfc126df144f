"""The server's batcher, without HTTP and without a model: the packing rules (first-fit in arrival order, the oldest
image always in the next forward, never over the budget, never split), when a forward starts, admission (all or
nothing, 503-style QueueFull with a retry hint, never dropping what was admitted), cancellation, failures, the
`none` baseline and draining on close. The forward is a plain function recording what it was given."""

from __future__ import annotations

import threading
import time

import pytest

from siglip_navit_tools.serve.batcher import (
    Batcher,
    Closed,
    QueueFull,
    TooLarge,
    first_fit,
    forward_delay,
)


# ---- the pure rules ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "patches, budget, chosen",
    [
        ([], 10, []),
        ([4], 10, [0]),
        ([4, 4, 4], 10, [0, 1]),  # the third does not fit what is left
        ([4, 7, 2, 4], 10, [0, 2, 3]),  # first-fit: 7 is skipped, later images that fit still join
        ([10, 1], 10, [0]),  # exactly full
        ([9, 5, 1], 10, [0, 2]),
        ([3, 3, 3, 1], 10, [0, 1, 2, 3]),
    ],
)
def test_first_fit_in_arrival_order(patches, budget, chosen):
    assert first_fit(patches, budget) == chosen
    assert sum(patches[i] for i in chosen) <= budget


def test_first_fit_refuses_an_image_over_the_budget():
    with pytest.raises(ValueError, match="the oldest waiting image has 11 patches, more than the budget of 10"):
        first_fit([11, 1], 10)


def test_no_starvation_under_a_stream_of_small_images():
    """A big image passed over by first-fit is the oldest at the next forward, so it goes then."""
    budget, queue, forwards = 10, [("small0", 2), ("big", 9)], []
    for step in range(1, 6):
        chosen = first_fit([n for _, n in queue], budget)
        forwards.append([queue[i][0] for i in chosen])
        queue = [item for i, item in enumerate(queue) if i not in chosen] + [(f"small{step}", 2), (f"s{step}b", 2)]
    assert forwards[0] == ["small0"] and forwards[1] == ["big"], forwards


@pytest.mark.parametrize(
    "waiting, age, preparing, delay",
    [
        (0, 0.0, 0, float("inf")),  # nothing waits
        (16, 0.0, 3, 0.0),  # the budget is full
        (20, 0.0, 3, 0.0),  # over full: first-fit takes what fits
        (4, 0.0, 0, 0.0),  # nothing more is on its way: waiting would only add latency
        (4, 0.0, 2, 0.05),  # images still being prepared: wait up to max_wait for them
        (4, 0.03, 2, 0.02),
        (4, 0.2, 2, 0.0),  # the oldest has waited long enough
    ],
)
def test_forward_delay(waiting, age, preparing, delay):
    assert forward_delay(waiting, age, budget=16, max_wait=0.05, preparing=preparing) == pytest.approx(delay)


# ---- the batcher with its model thread ---------------------------------------------------------------------------
class Recorder:
    """A forward that records each forward's (request, index, patches) and returns (request, index) per image;
    `gate` (when set) holds the first forward until released, so that others can queue up behind it."""

    def __init__(self, gate: bool = False, fail_on: str = ""):
        self.forwards: list[list[tuple[str, int, int]]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not gate:
            self.release.set()
        self.fail_on = fail_on

    def __call__(self, items):
        self.started.set()
        self.release.wait(10)
        self.forwards.append([(item.ticket.request_id, item.index, item.patches) for item in items])
        if any(item.ticket.request_id == self.fail_on for item in items):
            raise RuntimeError("boom")
        return [(item.ticket.request_id, item.index) for item in items]


class Done:
    """Collects finished tickets (on_done runs on the model thread)."""

    def __init__(self):
        self.tickets, self.cond = {}, threading.Condition()

    def __call__(self, ticket):
        with self.cond:
            self.tickets[ticket.request_id] = ticket
            self.cond.notify_all()

    def wait(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.tickets) >= n, 10), f"only {len(self.tickets)} of {n} finished"


@pytest.fixture
def make():
    batchers = []

    def build(forward, budget=10, queue=40, max_wait=0.0, mode="continuous"):
        batcher = Batcher(forward, budget, queue, max_wait, mode=mode)
        batcher.start()
        batchers.append(batcher)
        return batcher

    yield build
    for batcher in batchers:
        assert batcher.close(timeout=10)


def submit(batcher, done, request_id, patches):
    ticket = batcher.admit(request_id, patches, done)
    for index in range(len(patches)):
        batcher.put(ticket, index, payload=None)
    return ticket


def test_requests_share_forwards_and_each_gets_its_own_results(make):
    forward, done = Recorder(gate=True), Done()
    batcher = make(forward, budget=10)
    submit(batcher, done, "r0", [3])
    assert forward.started.wait(5)  # r0 runs alone (nothing else was there); the rest queue up behind it
    submit(batcher, done, "r1", [4, 2])
    submit(batcher, done, "r2", [5, 1, 3])
    forward.release.set()
    done.wait(3)
    assert forward.forwards[0] == [("r0", 0, 3)]
    # first-fit in arrival order: r1's 4 + 2, r2's 1 and 3 fit 10; r2's 5 waits for the next forward
    assert forward.forwards[1] == [("r1", 0, 4), ("r1", 1, 2), ("r2", 1, 1), ("r2", 2, 3)]
    assert forward.forwards[2] == [("r2", 0, 5)]
    for name, n in (("r0", 1), ("r1", 2), ("r2", 3)):
        ticket = done.tickets[name]
        assert ticket.error is None and ticket.results == [(name, i) for i in range(n)]
    assert done.tickets["r2"].forwards == 2 and batcher.queued_patches == 0


def test_every_forward_respects_the_budget_and_every_image_is_encoded_once(make):
    forward, done = Recorder(), Done()
    batcher = make(forward, budget=16, queue=400, max_wait=0.002)
    sizes = [[(7 * r + 3 * i) % 16 + 1 for i in range(r % 4 + 1)] for r in range(30)]
    threads = [threading.Thread(target=submit, args=(batcher, done, f"r{r}", sizes[r])) for r in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.wait(30)
    seen = sorted((rid, i) for fwd in forward.forwards for rid, i, _ in fwd)
    assert seen == sorted((f"r{r}", i) for r in range(30) for i in range(len(sizes[r])))
    assert all(sum(n for *_, n in fwd) <= 16 for fwd in forward.forwards)
    assert len(forward.forwards) < sum(map(len, sizes))  # images did share forwards


def test_the_none_baseline_runs_one_request_per_forward(make):
    forward, done = Recorder(gate=True), Done()
    batcher = make(forward, budget=10, mode="none")
    submit(batcher, done, "r0", [3])
    assert forward.started.wait(5)
    submit(batcher, done, "r1", [4, 2])
    submit(batcher, done, "r2", [5, 1, 3, 4])
    forward.release.set()
    done.wait(3)
    assert [{rid for rid, *_ in fwd} for fwd in forward.forwards] == [{"r0"}, {"r1"}, {"r2"}, {"r2"}]
    assert forward.forwards[2] == [("r2", 0, 5), ("r2", 1, 1), ("r2", 2, 3)]


def test_a_forward_waits_for_images_still_being_prepared_at_most_max_wait(make):
    forward, done = Recorder(), Done()
    batcher = make(forward, budget=10, max_wait=0.3)
    ticket = batcher.admit("r0", [2, 2], done)
    start = time.monotonic()
    batcher.put(ticket, 0, None)  # image 1 is still "being decoded": image 0 waits for it, up to max_wait
    assert forward.started.wait(5)
    assert time.monotonic() - start >= 0.25
    batcher.put(ticket, 1, None)  # late: its own forward
    done.wait(1)
    assert forward.forwards == [[("r0", 0, 2)], [("r0", 1, 2)]]
    assert done.tickets["r0"].results == [("r0", 0), ("r0", 1)]
    # with nothing on its way, a lone image goes at once
    start = time.monotonic()
    submit(batcher, done, "r1", [2])
    done.wait(2)
    assert time.monotonic() - start < 0.2


# ---- admission, cancellation, failure, shutdown --------------------------------------------------------------
def test_admission_is_all_or_nothing(make):
    forward, done = Recorder(gate=True), Done()
    batcher = make(forward, budget=10, queue=20)
    first = submit(batcher, done, "r0", [10])
    assert forward.started.wait(5)
    second = batcher.admit("r1", [10, 10], done)  # the queue's 20 patches: full (r0's are in the running forward)
    assert batcher.queued_patches == 20
    with pytest.raises(QueueFull, match="the queue holds 20 of 20 patches; this request needs 1") as caught:
        batcher.admit("r2", [1], done)
    assert caught.value.retry_after >= 1
    with pytest.raises(TooLarge, match="more than the whole queue"):
        batcher.admit("r3", [10, 10, 10], done)
    with pytest.raises(TooLarge, match="an image of 11 patches does not fit one forward"):
        batcher.admit("r4", [11], done)
    for index in range(2):
        batcher.put(second, index, None)
    forward.release.set()
    done.wait(2)
    assert set(done.tickets) == {"r0", "r1"} and first.error is None and second.error is None


def test_cancel_drops_images_not_yet_started(make):
    forward, done = Recorder(gate=True), Done()
    batcher = make(forward, budget=10, queue=40)
    submit(batcher, done, "r0", [10])
    assert forward.started.wait(5)
    gone = submit(batcher, done, "gone", [3, 3])
    late = batcher.admit("late", [4], done)  # admitted, still being prepared
    assert batcher.queued_patches == 10
    batcher.cancel(gone)
    assert batcher.queued_patches == 4
    batcher.cancel(late)
    batcher.abandon(late, 0)  # what the worker does when it finds its request over
    assert batcher.queued_patches == 0
    submit(batcher, done, "r1", [2])
    forward.release.set()
    done.wait(2)
    assert set(done.tickets) == {"r0", "r1"}  # no on_done for cancelled requests
    assert all(rid not in ("gone", "late") for fwd in forward.forwards for rid, *_ in fwd)


def test_a_failed_request_drops_its_other_images_and_others_go_on(make):
    forward, done = Recorder(gate=True), Done()
    batcher = make(forward, budget=10, queue=40)
    submit(batcher, done, "r0", [10])
    assert forward.started.wait(5)
    bad = batcher.admit("bad", [2, 2, 2], done)
    batcher.put(bad, 0, None)
    batcher.abandon(bad, 1)  # preparing image 1 failed (e.g. not an image)
    batcher.fail(bad, ValueError("input[1]: not an image"))
    batcher.put(bad, 2, None)  # its last image arrives after the failure: dropped
    submit(batcher, done, "ok", [2])
    forward.release.set()
    done.wait(3)
    assert str(done.tickets["bad"].error) == "input[1]: not an image"
    assert done.tickets["ok"].error is None and batcher.queued_patches == 0
    assert all(rid != "bad" for fwd in forward.forwards for rid, *_ in fwd)


def test_a_failing_forward_fails_its_requests_and_the_thread_goes_on(make):
    forward, done = Recorder(fail_on="boom"), Done()
    batcher = make(forward, budget=10)
    submit(batcher, done, "boom", [2])
    done.wait(1)
    submit(batcher, done, "after", [2])
    done.wait(2)
    assert isinstance(done.tickets["boom"].error, RuntimeError)
    assert done.tickets["after"].results == [("after", 0)]


def test_close_finishes_everything_admitted_then_refuses(make):
    forward, done = Recorder(gate=True), Done()
    batcher = Batcher(forward, 10, 40, max_wait=10.0)  # a long max_wait: close must not wait for it
    batcher.start()
    submit(batcher, done, "r0", [4])
    assert forward.started.wait(5)
    pending = batcher.admit("r1", [4, 4], done)
    batcher.put(pending, 0, None)
    closer = threading.Thread(target=batcher.close, kwargs={"timeout": 10})
    closer.start()
    time.sleep(0.1)
    with pytest.raises(Closed):
        batcher.admit("r2", [1], done)
    batcher.put(pending, 1, None)  # an image still being prepared when close began is finished too
    forward.release.set()
    closer.join(10)
    assert not closer.is_alive()
    assert done.tickets["r1"].results == [("r1", 0), ("r1", 1)]
