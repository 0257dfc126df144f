"""The image-embedding server: continuous packing vs `--batching none`, images/s and latency ratios, one run.

    .venv/bin/python benchmarks/bench_serve.py [--layers 4] [--hidden 128] [--requests 96] [--rounds 2]
    python benchmarks/bench_serve.py --device cuda --dtype bfloat16 --concurrency 1 8 64 ...   # a GPU

Two `serve.py` servers run side by side on loopback (started as a user starts them, `siglip_navit_tools.serve.process`)
over the same tiny-but-not-trivial converted repo: one with continuous packing (the default), one with `--batching
none` (each request alone in its forwards: what a plain handler does). A bounded closed-loop load generator (stdlib
`http.client`, one keep-alive connection per client thread, request bodies built beforehand) sends each server the
same requests at concurrency 1 / 8 / 32: first small images (224-448 px, the common embedding request), then a mix
with photo-sized images (~1 in 6, 600-1600 px). The two servers are driven in turn, round by round (the order
alternates; at concurrency 1 request by request), so drifting load affects both alike. Prints markdown: images/s,
p50 / p99 request latency and packing efficiency (images per forward, patches per forward / budget, from each
server's /metrics) per mode, and the ratios continuous / none, with the acceptance checks (latency at concurrency 1
<= 1.05x, throughput > 1x at 8 and 32 on small images).

`compare()` and `markdown()` are reused by `gpu_check.py`'s serving section.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

MODES = ("continuous", "none")
COUNTERS = ("siglip_navit_forwards_total", "siglip_navit_images_total", "siglip_navit_patches_total")


# ---- requests -------------------------------------------------------------------------------------------------------
def photo_png(width: int, height: int, rng: np.random.Generator) -> bytes:
    """A smooth colour field plus grain: compresses and decodes like a photo (PNG, so no JPEG tables differ)."""
    coarse = rng.integers(0, 256, (max(2, height // 48), max(2, width // 48), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    grain = rng.integers(-6, 7, (height, width, 3), dtype=np.int16)
    buffer = io.BytesIO()
    Image.fromarray((smooth + grain).clip(0, 255).astype(np.uint8)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def image_sizes(kind: str, n: int, seed: int) -> list[tuple[int, int]]:
    """(width, height) of `n` request images: "small" 224-448 px a side; "mixed": ~1 in 6 photo-sized instead."""
    rng = np.random.default_rng(seed)
    sizes = []
    for i in range(n):
        if kind == "mixed" and i % 6 == 5:
            long_side = int(rng.integers(600, 1601))
            short = int(long_side * rng.uniform(0.56, 0.8))
            sizes.append((long_side, short) if i % 2 else (short, long_side))
        else:
            sizes.append((int(rng.integers(224, 449)), int(rng.integers(224, 449))))
    return sizes


def request_bodies(model: str, kind: str, n: int, seed: int = 0, distinct: int = 24) -> list[bytes]:
    """`n` JSON bodies of one image each (cycling over `distinct` images, so building them stays cheap)."""
    rng = np.random.default_rng(seed + 1)
    sizes = image_sizes(kind, distinct, seed)
    images = [base64.b64encode(photo_png(w, h, rng)).decode() for w, h in sizes]
    return [json.dumps({"model": model, "input": [images[i % distinct]]}).encode() for i in range(n)]


# ---- load ---------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One measurement: `requests` requests sent by `concurrency` clients to one server."""

    mode: str
    kind: str
    concurrency: int
    seconds: float = 0.0
    latencies: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    counters: dict = field(default_factory=dict)  # deltas of the server's forwards / images / patches


def read_counters(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    return {name: float(re.search(rf"^{name} ([0-9.e+-]+)$", text, flags=re.M).group(1)) for name in COUNTERS}


def drive(url: str, bodies: Sequence[bytes], concurrency: int, run: Run) -> None:
    """Send every body once, from `concurrency` closed-loop clients (each waits for its answer before sending the
    next); fills `run` with the wall time and each request's latency."""
    host, port = url.removeprefix("http://").split(":")
    next_index = iter(range(len(bodies)))
    lock = threading.Lock()

    def client() -> None:
        connection = http.client.HTTPConnection(host, int(port), timeout=600)
        while True:
            with lock:
                index = next(next_index, None)
            if index is None:
                break
            start = time.perf_counter()
            connection.request("POST", "/v1/embeddings", body=bodies[index],
                               headers={"Content-Type": "application/json"})  # fmt: skip
            response = connection.getresponse()
            payload = response.read()
            seconds = time.perf_counter() - start
            with lock:
                if response.status == 200:
                    run.latencies.append(seconds)
                else:
                    run.errors.append(f"{response.status}: {payload[:200]!r}")
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    run.seconds = time.perf_counter() - start


def measure(url: str, mode: str, kind: str, bodies: Sequence[bytes], concurrency: int) -> Run:
    run = Run(mode, kind, concurrency)
    before = read_counters(url)
    drive(url, bodies, concurrency, run)
    after = read_counters(url)
    run.counters = {name: after[name] - before[name] for name in COUNTERS}
    return run


def measure_lockstep(urls: dict[str, str], kind: str, bodies: Sequence[bytes]) -> dict[str, Run]:
    """Concurrency 1, the servers interleaved request by request (the order alternating): each body goes to one
    server, then the other, so both see the same machine load at the same moments."""
    runs = {mode: Run(mode, kind, 1) for mode in urls}
    before = {mode: read_counters(url) for mode, url in urls.items()}
    for i, body in enumerate(bodies):
        for mode in (list(urls) if i % 2 == 0 else list(reversed(urls))):
            single = Run(mode, kind, 1)
            drive(urls[mode], [body], 1, single)
            runs[mode].latencies += single.latencies
            runs[mode].errors += single.errors
            runs[mode].seconds += single.seconds
    for mode, url in urls.items():
        after = read_counters(url)
        runs[mode].counters = {name: after[name] - before[mode][name] for name in COUNTERS}
    return runs


def compare(
    urls: dict[str, str], model: str, kinds: Sequence[str], concurrencies: Sequence[int], requests: int, rounds: int
) -> list[tuple[str, int, dict[str, list[Run]]]]:
    """For each workload kind and concurrency, both modes on the same requests: at concurrency 1 request by request
    in lockstep, above it `rounds` runs per mode, the modes
    alternating. The photo mix sends half the requests (its photos cost many small images each)."""
    results = []
    for kind in kinds:
        for concurrency in concurrencies:
            n = requests if kind == "small" else max(8, requests // 2)
            runs: dict[str, list[Run]] = {mode: [] for mode in urls}
            if concurrency == 1:
                for mode, run in measure_lockstep(urls, kind, request_bodies(model, kind, n, 17)).items():
                    runs[mode].append(run)
            else:
                bodies = request_bodies(model, kind, n, seed=17)
                for r in range(rounds):
                    for mode in (list(urls) if r % 2 == 0 else list(reversed(urls))):
                        runs[mode].append(measure(urls[mode], mode, kind, bodies, concurrency))
            results.append((kind, concurrency, runs))
            print(f"  measured {kind} images at concurrency {concurrency}", file=sys.stderr, flush=True)
    return results


def warm_up(urls: dict[str, str], model: str) -> None:
    """A few requests of each kind per server (the first forwards of new shapes allocate)."""
    for url in urls.values():
        for kind in ("small", "mixed"):
            drive(url, request_bodies(model, kind, 6, seed=99), 2, Run("warm-up", kind, 2))


# ---- report -------------------------------------------------------------------------------------------------------
def summary(runs: Sequence[Run], budget: int) -> dict[str, float]:
    latencies = sorted(x for run in runs for x in run.latencies)
    images = sum(run.counters["siglip_navit_images_total"] for run in runs)
    forwards = sum(run.counters["siglip_navit_forwards_total"] for run in runs)
    patches = sum(run.counters["siglip_navit_patches_total"] for run in runs)
    return {
        "images_per_s": sum(len(run.latencies) for run in runs) / sum(run.seconds for run in runs),
        "p50": statistics.median(latencies) if latencies else float("nan"),
        "p99": latencies[int(round(0.99 * (len(latencies) - 1)))] if latencies else float("nan"),
        "images_per_forward": images / forwards if forwards else float("nan"),
        "fill": patches / (forwards * budget) if forwards else float("nan"),
        "errors": sum(len(run.errors) for run in runs),
    }


def markdown(results, budget: int) -> tuple[str, list[str]]:
    """The table, and the failed acceptance checks (empty: all passed)."""
    lines = [
        "| images | concurrency | mode | images/s | p50 ms | p99 ms | images/forward | patches/forward / budget |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    ratios = ["| images | concurrency | throughput ratio | p50 ratio | p99 ratio |", "| --- | --- | --- | --- | --- |"]
    failures = []
    for kind, concurrency, runs in results:
        stats = {mode: summary(mode_runs, budget) for mode, mode_runs in runs.items()}
        for mode, s in stats.items():
            lines.append(
                f"| {kind} | {concurrency} | {mode} | {s['images_per_s']:.1f} | {1000 * s['p50']:.0f} | "
                f"{1000 * s['p99']:.0f} | {s['images_per_forward']:.2f} | {100 * s['fill']:.1f}% |"
                + (f" {s['errors']} errors" if s["errors"] else "")
            )
            if s["errors"]:
                failures.append(f"{kind} c={concurrency} {mode}: {s['errors']} failed requests")
        if set(stats) == set(MODES):
            c, n = stats["continuous"], stats["none"]
            throughput, p50, p99 = c["images_per_s"] / n["images_per_s"], c["p50"] / n["p50"], c["p99"] / n["p99"]
            ratios.append(f"| {kind} | {concurrency} | {throughput:.2f}x | {p50:.2f}x | {p99:.2f}x |")
            if concurrency == 1 and p50 > 1.05:
                failures.append(f"{kind} c=1: continuous p50 latency {p50:.2f}x the baseline's (> 1.05x)")
            if kind == "small" and concurrency > 1 and throughput <= 1.0:
                failures.append(f"small c={concurrency}: continuous throughput {throughput:.2f}x the baseline's")
    return "\n".join(lines) + "\n\nContinuous packing / `--batching none`:\n\n" + "\n".join(ratios), failures


# ---- the command --------------------------------------------------------------------------------------------------
def start_servers(model_dir: Path, args_for_mode: dict[str, list[str]], env: Optional[dict] = None) -> dict:
    """One ServerProcess per mode, started in parallel (each loads the model)."""
    from siglip_navit_tools.serve.process import ServerProcess

    servers = {mode: ServerProcess(model_dir, args, env=env) for mode, args in args_for_mode.items()}
    threads = [threading.Thread(target=server.start) for server in servers.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for mode, server in servers.items():
        if not server.url:
            for other in servers.values():
                other.kill()
            raise RuntimeError(f"the {mode} server did not start:\n{server.log()}")
    return servers


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="encoder layers of the random model")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size (heads of 64 dims)")
    parser.add_argument("--mlp", type=int, default=512, help="MLP size")
    parser.add_argument("--requests", type=int, default=96, help="requests per measurement at concurrency > 1")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per mode and setting (alternating)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--kinds", nargs="+", default=["small", "mixed"], choices=["small", "mixed"])
    parser.add_argument("--max-patches-per-batch", type=int, default=16384)
    parser.add_argument("--max-wait-ms", type=float, default=None, help="default: the server's")
    parser.add_argument("--workers", type=int, default=None, help="the servers' --workers (default: theirs)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)

    from siglip_navit_tools import cpu, testing

    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        model_dir = testing.tiny_converted_repo(
            Path(tmp) / "bench-model", layers=args.layers, hidden=args.hidden, mlp=args.mlp,
            heads=max(1, args.hidden // 64),
        )  # fmt: skip
        common = ["--dtype", args.dtype, "--device", args.device, "--max-patches-per-batch",
                  str(args.max_patches_per_batch), "--max-queue-patches", str(64 * args.max_patches_per_batch),
                  "--max-concurrent-requests", "1024", "--log-level", "warning"]  # fmt: skip
        if args.max_wait_ms is not None:
            common += ["--max-wait-ms", str(args.max_wait_ms)]
        if args.workers is not None:
            common += ["--workers", str(args.workers)]
        servers = start_servers(model_dir, {mode: [*common, "--batching", mode] for mode in MODES},
                                env={"HF_HUB_OFFLINE": "1"})  # fmt: skip
        try:
            urls = {mode: server.url for mode, server in servers.items()}
            warm_up(urls, model_dir.name)
            results = compare(urls, model_dir.name, args.kinds, args.concurrency, args.requests, args.rounds)
        finally:
            for server in servers.values():
                server.kill()
    table, failures = markdown(results, args.max_patches_per_batch)
    print(f"## Serving: continuous packing vs one request per forward ({args.device}, {args.dtype})\n")
    print(f"{cpu.describe()}; model: hidden {args.hidden}, MLP "
          f"{args.mlp}, {max(1, args.hidden // 64)} heads, {args.layers} layers, patch 14, 980 px (random weights); "
          f"budget {args.max_patches_per_batch} patches; one image per request; {args.rounds} rounds per "
          "cell.\n")  # fmt: skip
    print(table)
    print("\n" + ("Acceptance: all checks passed." if not failures else "Acceptance FAILED: " + "; ".join(failures)))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
