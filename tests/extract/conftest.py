"""Fixtures of tests/extract: a tiny converted model and a folder of images (each test module builds its own)."""

import json

import pytest
from _extract_helpers import synthetic

from siglip_navit_tools.testing import build_hub_dir, make_model, tiny_config

# tiny model on a 16x16 position table (patch 4, 64 px); the processor resizes every image to <= 64 px
PROCESSOR = {
    "auto_map": {"AutoImageProcessor": "image_processing_siglip_navit.SiglipNaViTImageProcessor"},
    "max_image_size": 64, "min_image_size": 16, "image_stride": 4, "patch_size": 4,
    "max_num_patches_per_side": 16, "max_pixels": 64 * 64, "img_num": 1, "position_id_mode": "extrapolate",
    "bagel_interleaved_resize": False, "do_resize": True,
}  # fmt: skip
SIZES = [(40, 24), (64, 64), (100, 30), (17, 50), (64, 64), (33, 33), (20, 80), (48, 36), (90, 90), (16, 16), (70, 20)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    config = tiny_config(image_size=64, rope=True)
    target = build_hub_dir(tmp_path_factory.mktemp("model"), config, make_model(config))
    (target / "preprocessor_config.json").write_text(json.dumps(PROCESSOR, indent=2))
    return target


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """11 images of mixed sizes and formats in nested folders, plus 2 broken files."""
    root = tmp_path_factory.mktemp("images")
    (root / "sub" / "deeper").mkdir(parents=True)
    for i, (w, h) in enumerate(SIZES):
        folder = [root, root / "sub", root / "sub" / "deeper"][i % 3]
        synthetic(w, h, i).save(folder / f"img{i:02d}.{'png' if i % 2 else 'bmp'}")
    (root / "sub" / "garbage.jpg").write_bytes(b"this is not an image")
    good = (root / "img00.bmp").read_bytes()
    (root / "truncated.bmp").write_bytes(good[: len(good) // 2])  # a valid header, half the pixels
    return root
