# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Section 6 of `gpu_check.py`: `serve.py` with continuous packing vs `--batching none`, in bf16, up to concurrency 64.

Both servers load the random model of this run, saved as a model folder (section 4b's `save_model`), on the same
device; they are driven one at a time by `bench_serve.py`'s closed-loop load generator (stdlib `http.client`), on the
same requests: small images (224-448 px) and a mix with photo-sized ones. Prints `bench_serve.markdown`'s tables:
images/s, p50 / p99 latency, images per forward and budget fill, and the ratios continuous / none. On a GPU the
acceptance checks count (latency at concurrency 1 <= 1.05x, throughput > 1x above it on small images); the CPU dry
run only checks that every request succeeds. The server needs fastapi, uvicorn and prometheus-client: where they
are not installed the section says so and skips.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

from _gpu_extract import save_model
from _gpu_setup import Env, repo_code, skipped

SERVER_PACKAGES = ("fastapi", "uvicorn", "prometheus_client")


def serving(env: Env) -> str:
    missing = [name for name in SERVER_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        return skipped("serve.py continuous packing vs --batching none", f"not installed: {', '.join(missing)}")
    repo_code()  # this checkout's siglip_navit_tools, for bench_serve's server launcher
    import bench_serve

    g = env.geo
    dtype = str(env.half).removeprefix("torch.")
    common = ["--dtype", dtype, "--device", str(env.device), "--max-patches-per-batch", str(g.serve_budget),
              "--max-queue-patches", str(64 * g.serve_budget), "--max-concurrent-requests", "1024",
              "--log-level", "warning"]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gpu_check_serve_") as tmp:
        model_dir = save_model(env, Path(tmp) / "model")
        servers = bench_serve.start_servers(
            model_dir, {mode: [*common, "--batching", mode] for mode in bench_serve.MODES}, env={"HF_HUB_OFFLINE": "1"}
        )
        try:
            urls = {mode: server.url for mode, server in servers.items()}
            bench_serve.warm_up(urls, model_dir.name)
            results = bench_serve.compare(
                urls, model_dir.name, ("small", "mixed"), g.serve_concurrency, g.serve_requests, rounds=2
            )
        finally:
            for server in servers.values():
                server.kill()
    body, failures = bench_serve.markdown(results, g.serve_budget)
    errors = [f for f in failures if "failed requests" in f]
    counted = failures if env.cuda else errors  # on CPU (the dry run) timings are no verdict
    env.failures.extend(f"serving: {f}" for f in counted)
    caption = (
        f"Concurrency {', '.join(map(str, g.serve_concurrency))}; {g.serve_requests} one-image requests per cell, "
        f"--dtype {dtype}, budget {g.serve_budget} patches."
    )
    if env.cuda:
        verdict = "Acceptance: " + ("all checks passed." if not failures else "FAILED: " + "; ".join(failures))
    else:
        judged = [f for f in failures if f not in errors]
        verdict = (
            f"(CPU dry run: timings are not judged{': ' + '; '.join(judged) if judged else ''}) "
            + ("Every request succeeded." if not errors else "FAILED: " + "; ".join(errors))
        )
    return caption + "\n\n" + body + "\n\n" + verdict
