# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""One-command GPU check: accuracy of every path, the peers, CUDA graphs, token budgets, extraction, memory.

    python benchmarks/gpu_check.py [--layers 26] [--repeats 10] [--peak-tflops 989]
    python benchmarks/gpu_check.py --cpu-smoke        # the same script on CPU, tiny shapes, in seconds (CI)

Runs as it is on a bare CUDA machine (torch >= 2.1, transformers 4.49 / 5.x, no network; the repo copied, not
installed; flash-attn, torch's varlen kernel and Siglip2 optional: what is missing is reported as skipped). The
model is BAGEL-7B-MoT's tower (so400m/14, 980 px, 26 layers) with random weights. Prints README-ready markdown:

  1. accuracy: fp32 sdpa and bf16 sdpa (torch varlen) / flash-attn vs fp32 eager, packed vs per-image, rope off/on
  2. peers, same weights, bf16, as time ratios: ours vs transformers SiglipVisionModel on one 980 px image; the
     mixed pack [4900, 1024, 2304, 576] packed vs image by image vs Siglip2 (NaFlex) padded + mask; 64 small
     images packed vs one per forward
  3. validate_inputs=False vs default; torch.cuda.graph capture and torch.compile(mode="reduce-overhead") of a
     fixed-shape pack (each in a child process with a timeout): does it capture, time ratio to eager
  4. forward time per patch at token budgets 4k / 16k / 64k, and extract_features.py images/s end to end on
     generated JPEG photos with 0 / 2 / 4 / 8 DataLoader workers vs the forward-only rate
  5. peak GPU memory per patch of the packed bf16 forward, and how many patches fit
  6. serve.py: continuous packing vs --batching none (bench_serve.py's load generator), bf16, concurrency 1 / 8 / 64:
     images/s, p50 / p99 latency, packing efficiency (needs fastapi, uvicorn and prometheus-client installed)

Exit code: 0 when every check passes, 1 when a check fails or a section crashes (the rest still runs), 2 without
CUDA (unless --cpu-smoke). Takes about 4 minutes on one H100/H200. Owns only the order of the sections and the
command line; the sections live in benchmarks/_gpu_*.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time

import torch
from _gpu_accuracy import accuracy
from _gpu_budget import memory
from _gpu_extract import token_budget
from _gpu_graphs import graphs, run_probe
from _gpu_peers import peers
from _gpu_serve import serving
from _gpu_setup import PEAK_TFLOPS, Env, Geometry, repo_code, run_section

GPU_IMAGE_LACKS = ("datasets", "nbclient", "flash_attn")
SECTIONS = (
    ("### 1. Accuracy: every attention path vs fp32 eager, packed vs per-image", accuracy),
    ("### 2. Peers: same weights, same process, time ratios", peers),
    ("### 3. Sync-free forward and CUDA graphs", graphs),
    ("### 4. Token budget and end-to-end extraction", token_budget),
    ("### 5. Peak GPU memory per patch", memory),
    ("### 6. Serving: continuous packing vs one request per forward", serving),
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=None, help="encoder layers (default: 26; --cpu-smoke: 2)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per measurement (median)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak; guessed from the GPU name")
    parser.add_argument("--cpu-smoke", action="store_true", help="dry run on CPU with tiny shapes (what CI runs)")
    parser.add_argument("--probe", choices=("graph", "compile"), default=None, help=argparse.SUPPRESS)  # section 3
    return parser.parse_args(argv)


def make_env(args: argparse.Namespace) -> Env:
    if args.cpu_smoke:
        geo = Geometry.smoke_test()
        if args.layers:
            geo = dataclasses.replace(geo, layers=args.layers)
        return Env(geo=geo, device=torch.device("cpu"), half=torch.bfloat16, peak_tflops=None)
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    geo = Geometry.full(layers=args.layers or 26, repeats=args.repeats)
    return Env(geo=geo, device=torch.device("cuda"), half=torch.bfloat16, peak_tflops=peak)


def header(env: Env) -> str:
    import transformers

    modeling = repo_code().modeling()
    device = torch.cuda.get_device_name() if env.cuda else f"CPU dry run (--cpu-smoke), {platform.processor() or 'cpu'}"
    g = env.geo
    return (
        f"## GPU check\n\n{device}; torch {torch.__version__} (CUDA {torch.version.cuda}); transformers "
        f"{transformers.__version__}; python {platform.python_version()}; flash-attn: "
        f"{modeling.flash_attn_varlen_func is not None}; torch varlen: {modeling.varlen_attn is not None}; "
        f"bf16 peak {env.peak_tflops or '?'} TFLOP/s.\n\nModel: hidden {g.hidden}, MLP {g.mlp}, {g.heads} heads, "
        f"{g.layers} layers, patch {g.patch}, {g.image_size} px ({g.side}x{g.side} positions), random weights.\n"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (run with --cpu-smoke for a dry run on CPU)")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    torch.backends.cudnn.allow_tf32 = False
    torch.set_grad_enabled(False)
    env = make_env(args)
    if args.probe:
        return run_probe(env, args.probe)
    start = time.perf_counter()
    print(header(env), flush=True)
    for heading, body in SECTIONS:
        run_section(env, heading, body)
    print(f"Total {time.perf_counter() - start:.0f} s.\n")
    if env.geo.smoke:  # on the GPU image these are not installed at all; here they are, so an import would show
        lacking = [name for name in GPU_IMAGE_LACKS if sys.modules.get(name) is not None]
        print(f"(dry run) modules the GPU image lacks, imported: {', '.join(lacking) or 'none'}\n")
    print("ALL CHECKS PASSED" if not env.failures else "FAILED: " + "; ".join(env.failures))
    return 1 if env.failures else 0


if __name__ == "__main__":
    sys.exit(main())
