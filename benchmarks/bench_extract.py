"""Token-budget packing vs one image per forward vs a padded fixed-size batch: images/s ratios, one process.

    .venv/bin/python benchmarks/bench_extract.py [--images 200] [--layers 1] [--max-image-size 336] [--repeats 2]
    python benchmarks/bench_extract.py --device cuda --dtype bfloat16 --layers 26 --max-image-size 980   # GPU

The model is the real so400m width (hidden 1152, 16 heads, MLP 4304, patch 14, 70x70 position table, random
weights), depth reduced with --layers so a CPU run takes a few minutes. --images synthetic images of random sizes
(64..1600 px a side, random aspect) go through the BAGEL image processor once (min side --min-image-size, long
side <= --max-image-size); only the model forwards are timed, so the three strategies differ in nothing else:

  packed   extract_features.py's packer (siglip_navit_tools.extract.plan_batches): first-fit-decreasing forwards
           of <= --max-patches-per-batch patches, joined by the processor (concatenate_packs)
  single   one image per forward
  padded   --batch-size images per forward in input order, each padded to the longest of its batch (what a
           dense model runs; here as equal-length packed sequences, i.e. the cost of padding without a mask)

Timings are medians of --repeats passes over all images, the strategies interleaved pass by pass. Prints markdown.
"""

import argparse
import math
import statistics
import sys

import numpy as np
import torch
from _common import interleaved_times  # this script's folder is on sys.path
from PIL import Image

from siglip_navit_tools import repo_code
from siglip_navit_tools.extract import plan_batches

processing = repo_code.image_processing()


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


def to_device(pack: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in pack.items()}


def concat(items: list, device) -> dict:
    """The processor's own packs of these images, joined (what extract_features.py's loader hands the model)."""
    return to_device(dict(processing.concatenate_packs(items)), device)


def padded(items: list, device) -> dict:
    """Each image padded (zeros, position 0) to the batch's longest: B sequences of equal length."""
    longest = max(it["packed_pixel_values"].shape[0] for it in items)

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t.new_zeros(longest - t.shape[0], *t.shape[1:])])

    pack = {
        "packed_pixel_values": torch.cat([pad(it["packed_pixel_values"]) for it in items]),
        "packed_flattened_position_ids": torch.cat([pad(it["packed_flattened_position_ids"]) for it in items]),
        "cu_seqlens": processing.build_cu_seqlens([longest] * len(items)),
        "max_seqlen": longest,
    }
    return to_device(pack, device)


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

    processor = processing.SiglipNaViTImageProcessor(
        max_image_size=args.max_image_size, min_image_size=args.min_image_size
    )
    items = [processor(images=image) for image in synthetic_images(args.images, seed=0)]
    lengths = [it["packed_pixel_values"].shape[0] for it in items]
    budget = args.max_patches_per_batch or 4 * processor.max_patches_per_image()

    config = repo_code.configuration().SiglipNaViTConfig(
        hidden_size=1152, intermediate_size=4304, num_attention_heads=16, num_hidden_layers=args.layers,
        patch_size=14, image_size=980, rope=False,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = repo_code.modeling().SiglipVisionModel(config).to(device=device, dtype=dtype).eval()

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
