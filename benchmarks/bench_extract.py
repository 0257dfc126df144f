"""Token-budget packing vs one image per forward vs a padded fixed-size batch: images/s ratios, one process.

    .venv/bin/python benchmarks/bench_extract.py [--images 200] [--layers 1] [--max-image-size 336] [--repeats 2]
    python benchmarks/bench_extract.py --device cuda --dtype bfloat16 --layers 26 --max-image-size 980   # GPU

The model is the real so400m width (hidden 1152, 16 heads, MLP 4304, patch 14, 70x70 position table, random
weights), depth reduced with --layers so a CPU run takes a few minutes. --images synthetic images of random sizes
(64..1600 px a side, random aspect) go through the BAGEL image processor once (min side --min-image-size, long
side <= --max-image-size); only the model forwards are timed, so the three strategies differ in nothing else:

  packed   extract_features.plan_batches: first-fit-decreasing forwards of <= --max-patches-per-batch patches
  single   one image per forward
  padded   --batch-size images per forward in input order, each padded to the longest of its batch (what a
           dense model runs; here as equal-length packed sequences, i.e. the cost of padding without a mask)

Timings are medians of --repeats passes over all images, the strategies interleaved pass by pass. Prints markdown.
"""

import argparse
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_times  # noqa: E402
from conftest import cfg_mod, model_mod  # noqa: E402

from extract_features import plan_batches  # noqa: E402
from siglip_navit.image_processing_siglip_navit import SiglipNaViTImageProcessor  # noqa: E402


def synthetic_images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        long_side = int(rng.integers(64, 1601))
        aspect = float(np.exp(rng.uniform(-1.1, 1.1)))  # up to ~3:1 either way
        w, h = (
            (long_side, max(16, int(long_side / aspect)))
            if aspect >= 1
            else (max(16, int(long_side * aspect)), long_side)
        )
        images.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    return images


def concat(items: list[dict], device) -> dict:
    lengths = [it["pixels"].shape[0] for it in items]
    cu = torch.tensor([0] + np.cumsum(lengths).tolist(), dtype=torch.int32)
    return {
        "packed_pixel_values": torch.cat([it["pixels"] for it in items]).to(device),
        "packed_flattened_position_ids": torch.cat([it["positions"] for it in items]).to(device),
        "cu_seqlens": cu.to(device),
        "max_seqlen": max(lengths),
    }


def padded(items: list[dict], device) -> dict:
    """Each image padded (zeros, position 0) to the batch's longest: B sequences of equal length."""
    longest = max(it["pixels"].shape[0] for it in items)
    padded_items = []
    for it in items:
        pad = longest - it["pixels"].shape[0]
        padded_items.append({
            "pixels": torch.cat([it["pixels"], it["pixels"].new_zeros(pad, it["pixels"].shape[1])]),
            "positions": torch.cat([it["positions"], it["positions"].new_zeros(pad)]),
        })  # fmt: skip
    return concat(padded_items, device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--max-image-size", type=int, default=336)
    parser.add_argument("--min-image-size", type=int, default=56)
    parser.add_argument("--max-patches-per-batch", type=int, default=None, help="default: 4x the largest image")
    parser.add_argument("--batch-size", type=int, default=8, help="images per padded batch")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    processor = SiglipNaViTImageProcessor(max_image_size=args.max_image_size, min_image_size=args.min_image_size)
    items = []
    for image in synthetic_images(args.images, seed=0):
        out = processor(images=image)
        items.append({"pixels": out["packed_pixel_values"], "positions": out["packed_flattened_position_ids"]})
    lengths = [it["pixels"].shape[0] for it in items]
    largest = max(processor.patch_grid(args.max_image_size, args.max_image_size)) ** 2
    budget = args.max_patches_per_batch or 4 * largest

    config = cfg_mod.SiglipNaViTConfig(
        hidden_size=1152, intermediate_size=4304, num_attention_heads=16, num_hidden_layers=args.layers,
        patch_size=14, image_size=980, rope=False,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = model_mod.SiglipVisionModel(config).to(device=device, dtype=dtype).eval()

    batches = {
        "packed (token budget)": [concat([items[i] for i in b], device) for b in plan_batches(lengths, budget)],
        "single (one image per forward)": [concat([it], device) for it in items],
        "padded (fixed-size batch)": [
            padded(items[i : i + args.batch_size], device) for i in range(0, len(items), args.batch_size)
        ],
    }

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def runner(packs):
        def run_all():
            with torch.inference_mode():
                for pack in packs:
                    model(**pack, validate_inputs=False)
            sync()

        return run_all

    times = interleaved_times({name: runner(packs) for name, packs in batches.items()}, args.repeats)
    medians = {name: statistics.median(t) for name, t in times.items()}

    total = sum(lengths)
    tokens = {name: sum(p["packed_pixel_values"].shape[0] for p in packs) for name, packs in batches.items()}
    print(f"## Feature extraction strategies ({args.images} images, {total} patches; {args.layers} layers; "
          f"{args.device} {args.dtype}; torch {torch.__version__})\n")  # fmt: skip
    print(f"Image grids {min(lengths)}..{max(lengths)} patches (mean {total / len(lengths):.0f}); token budget "
          f"{budget}; padded batch size {args.batch_size}.\n")  # fmt: skip
    print("| strategy | forwards | tokens computed | useful | images/s | vs single | vs padded |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    base_single, base_padded = medians["single (one image per forward)"], medians["padded (fixed-size batch)"]
    for name, seconds in medians.items():
        print(f"| {name} | {len(batches[name])} | {tokens[name]} | {100 * total / tokens[name]:.0f}% | "
              f"{args.images / seconds:.2f} | {base_single / seconds:.2f}x | {base_padded / seconds:.2f}x |")  # fmt: skip
    packed_forwards = len(batches["packed (token budget)"])
    print(f"\nPacking efficiency (patches / (forwards x budget)): {100 * total / (packed_forwards * budget):.1f}% "
          f"(lower bound {math.ceil(total / budget)} forwards, used {packed_forwards}).")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
