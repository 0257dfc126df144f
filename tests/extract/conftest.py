"""Fixtures of tests/extract: a tiny converted model and a folder of images (each test module builds its own)."""


import pytest
from _extract_helpers import synthetic, tiny_model_dir


SIZES = [(40, 24), (64, 64), (100, 30), (17, 50), (64, 64), (33, 33), (20, 80), (48, 36), (90, 90), (16, 16), (70, 20)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("model"))


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
