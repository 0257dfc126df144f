"""extract_features.py's dynamic shards (issue 12 item 7): ranks claim the next unfinished shard through an atomic
counter in torch.distributed's store, so a slow rank ends up with fewer shards; every shard is claimed by exactly
one rank, resuming still skips finished shards, and a rerun never sees an old run's counter."""

import os
import subprocess
import sys
import threading

import torch
import torch.distributed as dist
from _extract_helpers import good_paths, read_outputs, reference

from siglip_navit_tools import repo_code
from siglip_navit_tools.extract import distributed

ROOT = repo_code.REPO_ROOT
SLOW_RANK_WORKER = ROOT / "tests" / "extract" / "_extract_slow_rank_worker.py"  # slows ranks from outside


def test_claims_hand_every_position_to_exactly_one_claimer_and_runs_do_not_share_counters(monkeypatch):
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setattr(distributed, "_shared_store", lambda timeout_minutes: store)
    total = 200
    ranks = [distributed.Claims(total, "run-a", world_size=2) for _ in range(4)]
    got = [[] for _ in ranks]

    def claim_all(claims, out):
        while (position := claims.claim()) is not None:
            out.append(position)

    threads = [threading.Thread(target=claim_all, args=(c, out)) for c, out in zip(ranks, got)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(p for out in got for p in out) == list(range(total))  # each exactly once
    assert ranks[0].claim() is None
    assert distributed.Claims(3, "run-b", world_size=2).claim() == 0  # a new run: a fresh counter
    alone = distributed.Claims(2, "ignored", world_size=1)
    assert [alone.claim(), alone.claim(), alone.claim()] == [0, 1, None]


def test_torchrun_slow_rank_claims_fewer_shards_and_every_input_is_encoded_once(model_dir, image_dir, tmp_path):
    out = tmp_path / "feats"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
           str(SLOW_RANK_WORKER), "1:2.5", "--model", str(model_dir), "--input", str(image_dir),
           "--output", str(out), "--shard-size", "1", "--num-workers", "0", "--save-grids", "--device", "cpu",
           "--no-progress"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")  # rank 1 is slow: "1:2.5" above
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, stdin=subprocess.DEVNULL)
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-4000:]
    manifest, found = read_outputs(out)  # also checks that no id is in two shards
    assert manifest["complete"] and manifest["num_shards"] == 13 and sorted(found) == good_paths(image_dir)
    fast, slow = manifest["last_run"]["shards_per_rank"]
    assert fast + slow == 13 and slow < fast, (fast, slow)
    for entry in manifest["skipped"]:
        assert logs.count(f"skipping image {entry['id']!r}") == 1, logs[-4000:]
    ref = reference(model_dir, good_paths(image_dir))
    for path, (pooled, grid, fmap) in found.items():
        assert grid == ref[path][1]
        torch.testing.assert_close(pooled, ref[path][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fmap, ref[path][2], atol=1e-5, rtol=1e-5)
