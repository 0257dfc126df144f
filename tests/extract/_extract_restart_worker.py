"""extract_features.py as torchrun starts it, with one fault injected from outside the production code: the named rank
is killed with SIGKILL (or raises) at a chosen step, in the chosen torchrun attempt only (TORCHELASTIC_RESTART_COUNT).
Used by test_extract_restarts.py; run as `torchrun ... _extract_restart_worker.py <extract_features.py flags>`.

    EXTRACT_FAULTS="ATTEMPT=RANK:STEP:ACTION[,...]"   e.g. "0=1:shard:kill,1=0:plan:raise"
    EXTRACT_FAULT_DIR=DIR                             marker files (a kill triggered from another rank)
    EXTRACT_LATE="RANK:SECONDS"                       in restarted attempts, that rank starts late (as a node does)

Steps (each reached deterministically; the hooks wrap the library's own functions):
    plan      rank 0: inside make_plan (the output lock held, the other ranks waiting for the plan); any other rank:
              killed while rank 0 is there (kill), or raising while it computes the run's settings (raise)
    shard     mid-shard: after the first forward of the first shard this rank encodes (DataLoader workers running)
    between   between shards: right after this rank wrote its first shard file
    manifest  rank 0: as it starts writing the final manifest; any other rank: killed meanwhile (waiting for rank 0 at
              the end), or raising as it sums the run's statistics (raise)
"""

import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: the code under test

from siglip_navit_tools.extract import cli, run, writers  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))
ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
MARKERS = Path(os.environ.get("EXTRACT_FAULT_DIR", "."))


class InjectedFault(RuntimeError):
    """The error a faulty rank raises."""


def _fault() -> tuple:
    """(rank, step, action) of this attempt's fault, or None."""
    for item in filter(None, os.environ.get("EXTRACT_FAULTS", "").split(",")):
        attempt, spec = item.split("=")
        if int(attempt) == ATTEMPT:
            rank, step, action = spec.split(":")
            return int(rank), step, action
    return None


def _act(action: str, where: str) -> None:
    print(f"[fault] attempt {ATTEMPT} rank {RANK}: {action} at {where}", file=sys.stderr, flush=True)
    if action == "raise":
        raise InjectedFault(f"injected fault at {where}")
    (MARKERS / f"dying-{ATTEMPT}").touch()
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_other_rank(where: str) -> None:
    """On rank 0: have the victim (watching for the trigger file) kill itself now, and wait until it has."""
    print(f"[fault] attempt {ATTEMPT} rank 0 at {where}: triggering the victim", file=sys.stderr, flush=True)
    (MARKERS / f"trigger-{ATTEMPT}").touch()
    deadline = time.monotonic() + 60
    while not (MARKERS / f"dying-{ATTEMPT}").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)  # SIGKILL follows the marker at once


def _watch_for_trigger() -> None:
    while not (MARKERS / f"trigger-{ATTEMPT}").exists():
        time.sleep(0.01)
    _act("kill", "the trigger of rank 0")


def _once(fn):
    """`fn` runs the first time only."""
    done = []

    def wrapper(*args, **kwargs):
        if not done:
            done.append(True)
            fn(*args, **kwargs)

    return wrapper


def install(rank: int, step: str, action: str) -> None:
    """Wrap the library functions so that the fault happens at `step`."""
    victim = rank == RANK
    remote_kill = not victim and RANK == 0 and rank != 0 and action == "kill" and step in ("plan", "manifest")
    if victim and rank != 0 and action == "kill" and step in ("plan", "manifest"):
        threading.Thread(target=_watch_for_trigger, daemon=True).start()
        return
    if not victim and not remote_kill:
        return
    act = (lambda where: _kill_other_rank(where)) if remote_kill else (lambda where: _act(action, where))
    if step == "plan" and RANK == 0:
        real_make_plan = run.make_plan

        def make_plan(*args, **kwargs):
            act("planning (make_plan, lock held)")
            return real_make_plan(*args, **kwargs)

        run.make_plan = make_plan
    elif step == "plan":
        real_settings = run.run_settings

        def run_settings(*args, **kwargs):
            act("planning (run_settings)")
            return real_settings(*args, **kwargs)

        run.run_settings = run_settings
    elif step == "shard":
        real_encode = run.encode_shard
        act_once = _once(lambda: act("mid-shard (after a forward)"))

        def encode_shard(job, *args, **kwargs):
            items = job.items

            def after_first():
                yield next(items)
                act_once()
                yield from items

            job.items = after_first()
            return real_encode(job, *args, **kwargs)

        run.encode_shard = encode_shard
    elif step == "between":
        real_commit = writers.ShardWriter.commit
        act_once = _once(lambda path: act(f"between shards (after writing {path.name})"))

        def commit(self, *args, **kwargs):
            ids = real_commit(self, *args, **kwargs)
            act_once(self.path)
            return ids

        writers.ShardWriter.commit = commit
    elif step == "manifest" and RANK == 0:
        real_write = run.ManifestWriter.write

        def write(self, complete=False, summary=None):
            if complete:
                act("the final manifest")
            return real_write(self, complete, summary)

        run.ManifestWriter.write = write
    elif step == "manifest":
        real_summarize = run.summarize

        def summarize(*args, **kwargs):
            act("the end (summing the statistics)")
            return real_summarize(*args, **kwargs)

        run.summarize = summarize
    else:
        raise SystemExit(f"unknown fault step {step!r}")


if __name__ == "__main__":
    late = os.environ.get("EXTRACT_LATE", "")
    if late and ATTEMPT > 0 and int(late.split(":")[0]) == RANK:
        time.sleep(float(late.split(":")[1]))
    fault = _fault()
    if fault is not None:
        install(*fault)
    sys.exit(cli.main())
