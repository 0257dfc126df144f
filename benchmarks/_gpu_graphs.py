# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Section 3 of `gpu_check.py`: the sync-free forward (`validate_inputs=False`) and CUDA graphs of a fixed-shape pack.

In this process: the default forward vs `validate_inputs=False` on the mixed pack. Each graph probe runs in a child
process (`gpu_check.py --probe graph|compile`) with a timeout, so a failed capture cannot poison this process's CUDA
context and a slow compile cannot eat the run: `graph` captures the forward with `torch.cuda.graph` and replays it,
`compile` runs `torch.compile(mode="reduce-overhead")` (CUDA graphs through inductor; on the CPU dry run the
`eager` backend, which exercises only dynamo's tracing). A child prints one JSON object per finished stage, so a
timeout still reports what it got to. Ratios are to the eager forward timed in the same child.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from _gpu_setup import Env, compare, make_pack, skipped, table

SCRIPT = Path(__file__).resolve().parent / "gpu_check.py"


def graphs(env: Env) -> str:
    ours = env.model(False, env.half)
    pack = make_pack(env.geo.mixed_grids, env, dtype=env.half)
    t = env.medians({"default": lambda: ours(**pack), "fast": lambda: ours(**pack, validate_inputs=False)})
    rows = [["default (validate_inputs=True: one device->host sync per forward)", "1.00"],
            ["validate_inputs=False", f"{t['fast'] / t['default']:.3f}"]]  # fmt: skip
    caption = f"a. Input validation, mixed pack, {str(env.half).removeprefix('torch.')} (median of {env.geo.repeats})"
    parts = [caption, "", table(["forward", "time / default"], rows), "", "b. CUDA graphs of the fixed-shape pack", ""]
    results = []
    if env.cuda:
        results.append(child_probe(env, "graph"))
    else:
        parts += [skipped("torch.cuda.graph capture", "needs CUDA"), ""]
    results.append(child_probe(env, "compile"))
    parts.append(table(["probe", "captures", "time / eager (same process)", "max abs diff vs eager", "notes"], results))
    return "\n".join(parts)


def child_probe(env: Env, probe: str) -> list[str]:
    """Run one probe in a child process; one table row from its JSON lines. A probe that reports an error (it does
    not capture) or runs out of time is a finding; a child that crashes without a report is a failure."""
    command = [sys.executable, str(SCRIPT), "--probe", probe, "--layers", str(env.geo.layers),
               "--repeats", str(env.geo.repeats)] + (["--cpu-smoke"] if env.geo.smoke else [])  # fmt: skip
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=env.geo.compile_timeout)
        stdout, stderr, status = done.stdout, done.stderr, f"exit {done.returncode}"
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        stderr, status, done = "", f"timed out after {env.geo.compile_timeout:.0f} s", None
    stages = {}
    for line in stdout.splitlines():
        try:
            stages.update(json.loads(line) if line.startswith("{") else {})
        except json.JSONDecodeError:  # the last line of a child killed mid-write
            pass
    label = {"graph": "torch.cuda.graph capture + replay", "compile": stages.get("label", "torch.compile")}[probe]
    seconds = time.perf_counter() - start
    if "ratio" in stages:
        notes = f"{stages.get('notes', '')} (child {seconds:.0f} s)".strip()
        return [label, "yes", f"{stages['ratio']:.3f}", f"{stages['diff']:.2e}", notes]
    if "error" not in stages and done is not None:
        env.failures.append(f"{probe} probe: {status}")
    error = stages.get("error") or (stderr.strip().splitlines() or ["no report"])[-1]
    return [label, "no", "-", "-", f"{status}: {error[:200]} (child {seconds:.0f} s)"]


# ----------------------------------------------------------------------------------------------------------------
# The child side (`gpu_check.py --probe ...`)
# ----------------------------------------------------------------------------------------------------------------
def run_probe(env: Env, probe: str) -> int:
    model = env.model(False, env.half)
    pack = make_pack(env.geo.mixed_grids, env, dtype=env.half)

    def eager():
        return model(**pack, validate_inputs=False).last_hidden_state

    reference = eager().clone()
    emit = lambda **kv: print(json.dumps(kv), flush=True)  # noqa: E731
    try:
        (graph_probe if probe == "graph" else compile_probe)(env, model, pack, eager, reference, emit)
    except Exception as exc:  # noqa: BLE001 - "does it capture" is the question: the answer goes to the parent
        emit(error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return 0


def graph_probe(env: Env, model, pack: dict, eager, reference, emit) -> None:
    """Capture one forward of a fixed-shape pack into a CUDA graph (static inputs), replay it, time it."""
    static = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in pack.items()}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graph's documentation asks
        for _ in range(3):
            model(**static, validate_inputs=False)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = model(**static, validate_inputs=False).last_hidden_state
    graph.replay()
    torch.cuda.synchronize()
    _, diff = compare(static_out, reference)
    t = env.medians({"eager": eager, "graph": graph.replay})
    emit(ratio=t["graph"] / t["eager"], diff=diff, notes="validate_inputs=False")


def compile_probe(env: Env, model, pack: dict, eager, reference, emit) -> None:
    """torch.compile the model (reduce-overhead on CUDA; dynamo with the eager backend on CPU) and time it."""
    from torch._dynamo.utils import counters

    if env.cuda:
        label, compiled = 'torch.compile(mode="reduce-overhead")', torch.compile(model, mode="reduce-overhead")
    else:
        label, compiled = 'torch.compile(backend="eager") (CPU dry run)', torch.compile(model, backend="eager")
    emit(label=label)
    start = time.perf_counter()
    out = compiled(**pack, validate_inputs=False).last_hidden_state.clone()
    env.sync()
    first = time.perf_counter() - start
    breaks = sum(counters["graph_break"].values())
    skips = sum(counters["inductor"].get(k, 0) for k in ("cudagraph_skips",))
    for _ in range(2):  # cudagraph trees record on a later call than the first
        compiled(**pack, validate_inputs=False)
    t = env.medians({"eager": eager, "compiled": lambda: compiled(**pack, validate_inputs=False)})
    _, diff = compare(out, reference)
    notes = f"first call {first:.1f} s; graph breaks {breaks}; cudagraph skips {skips}"
    emit(ratio=t["compiled"] / t["eager"], diff=diff, notes=notes)
