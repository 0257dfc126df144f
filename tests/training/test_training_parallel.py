"""Training readiness: DDP and FSDP2 (`fully_shard`, one unit per encoder layer) on packed inputs.

One real `torchrun` launch (2 gloo processes on CPU, tiny 3-layer models) runs tests/training/_parallel_train_worker.py
for both wrappings, with and without non-reentrant gradient checkpointing, rope off and on. Each rank trains
on its own pack of several differently sized images. The results are compared with one process doing the
same arithmetic without torch.distributed: each rank's forward output and loss, the rank-averaged gradients
of the first step, and the parameters after two SGD (momentum, weight decay) steps.

Tolerances (fp32): outputs and losses atol = rtol = 1e-5; gradients and parameters atol 1e-6, rtol 1e-5.
Measured with torch 2.13 CPU: every difference is exactly 0 (the reference runs single-threaded like the
workers); with a 2-thread reference the largest are 9.5e-7 (outputs), 7.5e-8 (gradients, |g| <= 0.4),
1.2e-7 (parameters), all from thread-dependent reduction order.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parents[1]
WORKER = TESTS / "_parallel_train_worker.py"
import _parallel_train_worker as worker  # beside this file: pytest puts a test's folder on sys.path

MODES = ["ddp", "fsdp2"]
PASSES = [(rope, ckpt) for rope in (False, True) for ckpt in (False, True)]
OUT_TOL = dict(atol=1e-5, rtol=1e-5)
GRAD_TOL = dict(atol=1e-6, rtol=1e-5)
TIMEOUT_S = 240


def _text(stream) -> str:
    if stream is None:
        return ""
    return stream.decode(errors="replace") if isinstance(stream, bytes) else stream


def _tail(stdout, stderr, n: int = 4000) -> str:
    return f"\n--- stdout (tail) ---\n{_text(stdout)[-n:]}\n--- stderr (tail) ---\n{_text(stderr)[-n:]}"


@pytest.fixture(scope="module")
def parallel(tmp_path_factory):
    """Launch the worker once with torchrun, as users do; load every rank's results per mode."""
    out = tmp_path_factory.mktemp("parallel_train")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
        str(WORKER), "--mode", *MODES, "--grad-ckpt", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun timed out after {TIMEOUT_S} s: {' '.join(cmd)}" + _tail(exc.stdout, exc.stderr))
    assert proc.returncode == 0, f"torchrun failed (rc {proc.returncode}): {' '.join(cmd)}" + _tail(
        proc.stdout, proc.stderr
    )
    return {mode: [torch.load(out / f"{mode}_rank{r}.pt") for r in range(worker.WORLD_SIZE)] for mode in MODES}


@pytest.fixture(scope="module")
def reference():
    """Single process, no torch.distributed; single-threaded like the workers (OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {rope: worker.single_process_reference(rope) for rope in (False, True)}
    finally:
        torch.set_num_threads(threads)


def _assert_dicts_close(actual: dict, expected: dict, what: str, **tol) -> None:
    assert actual.keys() == expected.keys(), f"{what}: parameter names differ"
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, **tol, msg=lambda m, name=name: f"{what} {name}: {m}")


@pytest.mark.parametrize("rope,ckpt", PASSES, ids=[f"rope={r}-ckpt={c}" for r, c in PASSES])
@pytest.mark.parametrize("mode", MODES)
def test_matches_single_process(parallel, reference, mode, rope, ckpt):
    ref = reference[rope]
    ranks = [result["passes"][f"rope={rope},ckpt={ckpt}"] for result in parallel[mode]]
    for rank, rec in enumerate(ranks):
        # checkpointing is really on (each layer's forward re-runs in backward) and enabled without warnings
        assert rec["ckpt_flag"] is ckpt
        layers = worker.config_for(rope).num_hidden_layers
        assert rec["layer_calls_first_step"] == layers * (2 if ckpt else 1)
        assert rec["deprecation_warnings"] == []

        torch.testing.assert_close(
            rec["output"], ref["outputs"][rank], **OUT_TOL, msg=lambda m: f"rank {rank} output: {m}"
        )
        losses, ref_losses = torch.stack(rec["losses"]), torch.stack(ref["losses"][rank])
        torch.testing.assert_close(losses, ref_losses, **OUT_TOL, msg=lambda m: f"rank {rank} losses: {m}")
        # every rank holds the same averaged gradients (DDP all-reduce / FSDP2 reduce-scatter + full_tensor)
        _assert_dicts_close(rec["grads"], ref["grads"], f"rank {rank} grad", **GRAD_TOL)
        _assert_dicts_close(rec["params"], ref["params"], f"rank {rank} param after {worker.STEPS} steps", **GRAD_TOL)
    _assert_dicts_close(ranks[1]["grads"], ranks[0]["grads"], "grad rank 1 vs rank 0", atol=0.0, rtol=0.0)


def test_fsdp2_shards_every_parameter(parallel):
    for rope, _ in PASSES:
        rec = parallel["fsdp2"][0]["passes"][f"rope={rope},ckpt=False"]
        assert rec["all_dtensor"]
        assert rec["layer_classes"] == ["FSDPSiglipEncoderLayer"] * worker.config_for(rope).num_hidden_layers
        assert rec["local_numel"] <= rec["global_numel"] // 2 + 64  # dim-0 shards (rounded up), 2 ranks


def test_check_is_sensitive(reference):
    """The ranks' packs differ and one rank's own gradients are far from the average: a missing all-reduce
    (or a rank training on the other rank's data) could not pass the comparison above."""
    packs = [worker.rank_pack(rank, rope=False) for rank in range(worker.WORLD_SIZE)]
    assert len(packs[0]["cu_seqlens"]) > 3 and len(packs[1]["cu_seqlens"]) > 3  # several images per pack
    assert packs[0]["packed_pixel_values"].shape != packs[1]["packed_pixel_values"].shape
    for rope in (False, True):
        ref = reference[rope]
        for rank_grads in ref["rank_grads"]:
            worst = max((rank_grads[n] - ref["grads"][n]).abs().max().item() for n in ref["grads"])
            assert worst > 1e-2
