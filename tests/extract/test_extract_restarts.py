"""extract_features.py under `torchrun --max-restarts` (issue 21): a rank killed with SIGKILL, or raising, at any point
of the first attempt (planning, mid-shard, between shards, the final manifest) -> torchrun's restarted attempt resumes
from the finished shards and ends with exit 0, a complete manifest and every input in exactly one shard file.

The restarted attempt's ranks must not meet in torchrun's store where the killed attempt's keys still are (torch 2.13
keeps one store for the whole job): `distributed.attempt_namespace` is tested alone on a real TCPStore holding an
earlier attempt's keys, and end to end through torchrun (2 gloo processes; tests/extract/_extract_restart_worker.py
injects the fault). The suite runs a few torchrun trials (each costs two worker start-ups); every combination of step,
rank and action runs with EXTRACT_RESTART_TRIALS=all (and EXTRACT_RESTART_REPEAT=N repeats each).
"""

import errno
import json
import os
import signal
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
from PIL import Image
from safetensors import safe_open

from siglip_navit_tools.extract import UsageError, distributed, lock
from siglip_navit_tools.io import lock as io_lock

WORKER = Path(__file__).with_name("_extract_restart_worker.py")
NUM_IMAGES, SHARD_SIZE = 24, 2  # 12 shards: both ranks write several

STEPS = ("plan", "shard", "between", "manifest")
ALL_CASES = [(step, rank, action) for step in STEPS for rank in (0, 1) for action in ("kill", "raise")]
# the suite's share (each torchrun run costs seconds of start-up per attempt): the everyday case, a rank killed
# mid-shard, and rank 0 killed between shards; test_torchrun_survives_a_fault_in_every_attempt adds planning, the final
# manifest and a raising rank
SUITE_CASES = [("shard", 1, "kill"), ("between", 0, "kill")]
CASES = ALL_CASES if os.environ.get("EXTRACT_RESTART_TRIALS") == "all" else SUITE_CASES
CASES = CASES * int(os.environ.get("EXTRACT_RESTART_REPEAT", "1"))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        w, h = rng.integers(16, 80, 2)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"img{i:03d}.png")
    return root


# ---- the attempt's namespace, alone -------------------------------------------------------------------------------
def _agree(store_port, world_size, timeout=20.0):
    """Every rank's `attempt_namespace` (one thread and one store client per rank, as separate processes have)."""
    names = [None] * world_size
    errors = []

    def rank_main(rank):
        try:
            client = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=timedelta(seconds=timeout))
            names[rank] = distributed.attempt_namespace(dist.PrefixStore("ns/", client), rank, world_size, timeout)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for t in reversed(threads):  # the other ranks first: rank 0 then reads their fresh nonces at once
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return names


def test_every_attempt_agrees_on_a_namespace_no_earlier_attempt_used():
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    first = _agree(server.port, 4)
    assert len(set(first)) == 1
    second = _agree(server.port, 4)  # the store still holds every key of the first attempt
    assert len(set(second)) == 1 and second[0] != first[0]
    # the restarted attempt's rank 0 comes first and reads the earlier attempt's join nonces: it still waits for this
    # attempt's ranks (a stale nonce is answered too, and never confirmed)
    names = [None] * 3

    def rank_main(rank):
        client = dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=timedelta(seconds=20))
        names[rank] = distributed.attempt_namespace(dist.PrefixStore("ns/", client), rank, 3, 20.0)

    rank0 = threading.Thread(target=rank_main, args=(0,))
    rank0.start()
    rank0.join(timeout=1.0)
    assert rank0.is_alive()  # not satisfied by the earlier attempts' keys
    late = [threading.Thread(target=rank_main, args=(r,)) for r in (1, 2)]
    for t in late:
        t.start()
    for t in [rank0, *late]:
        t.join()
    assert len(set(names)) == 1 and names[0] not in (first[0], second[0])


# ---- through torchrun ---------------------------------------------------------------------------------------------
def _run_torchrun(model_dir, image_dir, out, faults, tmp_path, max_restarts=1, timeout=420):
    markers = tmp_path / "markers"
    markers.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
           "--max-restarts", str(max_restarts), str(WORKER), "--model", str(model_dir), "--input", str(image_dir),
           "--output", str(out), "--shard-size", str(SHARD_SIZE), "--max-patches-per-batch", "256",
           "--num-workers", "1", "--device", "cpu", "--no-progress", "--dist-timeout-minutes", "3"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="", EXTRACT_FAULTS=faults,
               EXTRACT_FAULT_DIR=str(markers), EXTRACT_LATE="1:1.5")  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        logs, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # a restarted attempt stuck in init_process_group (the bug): not a pass
        os.killpg(proc.pid, signal.SIGKILL)
        logs, _ = proc.communicate()
        pytest.fail(f"torchrun still running after {timeout} s; last logs:\n{logs[-6000:]}")
    return proc.returncode, logs


def _check_every_input_once(out, image_dir):
    """The manifest is complete and lists exactly the shard files on disk; every input is in exactly one of them."""
    manifest = json.loads((out / "manifest.json").read_text())
    files = sorted(p.name for p in out.glob("shard-*.safetensors"))
    assert manifest["complete"] and sorted(s["file"] for s in manifest["shards"]) == files
    assert len(files) == manifest["num_shards"] == NUM_IMAGES // SHARD_SIZE
    seen = []
    for name in files:
        with safe_open(str(out / name), framework="pt") as f:
            ids = json.loads(f.metadata()["ids"])
            assert f.get_slice("pooled").get_shape()[0] == len(ids)
        seen.extend(ids)
    assert sorted(seen) == sorted(str(p) for p in image_dir.iterdir()), "an input missing or in two shards"
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]  # no temporary left behind
    return manifest


@pytest.mark.parametrize("step,rank,action", CASES)
def test_torchrun_restart_after_a_dead_or_failing_rank_finishes_exactly_once(
    model_dir, image_dir, tmp_path, step, rank, action
):
    out = tmp_path / "feats"
    code, logs = _run_torchrun(model_dir, image_dir, out, f"0={rank}:{step}:{action}", tmp_path)
    assert f"[fault] attempt 0 rank {rank}: {action}" in logs, logs[-6000:]  # the fault did happen
    assert code == 0, logs[-6000:]
    manifest = _check_every_input_once(out, image_dir)
    resumed = manifest["last_run"]["shards_resumed"]
    assert manifest["last_run"]["shards_written"] + resumed == manifest["num_shards"]
    if step == "between":
        assert resumed >= 1  # the victim's shard was kept, not encoded again
    if step == "manifest":
        assert resumed == manifest["num_shards"]


def test_torchrun_survives_a_fault_in_every_attempt(model_dir, image_dir, tmp_path):
    """Three attempts fail in turn, each leaving its keys in torchrun's store: rank 1 killed while rank 0 plans (the
    lock held), rank 0 raising mid-shard, rank 1 killed while rank 0 writes the final manifest; the fourth finishes."""
    out = tmp_path / "feats"
    faults = "0=1:plan:kill,1=0:shard:raise,2=1:manifest:kill"
    code, logs = _run_torchrun(model_dir, image_dir, out, faults, tmp_path, max_restarts=3)
    for attempt, victim in ((0, 1), (1, 0), (2, 1)):
        assert f"[fault] attempt {attempt} rank {victim}" in logs, logs[-6000:]
    assert code == 0, logs[-6000:]
    _check_every_input_once(out, image_dir)


# ---- a shared --output ---------------------------------------------------------------------------------------------
def test_output_on_a_file_system_without_locks_is_refused_in_one_line(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    open_fds = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(io_lock.fcntl, "flock", no_locks)
    with pytest.raises(UsageError, match=r"--output .* is on a file system without file locks \(No locks available\)"):
        lock.lock_output(tmp_path)
    assert len(os.listdir("/proc/self/fd")) == open_fds  # the lock file's descriptor is closed again
