"""Quickstart demo: build a local checkpoint, load it the Hub way, encode a pack of differently sized images.

    .venv/bin/python examples/demo.py [--layers 2] [--rope] [--save DIR]

1. Builds a checkpoint folder (code + config + random weights + processor config) with the real so400m width
   (BAGEL-7B-MoT's config.json; fewer layers by default so the demo takes seconds on a CPU). With real weights
   you would instead run convert_checkpoint.py (see README).
2. Loads it with AutoModel / AutoImageProcessor and trust_remote_code=True, as a Hub user does.
3. Encodes three images of different sizes in ONE forward, unpacks one feature map per image, and checks
   that the packed result equals running each image on its own.

With `--save DIR` the checkpoint is written to DIR and kept: a tiny, ready-to-load repo for offline first steps
(`AutoModel.from_pretrained(DIR, trust_remote_code=True)`; random weights, so its features mean nothing).
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel

from siglip_navit_tools import repo_code
from siglip_navit_tools.testing import dtype_kwarg, saved_repo

DTYPE_KWARG = dtype_kwarg()


def synthetic_image(width: int, height: int, seed: int) -> Image.Image:
    """A smooth colour gradient plus noise: a stand-in photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), 0.5 + 0.5 * np.sin(x / 37 + y / 23)], axis=-1)
    pixels = np.clip(base * 255 + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def build_checkpoint(target: Path, layers: int, rope: bool) -> None:
    config = AutoConfig.from_pretrained(repo_code.REPO_ROOT, trust_remote_code=True)  # the BAGEL-7B-MoT template
    config.num_hidden_layers = layers
    config.rope = rope
    saved_repo(target, config)  # random weights + remote code + the processor settings that fit the config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="encoder layers (BAGEL: 26)")
    parser.add_argument("--rope", action="store_true", help="2D RoPE instead of the learned position table")
    parser.add_argument("--save", metavar="DIR", type=Path, help="write the checkpoint to DIR and keep it")
    args = parser.parse_args(argv)
    if args.save is not None and args.save.exists() and (not args.save.is_dir() or any(args.save.iterdir())):
        parser.error(f"--save {args.save}: exists and is not an empty folder; choose a new one")

    with tempfile.TemporaryDirectory() as tmp:
        repo = args.save.resolve() if args.save is not None else Path(tmp) / "siglip-navit-demo"
        build_checkpoint(repo, args.layers, args.rope)
        print(f"checkpoint: {sorted(p.name for p in repo.iterdir())}")

        processor = AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)
        model = AutoModel.from_pretrained(repo, trust_remote_code=True, **{DTYPE_KWARG: torch.float32}).eval()
        print(f"model: {type(model).__name__}, {model.config.num_hidden_layers} layers, "
              f"attn_implementation={model.config._attn_implementation}, rope={model.config.rope}")

        images = [synthetic_image(640, 480, 0), synthetic_image(300, 900, 1), synthetic_image(224, 224, 2)]
        inputs = processor(images=images, return_tensors="pt")
        print(f"pack: {tuple(inputs['packed_pixel_values'].shape)} patches x features, "
              f"cu_seqlens={inputs['cu_seqlens'].tolist()}")
        with torch.no_grad():
            out = model(**inputs)
            maps = processor.unpack(out.last_hidden_state, inputs)
            worst = 0.0
            for i, (image, fmap) in enumerate(zip(images, maps)):
                single = model(**processor(images=image, return_tensors="pt")).last_hidden_state
                diff = (fmap.reshape(single.shape) - single).abs().max().item()
                worst = max(worst, diff)
                print(f"image {i}: {image.size[0]}x{image.size[1]} px -> feature map {tuple(fmap.shape)}; "
                      f"packed vs alone max|diff| = {diff:.2e}")
        ok = worst <= 1e-5
        print(f"packed == per-image: {ok} (max|diff| {worst:.2e}, bound 1e-5)")
        if args.save is not None:
            print(f"saved: {repo} (load it with AutoModel.from_pretrained({str(repo)!r}, trust_remote_code=True))")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
