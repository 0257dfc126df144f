"""Helpers of tests/extract: synthetic images, the per-image reference, one in-process run, and reading its shards."""

import json

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from siglip_navit_tools.extract import cli as extract_cli


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
