"""Helpers of tests/extract: synthetic images, the per-image reference, one in-process run, and reading its shards."""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from siglip_navit_tools.extract import cli as extract_cli
from siglip_navit_tools.testing import build_hub_dir, make_model, tiny_config

# tiny model on a 16x16 position table (patch 4, 64 px); the processor resizes every image to <= 64 px
PROCESSOR = {
    "auto_map": {"AutoImageProcessor": "image_processing_siglip_navit.SiglipNaViTImageProcessor"},
    "max_image_size": 64, "min_image_size": 16, "image_stride": 4, "patch_size": 4,
    "max_num_patches_per_side": 16, "max_pixels": 64 * 64, "img_num": 1, "position_id_mode": "extrapolate",
    "bagel_interleaved_resize": False, "do_resize": True,
}  # fmt: skip


def tiny_model_dir(parent: Path, processor: dict = PROCESSOR) -> Path:
    """A converted-repo folder under `parent`: the tiny rope model (64 px, patch 4) and `processor`'s settings."""
    config = tiny_config(image_size=64, rope=True)
    target = build_hub_dir(parent, config, make_model(config))
    (target / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return target


def synthetic(width, height, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def reference(model_dir, paths):
    """Pooled features and maps from one plain forward per image (no packing, no script)."""
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir, trust_remote_code=True)
    out = {}
    with torch.no_grad():
        for path in paths:
            inputs = processor(images=Image.open(path))
            hidden = model(**inputs).last_hidden_state
            h, w = inputs["image_grid_hw"][0].tolist()
            out[path] = (hidden.mean(0), (h, w), hidden.reshape(h, w, -1))
    return out


def extract(model_dir, input_spec, output, *extra):
    argv = ["--model", str(model_dir), "--input", str(input_spec), "--output", str(output), "--num-workers", "0",
            "--no-progress", *map(str, extra)]  # fmt: skip
    return extract_cli.main(argv)


def read_outputs(output):
    """{id: (pooled, grid_hw, features or None)} over every shard of the manifest, checking each id once."""
    manifest = json.loads((output / "manifest.json").read_text())
    found = {}
    for shard in manifest["shards"]:
        tensors = load_file(str(output / shard["file"]))
        assert tensors["pooled"].shape[0] == len(shard["ids"]) == tensors["grid_hw"].shape[0]
        for j, image_id in enumerate(shard["ids"]):
            assert image_id not in found, f"{image_id} in two shards"
            found[image_id] = (
                tensors["pooled"][j],
                tuple(tensors["grid_hw"][j].tolist()),
                tensors.get(f"features.{j}"),
            )
    return manifest, found


def good_paths(image_dir):
    return sorted(str(p) for p in image_dir.rglob("img*"))
