# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Section 4 of `gpu_check.py`: the token-budget sweep (`_gpu_budget`) and end-to-end `extract_features.py`.

The end-to-end runs use a folder of generated JPEG photos (smooth colour fields plus grain, typical photo sizes),
the random model saved as a model folder (`save_pretrained` + the processor's config), and `extract_features.py`
run as a user runs it (a subprocess from the repo root, documented CLI flags only), once per DataLoader worker
count. Its images/s (from the manifest's `last_run` summary: encode loop only, model loading excluded) is compared
with the forward-only rate of the same images at the same budget: below it, decoding + preprocessing is the
bottleneck. It must not import extract_features (a script, not importable without its folder on sys.path).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
from _gpu_budget import budget_sweep, photo_sizes, processor
from _gpu_setup import REPO_ROOT, Env, table

ENOUGH = 0.9  # an end-to-end rate at >= this share of the forward-only rate: preprocessing keeps up


def token_budget(env: Env) -> str:
    sweep, rates = budget_sweep(env)
    return sweep + "\n\n" + end_to_end(env, rates.get(env.geo.extract_budget))


def write_photos(env: Env, folder: Path) -> list[Path]:
    """JPEG photos of `photo_sizes`: a smooth random colour field (bicubic from a coarse grid) plus fine grain, so
    they compress and decode like photos rather than like noise."""
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    grain = rng.integers(-10, 11, (64, 64, 3), dtype=np.int16)
    paths = []
    for i, (w, h) in enumerate(photo_sizes(env)):
        coarse = rng.integers(0, 256, (max(2, h // 32), max(2, w // 32), 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
        pixels = smooth + np.tile(grain, (h // 64 + 1, w // 64 + 1, 1))[:h, :w]
        path = folder / f"photo_{i:04d}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def save_model(env: Env, folder: Path) -> Path:
    """The half-precision random model as a model folder `extract_features.py --model` loads."""
    from transformers.utils import logging

    logging.disable_progress_bar()  # transformers 5.x draws one per saved shard
    env.model(False, env.half).save_pretrained(folder)
    processor(env).save_pretrained(folder)
    return folder


def preprocess_rate(env: Env, paths: list[Path]) -> float:
    """Images/s of decode + preprocess in this one process (what one DataLoader worker does per image)."""
    from PIL import Image

    proc = processor(env)
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            proc(images=image)
    return len(paths) / (time.perf_counter() - start)


def extract_rate(env: Env, model_dir: Path, photos: Path, output: Path, workers: int) -> tuple[Optional[float], str]:
    """(images/s, note) of one `extract_features.py` run; (None, why) when it failed."""
    command = [
        sys.executable, "extract_features.py", "--model", str(model_dir), "--input", str(photos),
        "--output", str(output), "--dtype", str(env.half).removeprefix("torch."), "--device", str(env.device),
        "--num-workers", str(workers), "--max-patches-per-batch", str(env.geo.extract_budget), "--no-progress",
    ]  # fmt: skip
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        return None, "timed out after 240 s"
    wall = time.perf_counter() - start
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no stderr"])[-1]
        return None, f"exit {done.returncode}: {last[:200]}"
    try:
        rate = json.loads((output / "manifest.json").read_text())["last_run"]["images_per_second"]
        return float(rate), f"process {wall:.0f} s"
    except (OSError, KeyError, TypeError, ValueError):
        found = re.search(r"([0-9.]+) images/s", done.stdout)
        if found:
            return float(found.group(1)), f"rate from stdout; process {wall:.0f} s"
        return env.geo.photos / wall, f"no rate reported: whole process wall time ({wall:.0f} s)"


def end_to_end(env: Env, forward_rate: Optional[float]) -> str:
    g = env.geo
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        tmp = Path(tmp)
        paths = write_photos(env, tmp / "photos")
        model_dir = save_model(env, tmp / "model")
        one_process = preprocess_rate(env, paths[: min(64, len(paths))])
        results = {w: extract_rate(env, model_dir, tmp / "photos", tmp / f"features_w{w}", w) for w in g.workers}
    rows = []
    for workers, (rate, note) in results.items():
        if rate is None:
            env.failures.append(f"extract_features.py --num-workers {workers}")
        share = f"{rate / forward_rate:.2f}" if rate and forward_rate else "-"
        rows.append([workers, f"{rate:.1f}" if rate else "FAILED", share, note])
    caption = (
        f"b. End to end: `extract_features.py` on {g.photos} generated JPEG photos "
        f"(--max-patches-per-batch {g.extract_budget}, --dtype {str(env.half).removeprefix('torch.')}); forward "
        f"only at that budget: {forward_rate or 0:.1f} images/s; decode + preprocess in one process: "
        f"{one_process:.1f} images/s"
    )
    body = table(["--num-workers", "images/s", "/ forward only", "notes"], rows)
    return caption + "\n\n" + body + "\n\n" + verdict(results, forward_rate)


def verdict(results: dict, forward_rate: Optional[float]) -> str:
    if not forward_rate:
        return "No forward-only rate at this budget: no verdict."
    keeping_up = [w for w, (rate, _) in results.items() if rate and rate >= ENOUGH * forward_rate]
    if keeping_up:
        return f"Preprocessing keeps up (>= {ENOUGH:.0%} of the forward-only rate) from {min(keeping_up)} workers."
    best = max((rate or 0.0 for rate, _ in results.values()), default=0.0)
    return (
        f"Preprocessing is the bottleneck: the best run reaches {best / forward_rate:.0%} of the forward-only rate "
        f"with up to {max(results)} workers."
    )
