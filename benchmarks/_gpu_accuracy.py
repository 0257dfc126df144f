# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Section 1 of `gpu_check.py`: every attention path against fp32 eager, and packed against per-image, rope off and on.

Bounds (DESIGN.md): half-precision paths (torch varlen via sdpa, flash-attn) vs fp32 eager: cosine >= 0.9999 and
max|diff| <= 5e-2; fp32 sdpa vs fp32 eager (TF32 off): cosine >= 0.999999 and max|diff| <= 1e-4; packed vs the same
images one by one with the same kernel: max|diff| within the same bound. A miss is a failure (exit code 1). Owns no
model or pack code of its own (`_gpu_setup`).
"""

from __future__ import annotations

import torch
from _gpu_setup import Env, compare, make_pack, pack_lengths, skipped, split_pack, table

FP32_BOUND = (0.999999, 1e-4)  # (min cosine, max abs diff)
HALF_BOUND = (0.9999, 5e-2)


def accuracy(env: Env) -> str:
    """Both rope settings; the rope=True models are freed afterwards (the later sections use rope=False)."""
    parts = [accuracy_for(env, rope=False), accuracy_for(env, rope=True)]
    env.drop_models(rope=True)
    return "\n\n".join(parts)


def accuracy_for(env: Env, rope: bool) -> str:
    pack = make_pack(env.geo.mixed_grids, env)
    reference = env.model(rope, torch.float32, "eager")(**pack).last_hidden_state
    rows, notes = [], []
    rows += path_rows(env, rope, torch.float32, "sdpa", pack, reference, FP32_BOUND)
    rows += path_rows(env, rope, env.half, "sdpa", pack, reference, HALF_BOUND)
    if not env.cuda:
        notes.append(skipped("flash_attention_2", "needs a CUDA device"))
    elif env.modeling.flash_attn_varlen_func is None:
        notes.append(skipped("flash_attention_2", "flash-attn is not installed"))
    else:
        rows += path_rows(env, rope, env.half, "flash_attention_2", pack, reference, HALF_BOUND)
    if env.kernel("sdpa", env.half) != env.modeling.torch_varlen_attention.__name__:
        why = "needs CUDA" if not env.cuda else "this torch has no torch.nn.attention.varlen (torch >= 2.10)"
        notes.append(skipped("torch varlen kernel", f"{why}; sdpa ran SDPA image by image instead"))
    caption = (
        f"rope={rope}: {env.geo.layers} layers, mixed pack {pack_lengths(pack)} patches, reference fp32 eager "
        f"(TF32 off)"
    )
    body = table(["check", "cosine", "max abs diff", "bound (cosine, diff)", ""], rows)
    return "\n".join([caption, "", body] + ([""] + notes if notes else []))


def path_rows(env: Env, rope: bool, dtype: torch.dtype, attn: str, pack: dict, reference, bound) -> list[list]:
    """Two rows for one path: the pack vs the fp32 eager reference, and the pack vs its images one by one."""
    model = env.model(rope, dtype, attn)
    label = f"{str(dtype).removeprefix('torch.')} {attn} ({env.kernel(attn, dtype)})"
    out = model(**pack).last_hidden_state
    cos, diff = compare(out, reference)
    ok = cos >= bound[0] and diff <= bound[1]
    rows = [[f"{label} vs fp32 eager", f"{cos:.7f}", f"{diff:.2e}", f"{bound[0]}, {bound[1]:.0e}",
             env.check(ok, f"rope={rope} {label} vs eager")]]  # fmt: skip
    singles = torch.cat([model(**single).last_hidden_state for single in split_pack(pack)])
    cos, diff = compare(singles, out)
    ok = cos >= bound[0] and diff <= bound[1]
    rows.append([f"{label}: packed vs per-image", f"{cos:.7f}", f"{diff:.2e}", f"{bound[0]}, {bound[1]:.0e}",
                 env.check(ok, f"rope={rope} {label} packing")])  # fmt: skip
    return rows
