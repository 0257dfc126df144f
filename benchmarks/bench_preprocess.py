"""Preprocessing speed: SiglipNaViTImageProcessor (BAGEL's native-resolution rule) vs transformers' stock
SiglipImageProcessor resizing every image to 980x980, on 16 mixed-size photo-sized images.

    python benchmarks/bench_preprocess.py [--repeats 5] [--threads N]

Prints a markdown table. Both processors get the same 16 RGB PIL images and return PyTorch tensors; times are
the median over `--repeats` calls of one batch (after one warm-up call), the contenders' calls interleaved. The images are synthetic but photo-like
(smooth gradients + noise), generated deterministically: no downloads.
"""

import argparse
import platform

import numpy as np
import PIL
import PIL.Image
import torch
import transformers

from _common import interleaved_medians  # benchmarks/ is this script's folder: on sys.path

from siglip_navit_tools import repo_code

SiglipNaViTImageProcessor = repo_code.image_processing().SiglipNaViTImageProcessor
bagel_resize_size = repo_code.image_processing().bagel_resize_size

# (width, height): phone photos (4032x3024, both orientations), DSLR / screen / web sizes
SIZES = [
    (4032, 3024), (3024, 4032), (4000, 3000), (3000, 2000),
    (2560, 1440), (2048, 1536), (1920, 1080), (1080, 1920),
    (1600, 1200), (1280, 720), (1200, 1200), (1024, 768),
    (768, 1024), (800, 600), (640, 480), (500, 375),
]


def photo_like(width: int, height: int, seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    small = PIL.Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    smooth = np.asarray(small.resize((width, height), PIL.Image.BICUBIC), dtype=np.int16)
    noise = rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
    return PIL.Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8))


def stock_siglip_processor():
    """transformers' SiglipImageProcessor at 980x980 (5.x without torchvision: its PIL backend class)."""
    cls = getattr(transformers, "SiglipImageProcessorPil", None)
    if cls is None or getattr(cls, "is_dummy", False):
        cls = transformers.SiglipImageProcessor
    return cls(size={"height": 980, "width": 980}, resample=PIL.Image.BICUBIC)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    images = [photo_like(w, h, seed) for seed, (w, h) in enumerate(SIZES)]
    ours = SiglipNaViTImageProcessor()
    stock = stock_siglip_processor()

    ours_out = ours(images=images, return_tensors="pt")
    stock_out = stock(images=images, return_tensors="pt")
    targets = [bagel_resize_size(*image.size) for image in images]

    t = interleaved_medians(
        {
            "ours": lambda: ours(images=images, return_tensors="pt"),
            "stock": lambda: stock(images=images, return_tensors="pt"),
            "resize": lambda: [image.resize(size, PIL.Image.BICUBIC) for image, size in zip(images, targets)],
        },
        args.repeats,
    )
    t_ours, t_stock, t_resize = t["ours"], t["stock"], t["resize"]

    n = len(images)
    ours_patches = ours_out["packed_pixel_values"].shape[0]
    stock_px = tuple(stock_out["pixel_values"].shape)
    print(
        f"{n} images ({', '.join(f'{w}x{h}' for w, h in SIZES[:4])}, ... {SIZES[-1][0]}x{SIZES[-1][1]}); "
        f"median of {args.repeats}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Pillow {PIL.__version__}, {torch.get_num_threads()} torch threads, {platform.processor() or platform.machine()}\n"
    )
    print("| preprocessing | output | s / 16 images | ms / image | time vs stock |")
    print("| --- | --- | ---: | ---: | ---: |")
    print(
        f"| SiglipNaViTImageProcessor (BAGEL rule, native aspect) | packed ({ours_patches}, 588) = "
        f"{ours_patches} patches | {t_ours:.3f} | {1000 * t_ours / n:.1f} | {t_ours / t_stock:.2f}x |"
    )
    print(
        f"| {type(stock).__name__} 980x980 (stock) | {stock_px} = {n * 4900} patches | {t_stock:.3f} | "
        f"{1000 * t_stock / n:.1f} | 1.00x |"
    )
    print(
        f"| (floor: PIL bicubic resize alone, to our sizes) | - | {t_resize:.3f} | {1000 * t_resize / n:.1f} | "
        f"{t_resize / t_stock:.2f}x |"
    )
    print(f"\nSiglipNaViTImageProcessor takes {t_ours / t_stock:.2f}x the stock processor's time "
          f"({t_stock / t_ours:.2f}x {'faster' if t_ours < t_stock else 'slower'}).")


if __name__ == "__main__":
    main()
