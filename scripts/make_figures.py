"""Rebuild the README's pictures (docs/*.png): patch grids + position ids, PCA of patch features, the pack strip.

    python scripts/make_figures.py [--out docs] [--layers 2] [--seed 0]

Deterministic: a tiny BAGEL-layout checkpoint with seeded random weights (BAGEL-7B-MoT's geometry -- 14 px
patches, a 70 x 70 position table -- at a small width; `siglip_navit_tools.testing`) is written, converted with
the converter and loaded
the Hub way (AutoModel / AutoImageProcessor, trust_remote_code=True); three synthetic images of different sizes
are encoded in ONE forward and drawn with visualize.py. Random weights: the PCA colours follow local colour and
texture, not objects -- run examples/quickstart.ipynb with a real checkpoint for that. Takes a few seconds on a CPU.

Loading remote code copies it into transformers' modules cache (HF_MODULES_CACHE, by default
~/.cache/huggingface/modules), one new folder per run here (the converted folder's name is unique). Unless you set
HF_MODULES_CACHE, the script points it at its own temporary folder, so nothing is left behind; called in a process
that has already imported transformers (too late for that), it removes its folder from the cache afterwards.
tests/pictures/test_pictures_visualize.py compares the output with docs/*.png pixel for pixel.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

from siglip_navit_tools import repo_code
from siglip_navit_tools.testing import dtype_kwarg, tiny_bagel_checkpoint, convert

import visualize as vis

ROOT = repo_code.REPO_ROOT
FIGURES = ("patch_grid.png", "pca.png", "pack_strip.png")


def synthetic_scene(width: int, height: int, seed: int) -> PIL.Image.Image:
    """A flat-shaded stand-in photo (sky gradient, sun, hills, a striped house): regions a PCA can tell apart."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height)[:, None, None]
    sky = (np.array([90, 150, 230]) * (1 - y) + np.array([200, 225, 255]) * y) * np.ones((1, width, 1))
    img = PIL.Image.fromarray(sky.astype(np.uint8))
    draw = PIL.ImageDraw.Draw(img)
    r = int(min(width, height) * rng.uniform(0.08, 0.14))
    cx, cy = int(width * rng.uniform(0.15, 0.85)), int(height * rng.uniform(0.12, 0.3))
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(255, 210, 60))
    horizon = int(height * rng.uniform(0.55, 0.7))
    draw.polygon([(0, horizon), (width // 3, horizon - height // 8), (2 * width // 3, horizon - height // 20),
                  (width, horizon - height // 10), (width, height), (0, height)], fill=(70, 140, 60))
    hx, hw = int(width * rng.uniform(0.1, 0.5)), max(int(width * 0.3), 30)
    hy, hh = horizon - int(height * 0.12), int(height * 0.22)
    for k in range(0, hw, 8):  # striped walls
        draw.rectangle([hx + k, hy, min(hx + k + 3, hx + hw), hy + hh], fill=(180, 60, 50))
        draw.rectangle([hx + k + 4, hy, min(hx + k + 7, hx + hw), hy + hh], fill=(235, 225, 210))
    draw.polygon([(hx - 6, hy), (hx + hw // 2, hy - hh // 2), (hx + hw + 6, hy)], fill=(90, 60, 40))
    return img


def images() -> list[PIL.Image.Image]:
    """Three sizes and aspects: landscape, portrait, and a small square the size rule scales up to 224 x 224."""
    return [synthetic_scene(320, 240, 0), synthetic_scene(200, 360, 1), synthetic_scene(150, 150, 2)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs"), help="folder for the PNGs (default: docs/)")
    parser.add_argument("--layers", type=int, default=2, help="encoder layers of the tiny model")
    parser.add_argument("--seed", type=int, default=0, help="weight seed")
    args = parser.parse_args(argv)

    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="siglip-navit-figures-") as tmp:
        # keep the remote-code copy out of ~/.cache: HF_MODULES_CACHE is read when transformers is imported
        user_cache = "HF_MODULES_CACHE" in os.environ
        redirected = not user_cache and "transformers" not in sys.modules
        if redirected:
            os.environ["HF_MODULES_CACHE"] = str(Path(tmp) / "modules")  # goes with the temporary folder
        try:
            import transformers
            import transformers.dynamic_module_utils
            from transformers import AutoImageProcessor, AutoModel

            src = tiny_bagel_checkpoint(Path(tmp) / "bagel", layers=args.layers, seed=args.seed)
            # unique folder name: transformers 4.x caches remote code by the folder's base name
            repo = convert(src, Path(tempfile.mkdtemp(prefix="siglip-navit-tiny-", dir=tmp)))
            try:
                processor = AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)
                model = AutoModel.from_pretrained(repo, trust_remote_code=True, **{dtype_kwarg(): torch.float32})
                model.eval()
            finally:
                if not user_cache and not redirected:
                    # transformers was imported before us: remove this run's folder from the cache (4.x names it
                    # after the converted folder, 5.x after its sanitised name); the loaded classes stay usable
                    cache = Path(transformers.dynamic_module_utils.HF_MODULES_CACHE) / "transformers_modules"
                    for name in {repo.name, repo.name.replace(".", "_dot_").replace("-", "_hyphen_")}:
                        shutil.rmtree(cache / name, ignore_errors=True)
            inputs = processor(images=images(), return_tensors="pt")
            with torch.no_grad():
                maps = processor.unpack(model(**inputs).last_hidden_state, inputs)
        finally:
            if redirected:
                os.environ.pop("HF_MODULES_CACHE", None)

    resized = vis.resized_images(inputs)
    grids = vis.patch_grids(inputs, save_to=out / FIGURES[0])
    views = vis.pca_views(resized, maps)  # one PCA over the three images: a colour means the same everywhere
    vis.save_png(vis.hstack(views, gap=16), out / FIGURES[1])
    vis.pack_strip(inputs["cu_seqlens"], inputs["image_grid_hw"], width=sum(g.width for g in grids) + 16,
                   save_to=out / FIGURES[2])
    for name in FIGURES:
        path = out / name
        with PIL.Image.open(path) as im:
            print(f"{path}: {im.width}x{im.height}, {path.stat().st_size / 1024:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
