"""SiglipNaViTImageProcessor against BAGEL's ViT transform (re-written in _processor_reference.py): the size rule,
the pixels, the normalisation and the position ids, bit for bit."""

import pytest
import torch
from _processor_reference import (
    DEFAULT,
    IMG_NUM_4,
    VAE,
    VLM,
    assert_same_pack,
    rand_rgb,
    ref_pack,
    ref_pos_extrapolate,
    ref_pos_interpolate,
    ref_size,
    ref_size_half_up,
    smooth_rgb,
)

from siglip_navit_tools import repo_code

ipm = repo_code.image_processing()

Processor = ipm.SiglipNaViTImageProcessor


def processor_for(rule, **kwargs):
    return Processor(
        max_image_size=rule["max_size"],
        min_image_size=rule["min_size"],
        image_stride=rule["stride"],
        max_pixels=rule["max_pixels"],
        img_num=rule["img_num"],
        patch_size=rule["stride"],
        **kwargs,
    )


# ----------------------------------------------------------------------------------------------------------------
# Size rule
# ----------------------------------------------------------------------------------------------------------------
# (width, height) -> expected (width, height) under the default settings, worked out by hand.
HAND_CHECKED = {
    (1024, 768): (980, 728),  # 735 / 14 = 52.5: Python rounds the tie to even (52 * 14), half-up would give 742
    (4032, 3024): (980, 728),
    (3024, 4032): (728, 980),
    (1920, 1080): (980, 546),
    (640, 480): (644, 476),
    (259, 259): (252, 252),  # 259 / 14 = 18.5 -> 18 (even): 252, not 266
    (980, 980): (980, 980),
    (224, 224): (224, 224),
    (100, 100): (224, 224),
    (1, 1): (224, 224),
    (1, 5000): (14, 980),  # step 1 -> 224 x 1_120_000; step 2 (area) -> 14 x 8064; step 3 -> 14 x 980
    (5000, 1): (980, 14),
    (50, 2000): (28, 980),  # steps 1, 2 and 3 all fire
    (3000, 200): (980, 70),  # steps 1 and 3
}


@pytest.mark.parametrize("size,expected", list(HAND_CHECKED.items()), ids=[f"{w}x{h}" for w, h in HAND_CHECKED])
def test_size_rule_hand_checked(size, expected):
    assert ref_size(*size, **DEFAULT) == expected
    assert ipm.bagel_resize_size(*size) == expected


def test_size_rule_steps_fire():
    # step 2 (pixel budget): 50x2000 reaches 224 x 8960 = 2_007_040 > 1_806_336 after step 1 ...
    assert ipm.bagel_apply_scale(50, 2000, 224 / 50, 14) == (224, 8960)
    # ... but NOT under the VLM budget of exactly 2_007_040 (the comparison is strict): step 3 alone then gives
    assert ipm.bagel_resize_size(50, 2000, 980, 224, 14, 2_007_040, 1) == (28, 980)
    # img_num divides the budget: a 980x980 image is then rescaled by the AREA ratio per side (BAGEL's quirk)
    assert ipm.bagel_resize_size(980, 980, img_num=4) == (462, 462)
    assert ref_size(1024, 768, **IMG_NUM_4) == ipm.bagel_resize_size(1024, 768, img_num=4) == (616, 462)


def _sweep_sizes():
    sizes = {(w, h) for w in range(1, 3100, 61) for h in range(1, 3100, 67)}
    sizes |= {(1, n) for n in range(1, 6000, 97)} | {(n, 1) for n in range(1, 6000, 97)}
    sizes |= {(n, n) for n in range(1, 1500, 7)} | set(HAND_CHECKED)
    sizes |= {(14 * k + 7, 14 * j + 7) for k in range(0, 80, 3) for j in range(0, 80, 5)}  # v / 14 = x.5 ties
    return sorted(sizes)


@pytest.mark.parametrize(
    "rule", [DEFAULT, VLM, IMG_NUM_4, VAE], ids=["default", "vlm_min378", "img_num4", "bagel_vae_1024_512_16"]
)
def test_size_rule_sweep_matches_reference(rule):
    sizes = _sweep_sizes()
    ties = 0
    for w, h in sizes:
        expected = ref_size(w, h, **rule)
        got = ipm.bagel_resize_size(w, h, rule["max_size"], rule["min_size"], rule["stride"], rule["max_pixels"], rule["img_num"])
        assert got == expected, (w, h, rule)
        assert got[0] % rule["stride"] == 0 and got[1] % rule["stride"] == 0
        ties += expected != ref_size_half_up(w, h, **rule)
    assert ties > 0, "the sweep never hit a rounding tie"


# ----------------------------------------------------------------------------------------------------------------
# Pixel parity with BAGEL's transform
# ----------------------------------------------------------------------------------------------------------------
PIXEL_SIZES = [(1, 1), (1, 5000), (5000, 1), (980, 980), (1024, 768), (259, 259), (50, 2000), (3000, 200), (13, 7), (981, 979)]


@pytest.mark.parametrize("size", PIXEL_SIZES, ids=[f"{w}x{h}" for w, h in PIXEL_SIZES])
def test_pixels_match_bagel_transform(size):
    image = smooth_rgb(*size, seed=size[0] + size[1])
    out = Processor()(images=image, return_tensors="pt")
    assert_same_pack(out, ref_pack([image]))
    assert tuple(out["image_grid_hw"][0].tolist()) == tuple(v // 14 for v in ref_size(*size, **DEFAULT)[::-1])


@pytest.mark.parametrize("rule", [VLM, IMG_NUM_4], ids=["vlm_min378", "img_num4"])
def test_pixels_match_other_bagel_settings(rule):
    images = [smooth_rgb(1024, 768, 1), rand_rgb(300, 200, 2), smooth_rgb(40, 900, 3)]
    out = processor_for(rule)(images=images, return_tensors="pt")
    assert_same_pack(out, ref_pack(images, rule))


def test_interleaved_pre_resize():
    images = [smooth_rgb(1024, 768, 1), rand_rgb(300, 200, 2), smooth_rgb(2000, 60, 3)]
    out = Processor(bagel_interleaved_resize=True)(images=images, return_tensors="pt")
    assert_same_pack(out, ref_pack(images, DEFAULT, pre_rule=VAE))
    # the pre-resize changes the pixels (an extra bicubic pass) and sometimes the size: 300x200 -> 768x512 -> 770x518
    plain = Processor()(images=images, return_tensors="pt")
    assert not torch.equal(out["image_grid_hw"], plain["image_grid_hw"])
    # a per-call override does the same
    again = Processor()(images=images, return_tensors="pt", bagel_interleaved_resize=True)
    assert_same_pack(again, ref_pack(images, DEFAULT, pre_rule=VAE))


def test_normalisation_is_float32_torch_arithmetic():
    levels = torch.arange(256, dtype=torch.uint8)
    expected = (levels.to(torch.float32).div(255) - 0.5) / 0.5
    got = ipm.normalize_uint8(levels.numpy())
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert got[0] == -1.0 and got[255] == 1.0
    # float64 arithmetic rounds differently for many levels: the table must not be computed that way
    f64 = ((levels.double() / 255 - 0.5) / 0.5).float()
    assert not torch.equal(got, f64)


# ----------------------------------------------------------------------------------------------------------------
# Position ids
# ----------------------------------------------------------------------------------------------------------------
def test_position_ids_extrapolate():
    for h, w in [(1, 1), (1, 70), (70, 1), (52, 70), (3, 5)]:
        got = ipm.position_ids_extrapolate(h, w, 70)
        assert got.dtype == torch.int64
        assert torch.equal(got, ref_pos_extrapolate(h * 14, w * 14, 14, 70))
        assert torch.equal(got, torch.tensor([i * 70 + j for i in range(h) for j in range(w)]))


def test_position_ids_interpolate_is_bagels_float32_code():
    for m in (70, 27):
        for n in range(1, m + 1):
            got = ipm.position_ids_interpolate(n, 7, m)
            assert torch.equal(got, ref_pos_interpolate(n * 14, 7 * 14, 14, m)), (m, n)
            got = ipm.position_ids_interpolate(5, n, m)
            assert torch.equal(got, ref_pos_interpolate(5 * 14, n * 14, 14, m)), (m, n)
    # float32 arithmetic, not exact: for M = 70 the buckets differ from floor(i * M / n) exactly for these n <= 70
    differ = [n for n in range(1, 71) if ipm.position_ids_interpolate(n, 1, 70).tolist() != [i * 70 // n * 70 for i in range(n)]]
    assert differ == [25, 49, 50, 55]
    # BAGEL runs that code with float32 as the default dtype; a different default must not change the ids
    expected = ipm.position_ids_interpolate(25, 1, 70)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert torch.equal(ipm.position_ids_interpolate(25, 1, 70), expected)
    finally:
        torch.set_default_dtype(old)


def test_interpolate_mode_pack():
    images = [smooth_rgb(1024, 768, 1), rand_rgb(100, 400, 2)]
    out = Processor(position_id_mode="interpolate")(images=images, return_tensors="pt")
    assert_same_pack(out, ref_pack(images, mode="interpolate"))
    assert int(out["packed_flattened_position_ids"].max()) < 70 * 70
