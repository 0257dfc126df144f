"""A converted repo with the pipeline (what tests/pipeline and tests/handler load), the images they feed it, and the
reference they compare with: the model's own forward on one image alone (fp32, max|diff| <= 1e-5)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from siglip_navit_tools import repo_code
from siglip_navit_tools.testing import build_hub_dir

ROOT = repo_code.REPO_ROOT
PIPELINE_FILE = "pipeline_siglip_navit.py"
PIPELINE_CLASS = "SiglipNaViTFeatureExtractionPipeline"
TASK = "image-feature-extraction"
# What config.json of a converted repo carries so that pipeline() finds our class (with or without a task).
CUSTOM_PIPELINES = {TASK: {"impl": f"pipeline_siglip_navit.{PIPELINE_CLASS}", "pt": ["AutoModel"], "type": "image"}}
# Processor settings for tiny_config(): 24 px images, 4 px patches, a 6 x 6 position table.
TINY_PROCESSOR = dict(max_image_size=24, min_image_size=8, image_stride=4, patch_size=4, max_num_patches_per_side=6)
TOL = 1e-5


def make_pipeline_repo(parent: Path, model) -> Path:
    """A converted repo as users download it: remote code + config.json + weights (the shared builder), plus the
    pipeline file, `custom_pipelines` and preprocessor_config.json."""
    folder = build_hub_dir(parent, model.config, model)
    shutil.copy(ROOT / PIPELINE_FILE, folder / PIPELINE_FILE)
    config = json.loads((folder / "config.json").read_text())
    config["custom_pipelines"] = CUSTOM_PIPELINES
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    processor_cls = repo_code.image_processing().SiglipNaViTImageProcessor
    processor_cls(**TINY_PROCESSOR).save_pretrained(folder)
    return folder


def images(seed: int = 0):
    """Mixed sizes and modes (RGBA too): grids 6x6, 2x5, 4x3, 6x2 after the tiny processor's resize."""
    rng = np.random.default_rng(seed)
    sizes = [(24, 24), (20, 8), (12, 16), (8, 24)]  # (w, h)
    out = [PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    out.append(PIL.Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8), mode="RGBA"))
    return out


def reference(pipe, image) -> torch.Tensor:
    """The model's own forward on this image alone: `(h, w, C)`."""
    inputs = pipe.image_processor(image, return_tensors="pt")
    with torch.no_grad():
        out = pipe.model(**inputs).last_hidden_state
    return pipe.image_processor.unpack(out, inputs)[0]


def close(got, want: torch.Tensor) -> None:
    got = torch.as_tensor(got, dtype=torch.float32)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert (got - want.float()).abs().max().item() <= TOL


def count_forwards(model):
    """A list that gets one entry per forward of `model`, and the hook's handle."""
    calls: list = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle
