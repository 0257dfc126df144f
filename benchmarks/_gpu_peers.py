# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Section 2 of `gpu_check.py`: our model against its peers in one process, with the same weights, in bf16.

  a. one native image: ours (one-image pack) vs transformers `SiglipVisionModel` (sdpa)
  b. the mixed pack: ours packed vs ours image by image vs transformers `Siglip2VisionModel` (NaFlex) on the same
     images as one padded batch with its attention mask (skipped where the installed transformers has no Siglip2)
  c. many small images: one packed forward vs one forward per image

Timings are medians of interleaved runs, printed as ratios to ours (packed). The peers get our weights copied in
(stock SigLIP's Conv2d patch embedding from our Linear one); Siglip2 resizes its position table to each image
(bilinear) where ours crops it, so only the native-size image has the same numbers there (its diff is shown).
"""

from __future__ import annotations

import random

import torch
import transformers
from _gpu_setup import Env, analytic_flops, compare, make_pack, pack_lengths, skipped, split_pack, table


def peers(env: Env) -> str:
    return "\n\n".join([native_image(env), mixed_pack(env), small_images(env)])


def copy_weights(env: Env, peer: torch.nn.Module, conv_patch: bool) -> torch.nn.Module:
    """Load our fp32 weights into a transformers SigLIP/Siglip2 vision model (keys with or without `vision_model.`)
    and move it to the device in the half dtype."""
    ours = env.model(False, torch.float32).state_dict()
    state = {}
    for key in peer.state_dict():
        value = ours.get("vision_model." + key.removeprefix("vision_model."))
        if value is None:
            continue  # buffers of the peer's own (e.g. position_ids)
        if conv_patch and key.endswith("patch_embedding.weight"):
            value = env.modeling.linear_weight_to_conv2d(value, 3, env.geo.patch)
        state[key] = value
    missing = [name for name, _ in peer.named_parameters() if name not in state]
    if missing:
        raise RuntimeError(f"{type(peer).__name__}: no weights of ours for {missing[:4]}")
    peer.load_state_dict(state, strict=False)
    return peer.to(env.device, env.half).eval()


def peer_config(env: Env, config_class, **extra):
    g = env.geo
    config = config_class(
        hidden_size=g.hidden, intermediate_size=g.mlp, num_attention_heads=g.heads, num_hidden_layers=g.layers,
        patch_size=g.patch, vision_use_head=False, **extra,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    return config


def native_image(env: Env) -> str:
    g = env.geo
    config = peer_config(env, transformers.SiglipVisionConfig, image_size=g.image_size)
    with env.device:
        stock = copy_weights(env, transformers.SiglipVisionModel(config), conv_patch=True)
    ours = env.model(False, env.half)
    image = torch.randn(1, 3, g.image_size, g.image_size, generator=torch.Generator().manual_seed(2))
    image = image.to(env.device, env.half)
    pack = make_pack([(g.side, g.side)], env, dtype=env.half)  # position ids arange(n): the native grid
    pack["packed_pixel_values"] = (
        image[0].reshape(3, g.side, g.patch, g.side, g.patch).permute(1, 3, 2, 4, 0).reshape(-1, g.patch_dim)
    )
    cos, diff = compare(ours(**pack).last_hidden_state, stock(pixel_values=image).last_hidden_state[0])
    t = env.medians({"ours": lambda: ours(**pack), "stock": lambda: stock(pixel_values=image)})
    rows = [
        [f"ours (sdpa: {env.kernel('sdpa', env.half)}), one-image pack", "1.00", "-"],
        ["transformers SiglipVisionModel (sdpa), pixel_values", f"{t['stock'] / t['ours']:.2f}",
         f"{diff:.2e} (cosine {cos:.6f})"],
    ]  # fmt: skip
    caption = f"a. One {g.image_size}x{g.image_size} image ({g.side * g.side} patches), {_dtype(env)}"
    return caption + "\n\n" + table(["model", "time / ours", "max abs diff vs ours"], rows)


def mixed_pack(env: Env) -> str:
    g = env.geo
    ours = env.model(False, env.half)
    pack = make_pack(g.mixed_grids, env, dtype=env.half)
    singles = split_pack(pack)
    lengths = pack_lengths(pack)
    fns = {"packed": lambda: ours(**pack), "single": lambda: [ours(**s) for s in singles]}
    siglip2, note = siglip2_peer(env, singles)
    if siglip2 is not None:
        fns["siglip2"] = siglip2
    t = env.medians(fns)
    packed_gflop = analytic_flops(lengths, g) / 1e9
    padded_gflop = analytic_flops([max(lengths)] * len(lengths), g) / 1e9  # Siglip2 computes the padding too
    rows = [
        ["ours, one packed forward", "1", "1.00", f"{packed_gflop:.4g}", "-"],
        ["ours, image by image", str(len(lengths)), f"{t['single'] / t['packed']:.2f}", f"{packed_gflop:.4g}", "-"],
    ]
    if siglip2 is not None:
        rows.append(["transformers Siglip2VisionModel (NaFlex, sdpa), padded batch + mask", "1",
                     f"{t['siglip2'] / t['packed']:.2f}", f"{padded_gflop:.4g}", note])  # fmt: skip
    caption = f"b. Mixed pack {lengths} ({sum(lengths)} patches), {_dtype(env)}"
    body = table(["run", "forwards", "time / ours packed", "analytic GFLOP", "max abs diff vs ours"], rows)
    return caption + "\n\n" + body + ("" if siglip2 is not None else "\n\n" + note)


def siglip2_peer(env: Env, singles: list[dict]):
    """(a callable running Siglip2 on the padded batch, the diff note), or (None, the skip line)."""
    if not hasattr(transformers, "Siglip2VisionModel"):
        why = f"transformers {transformers.__version__} has no Siglip2VisionModel"
        return None, skipped("Siglip2VisionModel (NaFlex) peer", why)
    g = env.geo
    config = peer_config(env, transformers.Siglip2VisionConfig, num_patches=g.side * g.side)
    with env.device:
        siglip2 = copy_weights(env, transformers.Siglip2VisionModel(config), conv_patch=False)
    lengths = [s["packed_pixel_values"].shape[0] for s in singles]
    longest = max(lengths)
    padded = torch.zeros(len(singles), longest, g.patch_dim, device=env.device, dtype=env.half)
    mask = torch.zeros(len(singles), longest, dtype=torch.long, device=env.device)
    for i, single in enumerate(singles):
        padded[i, : lengths[i]] = single["packed_pixel_values"]
        mask[i, : lengths[i]] = 1
    shapes = torch.tensor(g.mixed_grids, device=env.device)

    def run():
        return siglip2(pixel_values=padded, pixel_attention_mask=mask, spatial_shapes=shapes)

    ours = env.model(False, env.half)(**singles[0]).last_hidden_state
    cos, diff = compare(run().last_hidden_state[0, : lengths[0]], ours)
    return run, f"{diff:.2e} on the {g.mixed_grids[0][0]}x{g.mixed_grids[0][1]} image (cosine {cos:.6f})"


def small_images(env: Env) -> str:
    g = env.geo
    rng = random.Random(3)
    low, high = (px // g.patch for px in g.small_px)
    grids = [(rng.randint(low, high), rng.randint(low, high)) for _ in range(g.small_count)]
    ours = env.model(False, env.half)
    pack = make_pack(grids, env, dtype=env.half)
    singles = split_pack(pack)
    t = env.medians({"packed": lambda: ours(**pack), "single": lambda: [ours(**s) for s in singles]})
    rows = [
        ["ours, one packed forward", "1", "1.00"],
        ["ours, one image per forward", str(len(singles)), f"{t['single'] / t['packed']:.2f}"],
    ]
    caption = (
        f"c. {len(grids)} small images ({g.small_px[0]}..{g.small_px[1]} px a side, {sum(pack_lengths(pack))} "
        f"patches), {_dtype(env)}"
    )
    return caption + "\n\n" + table(["run", "forwards", "time / packed"], rows)


def _dtype(env: Env) -> str:
    return f"{str(env.half).removeprefix('torch.')}, {env.geo.layers} layers, median of {env.geo.repeats}"
