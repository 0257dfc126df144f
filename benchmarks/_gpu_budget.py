# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Sections 4a and 5 of `gpu_check.py`: forward cost per patch by token budget, and peak GPU memory per patch.

The images are the ones the end-to-end extraction uses (`photo_sizes`: typical photo resolutions and aspects, run
through the BAGEL size rule of the model's image processor); only their patch grids matter here, so the pixels are
random and nothing is decoded. Each budget packs them first-fit decreasing, as `extract_features.py` does, and one
pass runs every forward. No peer exists for these numbers: they are absolute (patches/s, MFU, bytes per patch).
"""

from __future__ import annotations

import random

import torch
from _gpu_setup import Env, analytic_flops, first_fit_decreasing, make_pack, repo_code, skipped, table

# (width, height) aspect ratios of common photos, landscape and portrait
ASPECTS = ((4, 3), (3, 2), (16, 9), (1, 1), (3, 4), (2, 3), (9, 16), (5, 4))


def photo_sizes(env: Env, seed: int = 5) -> list[tuple[int, int]]:
    """(width, height) of the generated photos: long side uniform in `photo_px`, a common aspect ratio."""
    rng = random.Random(seed)
    sizes = []
    for _ in range(env.geo.photos):
        long_side = rng.randint(*env.geo.photo_px)
        aw, ah = rng.choice(ASPECTS)
        scale = long_side / max(aw, ah)
        sizes.append((max(16, round(aw * scale)), max(16, round(ah * scale))))
    return sizes


def processor(env: Env):
    """Our image processor with the settings that fit the model (what a converted repo ships)."""
    cls = repo_code().image_processing().SiglipNaViTImageProcessor
    return cls(**cls.settings_for_model(env.config()))


def photo_grids(env: Env) -> list[tuple[int, int]]:
    proc = processor(env)
    return [proc.patch_grid(w, h) for w, h in photo_sizes(env)]


def budget_batches(grids: list[tuple[int, int]], budget: int) -> tuple[list[list[tuple[int, int]]], int]:
    """The forwards of one budget (each a list of grids, first-fit decreasing) and how many images fit no forward."""
    fitting = [g for g in grids if g[0] * g[1] <= budget]
    batches = first_fit_decreasing([h * w for h, w in fitting], budget)
    return [[fitting[i] for i in batch] for batch in batches], len(grids) - len(fitting)


def budget_sweep(env: Env) -> tuple[str, dict]:
    """The sweep's markdown and {budget: forward-only images/s} (the end-to-end runs compare with it)."""
    grids = photo_grids(env)
    model = env.model(False, env.half)
    rows, rates = [], {}
    for budget in env.geo.budgets:
        batches, left_out = budget_batches(grids, budget)
        packs = [make_pack(batch, env, seed=k, dtype=env.half) for k, batch in enumerate(batches)]
        if not packs:
            rows.append([budget, 0, 0, 0, "-", "0", "-", "-", "no image fits this budget"])
            continue
        lengths = [n for p in packs for n in torch.diff(p["cu_seqlens"].cpu()).tolist()]

        def one_pass(packs=packs):
            for pack in packs:
                model(**pack)

        seconds = env.medians({"pass": one_pass}, max(2, env.geo.repeats // 3))["pass"]
        patches = sum(lengths)
        rates[budget] = len(lengths) / seconds
        note = f"{left_out} images larger than the budget left out" if left_out else ""
        rows.append([budget, len(packs), len(lengths), patches, f"{1e6 * seconds / patches:.2f}",
                     f"{patches / seconds:,.0f}", env.mfu(analytic_flops(lengths, env.geo), seconds),
                     f"{rates[budget]:.1f}", note])  # fmt: skip
    best = max(rows, key=lambda row: float(row[5].replace(",", "")))[0]
    caption = (
        f"a. Forward only, {len(grids)} photo-sized images (grids {min(h * w for h, w in grids)}.."
        f"{max(h * w for h, w in grids)} patches), {str(env.half).removeprefix('torch.')}, "
        f"{env.geo.layers} layers, default validate_inputs, median of {max(2, env.geo.repeats // 3)} passes"
    )
    headers = ["budget (patches)", "forwards", "images", "patches", "us / patch", "patches/s", "MFU", "images/s", ""]
    text = caption + "\n\n" + table(headers, rows) + f"\n\nFastest per patch: budget {best}."
    return text, rates


def memory(env: Env) -> str:
    """Peak memory above the model + inputs during one packed forward, per patch, for a fullest pack per budget."""
    if not env.cuda:
        return skipped("peak GPU memory", "needs CUDA memory statistics")
    grids = photo_grids(env)
    model = env.model(False, env.half)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    rows, per_patch = [], []
    for budget in env.geo.budgets:
        batches, _ = budget_batches(grids, budget)
        if not batches:
            continue
        pack = make_pack(max(batches, key=lambda b: sum(h * w for h, w in b)), env, dtype=env.half)
        patches = pack["packed_pixel_values"].shape[0]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model(**pack)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        per_patch.append(extra / patches)
        rows.append([patches, f"{extra / 2**30:.2f}", f"{extra / patches / 1024:.1f}"])
    total = torch.cuda.get_device_properties(env.device).total_memory
    fits = int((0.9 * total - weights) / max(per_patch))
    caption = (
        f"{str(env.half).removeprefix('torch.')} packed forward (no grad), {env.geo.layers} layers; weights "
        f"{weights / 2**30:.2f} GiB; "
        f"peak above weights + inputs"
    )
    text = caption + "\n\n" + table(["patches in the forward", "peak extra GiB", "KiB / patch"], rows)
    return text + (
        f"\n\nAt {max(per_patch) / 1024:.1f} KiB per patch, one forward of ~{fits:,} patches fits in 90% of this GPU's "
        f"{total / 2**30:.0f} GiB ({fits // (env.geo.side**2):,} full-size {env.geo.image_size} px images)."
    )
