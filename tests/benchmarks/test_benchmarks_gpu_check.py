# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""The GPU check cannot rot before a GPU comes: its CPU dry run (`--cpu-smoke`) runs every section end to end.

Runs `python benchmarks/gpu_check.py --cpu-smoke` as a user runs it (a subprocess with this venv's python, from the
repo root) and checks that it exits 0, prints every section heading, reports the CUDA-only parts as skipped, and
imports nothing the GPU image lacks.
"""

import subprocess
import sys

from siglip_navit_tools import repo_code

ROOT = repo_code.REPO_ROOT

HEADINGS = (
    "## GPU check",
    "### 1. Accuracy",
    "### 2. Peers",
    "### 3. Sync-free forward and CUDA graphs",
    "### 4. Token budget and end-to-end extraction",
    "### 5. Peak GPU memory per patch",
)


def test_cpu_smoke_runs_every_section():
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--cpu-smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = f"exit {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr[-4000:]}"
    assert done.returncode == 0, report
    for heading in HEADINGS:
        assert f"\n{heading}" in "\n" + done.stdout, f"missing {heading!r}\n{report}"
    assert "FAILED" not in done.stdout, report
    assert done.stdout.rstrip().endswith("ALL CHECKS PASSED"), report
    # what needs CUDA says so instead of silently vanishing
    assert "flash_attention_2: skipped: needs a CUDA device" in done.stdout, report
    assert "torch.cuda.graph capture: skipped: needs CUDA" in done.stdout, report
    assert "peak GPU memory: skipped: needs CUDA memory statistics" in done.stdout, report
    # every table the dry run can fill is there: the accuracy rows, the peers, the probe, the sweep, the extraction
    for row in ("vs fp32 eager", "packed vs per-image", "transformers SiglipVisionModel (sdpa)",
                "ours, image by image", "ours, one image per forward", "validate_inputs=False",
                'torch.compile(backend="eager") (CPU dry run) | yes', "| --num-workers |"):  # fmt: skip
        assert row in done.stdout, f"missing {row!r}\n{report}"
    # the GPU image has no datasets / nbclient / flash-attn: the script itself must not import them
    assert "modules the GPU image lacks, imported: none" in done.stdout, report

