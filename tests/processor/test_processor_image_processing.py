"""SiglipNaViTImageProcessor: parity with BAGEL's ViT transform, input kinds, bad input, pack/unpack, Auto* loading.

The reference functions below re-write BAGEL's code paths (data/transforms.py, data/data_utils.py, torchvision's
ToTensor + Normalize for PIL input) independently of the processor; the processor must match them bit for bit.
"""

import json
import math
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from siglip_navit_tools import repo_code
from siglip_navit_tools.testing import copy_remote_code, dtype_kwarg, make_model, tiny_config, unique_dir

ROOT = repo_code.REPO_ROOT
DTYPE_KWARG = dtype_kwarg()
ipm = repo_code.image_processing()

Processor = ipm.SiglipNaViTImageProcessor

DEFAULT = dict(max_size=980, min_size=224, stride=14, max_pixels=1_806_336, img_num=1)
# BAGEL's VLM evaluation settings, and img_num > 1 (a smaller per-image pixel budget: step 2 fires for photos)
VLM = dict(max_size=980, min_size=378, stride=14, max_pixels=2_007_040, img_num=1)
IMG_NUM_4 = dict(DEFAULT, img_num=4)
VAE = dict(max_size=1024, min_size=512, stride=16, max_pixels=14 * 14 * 9 * 1024, img_num=1)


# ----------------------------------------------------------------------------------------------------------------
# Independent reference: BAGEL's code, re-written here
# ----------------------------------------------------------------------------------------------------------------
def ref_size(width, height, max_size, min_size, stride, max_pixels, img_num=1, rnd=round):
    """BAGEL's MaxLongEdgeMinShortEdgeResize size computation (`rnd`: Python's round, as BAGEL)."""

    def make_divisible(value):
        return max(stride, int(rnd(value / stride) * stride))

    def apply_scale(w, h, scale):
        return make_divisible(rnd(w * scale)), make_divisible(rnd(h * scale))

    scale = min(max_size / max(width, height), 1.0)
    scale = max(scale, min_size / min(width, height))
    w, h = apply_scale(width, height, scale)
    if w * h > max_pixels / img_num:
        w, h = apply_scale(w, h, max_pixels / img_num / (w * h))
    if max(w, h) > max_size:
        w, h = apply_scale(w, h, max_size / max(w, h))
    return w, h


def ref_size_half_up(*args, **kwargs):
    """The same rule with round-half-UP: only used to prove that the sweep hits rounding ties."""
    return ref_size(*args, **kwargs, rnd=lambda x: math.floor(x + 0.5))


def ref_pil_img2rgb(image):
    """BAGEL's data_utils.pil_img2rgb."""
    if image.mode == "RGBA" or image.info.get("transparency", None) is not None:
        image = image.convert("RGBA")
        white = PIL.Image.new(mode="RGB", size=image.size, color=(255, 255, 255))
        white.paste(image, mask=image.split()[3])
        image = white
    else:
        image = image.convert("RGB")
    return image


def ref_to_tensor_normalize(image):
    """torchvision's ToTensor (PIL, uint8) then Normalize([0.5] * 3, [0.5] * 3, inplace=True), in float32."""
    img = torch.from_numpy(np.array(image, np.uint8, copy=True))
    img = img.view(image.size[1], image.size[0], 3).permute((2, 0, 1)).contiguous()
    img = img.to(dtype=torch.float32).div(255)
    mean = torch.as_tensor([0.5, 0.5, 0.5], dtype=torch.float32).view(-1, 1, 1)
    std = torch.as_tensor([0.5, 0.5, 0.5], dtype=torch.float32).view(-1, 1, 1)
    return img.sub_(mean).div_(std)


def ref_patchify(image, patch_size):
    p = patch_size
    c, h, w = image.shape
    assert h % p == 0 and w % p == 0
    image = image.reshape(c, h // p, p, w // p, p)
    image = torch.einsum("chpwq->hwpqc", image)
    return image.reshape(-1, p**2 * c)


def ref_pos_extrapolate(img_h, img_w, patch_size, max_num_patches_per_side):
    num_patches_h, num_patches_w = img_h // patch_size, img_w // patch_size
    coords_h = torch.arange(0, num_patches_h)
    coords_w = torch.arange(0, num_patches_w)
    return (coords_h[:, None] * max_num_patches_per_side + coords_w).flatten()


def ref_pos_interpolate(img_h, img_w, patch_size, max_num_patches_per_side):
    num_patches_h, num_patches_w = img_h // patch_size, img_w // patch_size
    boundaries = torch.arange(1 / max_num_patches_per_side, 1.0, 1 / max_num_patches_per_side)
    fractional_coords_h = torch.arange(0, 1 - 1e-6, 1 / num_patches_h)
    fractional_coords_w = torch.arange(0, 1 - 1e-6, 1 / num_patches_w)
    bucket_coords_h = torch.bucketize(fractional_coords_h, boundaries, right=True)
    bucket_coords_w = torch.bucketize(fractional_coords_w, boundaries, right=True)
    return (bucket_coords_h[:, None] * max_num_patches_per_side + bucket_coords_w).flatten()


def ref_resize(image, rule):
    w, h = ref_size(*image.size, **rule)
    return image.resize((w, h), PIL.Image.BICUBIC)  # torchvision F.resize on a PIL image


def ref_pack(rgb_images, rule=DEFAULT, patch_size=14, side=70, mode="extrapolate", pre_rule=None, resize=True):
    """BAGEL's prepare_vit_images for already-RGB PIL images: the expected processor output."""
    pixels, positions, lengths, grids = [], [], [], []
    for image in rgb_images:
        if pre_rule is not None:
            image = ref_resize(image, pre_rule)
        if resize:
            image = ref_resize(image, rule)
        tensor = ref_to_tensor_normalize(image)
        pos_fn = ref_pos_extrapolate if mode == "extrapolate" else ref_pos_interpolate
        positions.append(pos_fn(tensor.size(1), tensor.size(2), patch_size, side))
        pixels.append(ref_patchify(tensor, patch_size))
        grids.append((tensor.size(1) // patch_size, tensor.size(2) // patch_size))
        lengths.append(grids[-1][0] * grids[-1][1])
    return dict(
        packed_pixel_values=torch.cat(pixels),
        packed_flattened_position_ids=torch.cat(positions),
        cu_seqlens=torch.tensor(np.cumsum([0] + lengths), dtype=torch.int32),
        max_seqlen=max(lengths),
        image_grid_hw=torch.tensor(grids, dtype=torch.int64),
    )


def assert_same_pack(out, expected):
    assert out["packed_pixel_values"].dtype == torch.float32
    assert out["packed_flattened_position_ids"].dtype == torch.int64
    assert out["cu_seqlens"].dtype == torch.int32
    assert out["image_grid_hw"].dtype == torch.int64
    assert torch.equal(out["image_grid_hw"], expected["image_grid_hw"])
    assert torch.equal(out["packed_pixel_values"], expected["packed_pixel_values"])  # bit-identical
    assert torch.equal(out["packed_flattened_position_ids"], expected["packed_flattened_position_ids"])
    assert torch.equal(out["cu_seqlens"], expected["cu_seqlens"])
    assert int(out["max_seqlen"]) == expected["max_seqlen"]


def rand_rgb(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def smooth_rgb(width, height, seed=0):
    """A photo-like (smooth) image: a random 8x8 image upscaled, so resizing has real content to filter."""
    small = rand_rgb(8, 8, seed)
    return small.resize((width, height), PIL.Image.BILINEAR)


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
# patchify layout, position ids, pack structure
# ----------------------------------------------------------------------------------------------------------------
def test_patchify_layout_and_inverse():
    c, p = 3, 4
    image = torch.arange(c * 8 * 12, dtype=torch.float32).reshape(c, 8, 12)
    patches = ipm.patchify(image, p)
    assert torch.equal(patches, ref_patchify(image, p))
    assert patches.shape == (2 * 3, p * p * c)
    # patch (i, j) = 2nd row, 3rd column; inside it (row, col, channel) with channel fastest
    i, j, r, q, ch = 1, 2, 3, 1, 2
    assert patches[i * 3 + j, (r * p + q) * c + ch] == image[ch, i * p + r, j * p + q]
    assert torch.equal(ipm.unpatchify(patches, 2, 3, p, c), image)
    with pytest.raises(ValueError, match="not divisible"):
        ipm.patchify(torch.zeros(3, 8, 10), 4)


def test_one_patch_layout_everywhere():
    """The numpy / torch, HWC / CHW patchify paths and the model's Conv2d -> Linear weight layout are the same."""
    model_mod = repo_code.modeling()
    c, p = 3, 4
    image = torch.randint(0, 256, (8, 12, c), dtype=torch.uint8)
    hwc = ipm.patchify_hwc(image, p)
    assert torch.equal(hwc, ipm.patchify(image.permute(2, 0, 1), p))
    assert np.array_equal(ipm.patchify_hwc(image.numpy(), p), hwc.numpy())
    assert torch.equal(ipm.unpatchify_hwc(hwc, 2, 3, p, c), image)
    # a Conv2d filter (C, P, P) is an image of one patch: its Linear row is that patch's feature vector
    conv = torch.randn(5, c, p, p)
    linear = model_mod.conv2d_weight_to_linear(conv)
    for k in range(5):
        assert torch.equal(linear[k], ipm.patchify(conv[k], p)[0])


def test_pack_to_uint8_images_inverts_preprocess():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h * 14, w * 14, 3), dtype=np.uint8) for h, w in [(3, 5), (7, 2)]]
    inputs = Processor(do_resize=False)(images=images, return_tensors="pt")
    recovered = ipm.pack_to_uint8_images(inputs["packed_pixel_values"], inputs["image_grid_hw"].tolist(), 14)
    assert [r.dtype for r in recovered] == [torch.uint8, torch.uint8]
    assert all(np.array_equal(r.numpy(), im) for r, im in zip(recovered, images))
    with pytest.raises(ValueError, match="holds 29 patches but the grids describe 43"):
        ipm.pack_to_uint8_images(inputs["packed_pixel_values"], [(3, 5), (7, 4)], 14)


def test_settings_for_model_follow_the_geometry():
    bagel = ipm.SiglipNaViTImageProcessor.settings_for_model(tiny_config(image_size=980, patch_size=14))
    assert bagel == {k: v for k, v in json.loads(Processor().to_json_string()).items() if k != "auto_map"}
    assert Processor(**bagel).to_dict() == Processor().to_dict()
    stock = ipm.SiglipNaViTImageProcessor.settings_for_model(tiny_config(image_size=378, patch_size=14))
    assert (stock["max_image_size"], stock["max_num_patches_per_side"], stock["patch_size"]) == (378, 27, 14)
    assert (stock["min_image_size"], stock["max_pixels"]) == (224, 378**2)
    tiny = ipm.SiglipNaViTImageProcessor.settings_for_model(tiny_config(), {"img_num": 2, "max_image_size": 24,
                                                                             "patch_size": 4, "min_image_size": 8,
                                                                             "max_pixels": 100})
    # a template written for this geometry keeps its size budget; bookkeeping keys never travel
    assert (tiny["img_num"], tiny["min_image_size"], tiny["max_pixels"], tiny["image_stride"]) == (2, 8, 100, 4)
    templ = ipm.SiglipNaViTImageProcessor.settings_for_model(tiny_config(), {"auto_map": {}, "image_processor_type": "x"})
    assert "auto_map" not in templ and "image_processor_type" not in templ
    assert (templ["min_image_size"], templ["max_pixels"], templ["max_num_patches_per_side"]) == (24, 576, 6)
    Processor(**templ)  # the settings are valid for the processor


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


def test_pack_structure_and_types():
    images = [rand_rgb(300, 200, 1), rand_rgb(64, 64, 2), rand_rgb(1000, 500, 3)]
    out = Processor()(images=images, return_tensors="pt")
    assert set(out.keys()) == set(Processor.model_input_names)
    grids = out["image_grid_hw"].tolist()
    lengths = [h * w for h, w in grids]
    assert out["cu_seqlens"].tolist() == [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    assert isinstance(out["max_seqlen"], torch.Tensor) and out["max_seqlen"].dim() == 0
    assert not out["max_seqlen"].is_floating_point() and int(out["max_seqlen"]) == max(lengths)
    assert out["packed_pixel_values"].shape == (sum(lengths), 14 * 14 * 3)
    assert out["packed_pixel_values"].min() >= -1 and out["packed_pixel_values"].max() <= 1

    plain = Processor()(images=images)  # no return_tensors: torch tensors, max_seqlen a Python int
    assert type(plain["max_seqlen"]) is int and torch.equal(plain["packed_pixel_values"], out["packed_pixel_values"])
    as_np = Processor()(images=images, return_tensors="np")
    assert isinstance(as_np["packed_pixel_values"], np.ndarray) and as_np["cu_seqlens"].dtype == np.int32
    with pytest.raises(ValueError, match="return_tensors"):
        Processor()(images=images, return_tensors="tf")


def test_batch_feature_to_casts_only_floating_tensors():
    out = Processor()(images=[rand_rgb(300, 200, 1), rand_rgb(40, 90, 2)], return_tensors="pt")
    cast = out.to(torch.bfloat16)
    assert cast["packed_pixel_values"].dtype == torch.bfloat16
    assert cast["packed_flattened_position_ids"].dtype == torch.int64
    assert cast["cu_seqlens"].dtype == torch.int32
    assert cast["max_seqlen"].dtype == torch.int64
    assert cast["image_grid_hw"].dtype == torch.int64
    moved = out.to("cpu")
    assert all(v.device.type == "cpu" for v in moved.values())
    moved = out.to(device="cpu", dtype=torch.float16)
    assert moved["packed_pixel_values"].dtype == torch.float16 and moved["cu_seqlens"].dtype == torch.int32


# ----------------------------------------------------------------------------------------------------------------
# Input kinds
# ----------------------------------------------------------------------------------------------------------------
def _alpha_image(size=(37, 23), seed=0):
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    rgba[0, 0, 3] = 0  # one fully transparent pixel
    rgba[0, 1, 3] = 255
    return PIL.Image.fromarray(rgba)


def _pil_modes():
    rgb = rand_rgb(37, 23, 5)
    rgba = _alpha_image()
    p_plain = rgb.quantize(16)
    p_trans = rgb.quantize(16)
    p_trans.info["transparency"] = 3
    l_trans = rgb.convert("L")
    l_trans.info["transparency"] = 128
    rgb_trans = rgb.copy()
    rgb_trans.info["transparency"] = tuple(int(v) for v in np.asarray(rgb)[0, 0])  # a tRNS colour key
    return {
        "RGB": rgb,
        "RGB_transparency": rgb_trans,
        "RGBA": rgba,
        "LA": rgba.convert("LA"),
        "P": p_plain,
        "P_transparency": p_trans,
        "PA": p_plain.convert("PA"),
        "LAB": rgb.convert("LAB"),
        "HSV": rgb.convert("HSV"),
        "L": rgb.convert("L"),
        "L_transparency": l_trans,
        "1": rgb.convert("1"),
        "CMYK": rgb.convert("CMYK"),
        "YCbCr": rgb.convert("YCbCr"),
    }


@pytest.mark.parametrize("mode", list(_pil_modes()))
def test_pil_modes_follow_bagels_rgb_rule(mode):
    image = _pil_modes()[mode]
    out = Processor()(images=[image], return_tensors="pt")
    assert_same_pack(out, ref_pack([ref_pil_img2rgb(image)]))


def test_rgba_composites_over_white_and_la_loses_alpha():
    rgba = _alpha_image()
    rgb = ipm.to_rgb_pil(rgba)
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert rgb.getpixel((1, 0)) == rgba.getpixel((1, 0))[:3]  # opaque -> unchanged
    la = rgba.convert("LA")
    assert ipm.to_rgb_pil(la).getpixel((0, 0)) == (la.getpixel((0, 0))[0],) * 3  # no compositing (BAGEL parity)


@pytest.mark.parametrize("mode", ["I;16", "I", "I;16B"])
def test_16bit_modes_are_scaled_not_clipped(mode):
    rng = np.random.default_rng(3)
    values = rng.integers(0, 65536, (23, 37)).astype(np.uint16)
    values[0, 0], values[0, 1], values[0, 2] = 1000, 65535, 0
    if mode == "I":
        image = PIL.Image.fromarray(values.astype(np.int32))
    elif mode == "I;16B":  # big-endian 16-bit (e.g. from some TIFFs)
        image = PIL.Image.frombytes("I;16B", (37, 23), values.astype(">u2").tobytes())
    else:
        image = PIL.Image.fromarray(values)
    assert image.mode == mode
    rgb = ipm.to_rgb_pil(image)
    assert rgb.getpixel((0, 0)) == (4,) * 3  # round(1000 / 257); PIL's convert("RGB") would give 255
    assert rgb.getpixel((1, 0)) == (255,) * 3 and rgb.getpixel((2, 0)) == (0,) * 3
    expected8 = PIL.Image.fromarray(np.array([[round(int(v) / 257) for v in row] for row in values], dtype=np.uint8))
    out = Processor()(images=image, return_tensors="pt")
    assert_same_pack(out, ref_pack([expected8.convert("RGB")]))


def test_float_pil_mode_and_out_of_range_int_mode():
    values = np.linspace(0, 1, 23 * 37, dtype=np.float32).reshape(23, 37)
    image = PIL.Image.fromarray(values)
    assert image.mode == "F"
    expected8 = np.array([[round(float(v) * 255) for v in row] for row in values], dtype=np.uint8)
    assert np.array_equal(np.asarray(ipm.to_rgb_pil(image))[..., 0], expected8)
    with pytest.raises(ValueError, match=r"image 0: .*\[0, 65535\]"):
        Processor()(images=PIL.Image.fromarray(np.full((5, 5), -3, dtype=np.int32)))


def test_numpy_and_torch_inputs_match_pil():
    rng = np.random.default_rng(7)
    hwc = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    pil = PIL.Image.fromarray(hwc)
    expected = ref_pack([pil])
    chw = torch.from_numpy(hwc).permute(2, 0, 1)
    for image in (hwc, chw, chw.contiguous(), hwc.astype(np.int64), torch.from_numpy(hwc.astype(np.int32)).permute(2, 0, 1)):
        assert_same_pack(Processor()(images=image, return_tensors="pt"), expected)
    # batches: a list, a 4-D array (N, H, W, C), a 4-D tensor (N, C, H, W)
    expected2 = ref_pack([pil, pil])
    assert_same_pack(Processor()(images=[hwc, chw], return_tensors="pt"), expected2)
    assert_same_pack(Processor()(images=np.stack([hwc, hwc]), return_tensors="pt"), expected2)
    assert_same_pack(Processor()(images=torch.stack([chw, chw]), return_tensors="pt"), expected2)
    # gray and alpha arrays: (H, W), (H, W, 1), (H, W, 2) = LA (alpha dropped), (H, W, 4) = RGBA (composited)
    gray = hwc[..., 0]
    for image in (gray, gray[..., None], torch.from_numpy(gray), torch.from_numpy(gray)[None]):
        assert_same_pack(Processor()(images=image, return_tensors="pt"), ref_pack([PIL.Image.fromarray(gray).convert("RGB")]))
    la = np.stack([gray, hwc[..., 1]], -1)
    assert_same_pack(Processor()(images=la, return_tensors="pt"), ref_pack([ref_pil_img2rgb(PIL.Image.fromarray(la))]))
    rgba = np.concatenate([hwc, hwc[..., :1]], -1)
    assert_same_pack(
        Processor()(images=torch.from_numpy(rgba).permute(2, 0, 1), return_tensors="pt"),
        ref_pack([ref_pil_img2rgb(PIL.Image.fromarray(rgba))]),
    )


def test_float_inputs_are_quantised_with_round():
    rng = np.random.default_rng(11)
    floats = rng.random((30, 40, 3)).astype(np.float32)
    floats[0, 0, 0] = 0.5 / 255  # rounding ties go to even (Python's round)
    floats[0, 1, 0] = 2.5 / 255
    floats[0, 2, 0] = 254.5 / 255
    floats[0, 3, 0], floats[0, 4, 0] = 0.0, 1.0

    def quantise(values):  # round(x * 255) of each value, in Python floats
        return np.vectorize(lambda x: round(float(x) * 255))(values).astype(np.uint8)

    expected = ref_pack([PIL.Image.fromarray(quantise(floats))])
    chw = torch.from_numpy(floats).permute(2, 0, 1)
    for image in (floats, floats.astype(np.float64), chw, chw.double()):
        assert_same_pack(Processor()(images=image, return_tensors="pt"), expected)
    for half in (chw.to(torch.bfloat16), chw.to(torch.float16)):
        expected_half = quantise(half.float().permute(1, 2, 0).numpy())
        assert_same_pack(Processor()(images=half, return_tensors="pt"), ref_pack([PIL.Image.fromarray(expected_half)]))

    # float64 (k + 0.5) / 255 is an exact tie after * 255 for every k: Python's round sends half of them down
    ties = np.repeat(((np.arange(255) + 0.5) / 255)[None, :, None], 3, axis=2)  # (1, 255, 3) float64
    expected_ties = quantise(ties)
    assert (expected_ties[0, :, 0].astype(int) == np.arange(255)).sum() == 128  # rounded down to the even k
    assert_same_pack(Processor()(images=ties, return_tensors="pt"), ref_pack([PIL.Image.fromarray(expected_ties)]))


def test_do_resize_false_takes_images_as_they_are():
    images = [rand_rgb(28, 42, 1), rand_rgb(14, 14, 2), rand_rgb(980, 14, 3)]
    out = Processor(do_resize=False)(images=images, return_tensors="pt")
    assert_same_pack(out, ref_pack(images, resize=False))
    assert out["image_grid_hw"].tolist() == [[3, 2], [1, 1], [1, 70]]
    assert_same_pack(Processor()(images=images, do_resize=False, return_tensors="pt"), ref_pack(images, resize=False))
    with pytest.raises(ValueError, match=r"image 1: .*multiples of patch_size 14.*30x28"):
        Processor(do_resize=False)(images=[rand_rgb(28, 28), rand_rgb(30, 28)])
    with pytest.raises(ValueError, match=r"image 0: .*71x1 patch grid exceeds .*70x70"):
        Processor(do_resize=False)(images=rand_rgb(14, 994))
    # the same image is fine in interpolate mode (several rows then share a table row)
    Processor(do_resize=False, position_id_mode="interpolate")(images=rand_rgb(14, 994))


# ----------------------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the image
# ----------------------------------------------------------------------------------------------------------------
GOOD = np.zeros((20, 20, 3), dtype=np.uint8)


BAD_INPUTS = {
    "empty_list": ([], ValueError, "empty list"),
    "none": (None, ValueError, "no images"),
    "zero_size_pil": ([GOOD, PIL.Image.new("RGB", (0, 5))], ValueError, r"image 1: .*empty"),
    "zero_size_numpy": ([GOOD, np.zeros((0, 5, 3), np.uint8)], ValueError, r"image 1: .*empty"),
    "zero_size_torch": ([GOOD, GOOD, torch.zeros(3, 4, 0)], ValueError, r"image 2: .*empty"),
    "numpy_5_channels": ([GOOD, np.zeros((8, 8, 5), np.uint8)], ValueError, r"image 1: .*5 channels"),
    "numpy_channels_first": ([np.zeros((3, 8, 9), np.uint8)], ValueError, r"image 0: .*channels-first"),
    "torch_5_channels": ([GOOD, torch.zeros(5, 8, 8)], ValueError, r"image 1: .*5 channels"),
    "torch_channels_last": ([torch.zeros(8, 9, 3, dtype=torch.uint8)], ValueError, r"image 0: .*channels-last"),
    "numpy_4d_in_list": ([GOOD, np.zeros((2, 3, 4, 5), np.uint8)], ValueError, r"image 1: .*2-D \(H, W\) or 3-D"),
    "nan": ([GOOD, np.full((8, 8, 3), np.nan, np.float32)], ValueError, r"image 1: .*NaN or infinite"),
    "inf": ([GOOD, torch.full((3, 8, 8), float("inf"))], ValueError, r"image 1: .*NaN or infinite"),
    "float_0_255": ([np.full((8, 8, 3), 255.0, np.float32)], ValueError, r"image 0: .*\[0, 1\]"),
    "float_negative": ([np.full((8, 8, 3), -0.5, np.float32)], ValueError, r"image 0: .*\[0, 1\]"),
    "int_out_of_range": ([np.full((8, 8, 3), 300, np.int64)], ValueError, r"image 0: .*\[0, 255\]"),
    "bool": ([np.zeros((8, 8, 3), bool)], TypeError, r"image 0: .*bool"),
    "path_str": ([GOOD, "cat.png"], TypeError, r"image 1: .*paths and URLs"),
    "path_obj": ([GOOD, Path("cat.png")], TypeError, r"image 1: .*paths and URLs"),
    "none_in_list": ([GOOD, GOOD, None], TypeError, r"image 2: .*NoneType"),
    "dict": ([GOOD, {"pixels": GOOD}], TypeError, r"image 1: .*dict"),
    "int": ([GOOD, 3], TypeError, r"image 1: .*int"),
    "nested_list": ([[GOOD, GOOD]], TypeError, r"image 0: .*nested"),
    "empty_batch": (np.zeros((0, 8, 8, 3), np.uint8), ValueError, "empty batch"),
}


@pytest.mark.parametrize("images,error,pattern", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_bad_input_errors_name_the_image(images, error, pattern):
    with pytest.raises(error, match=pattern):
        Processor()(images=images, return_tensors="pt")


def test_bad_settings():
    with pytest.raises(ValueError, match="image_stride.*must equal `patch_size`"):
        Processor(image_stride=16)
    with pytest.raises(ValueError, match="image_stride.*must equal `patch_size`"):
        Processor()(images=GOOD, image_stride=28)
    with pytest.raises(ValueError, match="position_id_mode"):
        Processor(position_id_mode="rope")
    with pytest.raises(ValueError, match="max_pixels.*positive integer"):
        Processor(max_pixels=0)
    with pytest.raises(ValueError, match="img_num.*positive integer"):
        Processor(img_num=1.5)
    with pytest.raises(ValueError, match="do_resize.*True or False"):
        Processor(do_resize="yes")
    # a 384 px stock SigLIP has a 27x27 table: 980 px images would not fit it in extrapolate mode
    with pytest.raises(ValueError, match="up to 70 patches per side.*max_image_size <= 378"):
        Processor(max_num_patches_per_side=27)
    Processor(max_num_patches_per_side=27, max_image_size=378, min_image_size=224)
    Processor(max_num_patches_per_side=27, position_id_mode="interpolate")
    with pytest.raises(TypeError, match="unexpected keyword.*max_pixel"):
        Processor()(images=GOOD, max_pixel=3)


# ----------------------------------------------------------------------------------------------------------------
# unpack
# ----------------------------------------------------------------------------------------------------------------
def test_raw_patches_unpack_to_the_images_exactly():
    images = [smooth_rgb(1024, 768, 1), rand_rgb(40, 300, 2), rand_rgb(1, 1, 3)]
    processor = Processor()
    out = processor(images=images, return_tensors="pt")
    grids = processor.unpack(out["packed_pixel_values"], out)
    assert [tuple(g.shape) for g in grids] == [(h, w, 588) for h, w in out["image_grid_hw"].tolist()]
    for image, grid in zip(images, grids):
        h, w = grid.shape[:2]
        restored = ipm.unpatchify(grid, h, w, 14, 3)
        assert torch.equal(restored, ref_to_tensor_normalize(ref_resize(image, DEFAULT)))
    # the grid can also be passed directly (tensor or list)
    assert torch.equal(processor.unpack(out["packed_pixel_values"], out["image_grid_hw"])[1], grids[1])
    assert torch.equal(processor.unpack(out["packed_pixel_values"], out["image_grid_hw"].tolist())[2], grids[2])


def test_unpack_validates():
    processor = Processor()
    out = processor(images=[rand_rgb(300, 200, 1), rand_rgb(64, 64, 2)], return_tensors="pt")
    n = out["packed_pixel_values"].shape[0]
    with pytest.raises(ValueError, match=f"hold {n - 1} patches but image_grid_hw describes {n}"):
        processor.unpack(torch.zeros(n - 1, 8), out)
    with pytest.raises(ValueError, match="shape \\(num_patches, channels\\)"):
        processor.unpack(torch.zeros(1, n, 8), out)
    with pytest.raises(KeyError, match="image_grid_hw"):
        processor.unpack(torch.zeros(n, 8), {"cu_seqlens": out["cu_seqlens"]})
    with pytest.raises(ValueError, match=f"hold {n + 1} patches"):
        processor.unpack((torch.zeros(n, 8), torch.zeros(n + 1, 8)), out)


# ----------------------------------------------------------------------------------------------------------------
# End to end: AutoImageProcessor + AutoModel from a directory, trust_remote_code
# ----------------------------------------------------------------------------------------------------------------
def tiny_processor(**kwargs):
    # matches tiny_config(): patch 4, 24 px -> a 6x6 position table
    return Processor(
        max_image_size=24, min_image_size=8, image_stride=4, patch_size=4, max_num_patches_per_side=6, **kwargs
    )


def test_auto_classes_end_to_end(tmp_path, capfd):
    from transformers import AutoImageProcessor, AutoModel

    config = tiny_config()
    model = make_model(config)
    folder = unique_dir(tmp_path, "navit_e2e")
    model.save_pretrained(folder)
    copy_remote_code(folder)
    tiny_processor().save_pretrained(folder)
    saved = json.loads((folder / "preprocessor_config.json").read_text())
    assert saved["auto_map"] == {"AutoImageProcessor": "image_processing_siglip_navit.SiglipNaViTImageProcessor"}
    assert "image_processor_type" not in saved

    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no (deprecation / use_fast / backend) warning when loading the processor
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    err = capfd.readouterr().err
    assert "slow" not in err and "use_fast" not in err and "backend" not in err, err
    assert type(processor).__name__ == "SiglipNaViTImageProcessor"
    assert processor.max_num_patches_per_side == 6 and processor.patch_size == 4

    loaded = AutoModel.from_pretrained(folder, trust_remote_code=True, **{DTYPE_KWARG: torch.float32}).eval()

    images = [rand_rgb(30, 20, 1), smooth_rgb(10, 17, 2), rand_rgb(5, 5, 3)]
    inputs = processor(images=images, return_tensors="pt")
    assert inputs["image_grid_hw"].tolist() == [[4, 6], [4, 2], [2, 2]]
    with torch.no_grad():
        out = loaded(**inputs, output_hidden_states=True)
        singles = [loaded(**processor(images=image, return_tensors="pt")).last_hidden_state for image in images]
    assert (out.last_hidden_state - torch.cat(singles)).abs().max() <= 1e-5

    maps = processor.unpack(out.last_hidden_state, inputs)
    assert [tuple(m.shape) for m in maps] == [(4, 6, 32), (4, 2, 32), (2, 2, 32)]
    for m, single in zip(maps, singles):
        assert (m.reshape(-1, 32) - single).abs().max() <= 1e-5
    layers = processor.unpack(out.hidden_states, inputs)
    assert len(layers) == config.num_hidden_layers + 1
    assert all([tuple(m.shape) for m in per_layer] == [(4, 6, 32), (4, 2, 32), (2, 2, 32)] for per_layer in layers)

    # BatchFeature.to keeps the index tensors integral; no return_tensors also runs
    with torch.no_grad():
        again = loaded(**inputs.to(torch.float32)).last_hidden_state
        plain = loaded(**processor(images=images)).last_hidden_state
    assert torch.equal(again, out.last_hidden_state) and torch.equal(plain, out.last_hidden_state)


def test_save_load_round_trip(tmp_path):
    from transformers import AutoImageProcessor

    settings = dict(
        max_image_size=980,
        min_image_size=378,
        max_pixels=2_007_040,
        img_num=2,
        position_id_mode="interpolate",
        bagel_interleaved_resize=True,
    )
    processor = Processor(**settings)
    folder = unique_dir(tmp_path, "navit_proc")
    processor.save_pretrained(folder)
    assert (folder / "image_processing_siglip_navit.py").is_file()  # registered: the code travels with the config

    direct = Processor.from_pretrained(folder)
    auto = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    for other in (direct, auto):
        assert other.to_dict() == processor.to_dict()
        for key, value in settings.items():
            assert getattr(other, key) == value
    images = [smooth_rgb(640, 480, 1), rand_rgb(30, 90, 2)]
    expected = processor(images=images, return_tensors="pt")
    for other in (direct, auto):
        assert_same_pack(other(images=images, return_tensors="pt"), {**expected, "max_seqlen": int(expected["max_seqlen"])})

    # from_pretrained kwargs override the saved settings (and are validated)
    override = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True, max_pixels=1_000_000)
    assert override.max_pixels == 1_000_000
    with pytest.raises(ValueError, match="image_stride"):
        AutoImageProcessor.from_pretrained(folder, trust_remote_code=True, image_stride=16)
    # settings changed after loading are validated at the next call
    override.image_stride = 16
    with pytest.raises(ValueError, match="image_stride"):
        override(images=GOOD)


def test_repo_preprocessor_config_is_the_default():
    saved = json.loads((ROOT / "preprocessor_config.json").read_text())
    assert saved["auto_map"] == {"AutoImageProcessor": "image_processing_siglip_navit.SiglipNaViTImageProcessor"}
    default = json.loads(Processor().to_json_string())  # what save_pretrained writes
    default.pop("auto_map", None)
    assert {k: v for k, v in saved.items() if k != "auto_map"} == default
    assert saved["max_image_size"] == 980 and saved["max_num_patches_per_side"] == 70


@pytest.mark.parametrize(
    "settings",
    [{}, {"bagel_interleaved_resize": True}, {"img_num": 4}, {"max_image_size": 378, "min_image_size": 56}],
)
def test_patch_grid_from_the_size_alone_matches_preprocess(settings):
    """`patch_grid(width, height)` (used to plan token budgets from image headers) == the grid preprocess gives."""
    processor = Processor(**settings)
    rng = np.random.default_rng(3)
    sizes = [(1, 1), (13, 2000), (2000, 13), (980, 980), (981, 979), (4000, 3000)] + [
        tuple(int(v) for v in rng.integers(8, 2500, 2)) for _ in range(12)
    ]
    for width, height in sizes:
        image = PIL.Image.new("RGB", (width, height), (10, 20, 30))
        grid = tuple(processor(images=image)["image_grid_hw"][0].tolist())
        assert processor.patch_grid(width, height) == grid, (width, height)
    same = Processor(do_resize=False)
    assert same.patch_grid(28, 42) == (3, 2)


def test_concatenate_packs_equals_one_call():
    images = [rand_rgb(300, 200, 1), smooth_rgb(64, 700, 2), rand_rgb(20, 20, 3)]
    processor = Processor()
    together = processor(images=images, return_tensors="pt")
    joined = ipm.concatenate_packs([processor(images=image) for image in images[:2]] + [processor(images=images[2:])])
    assert set(joined) == set(together)
    for key in together:
        assert torch.equal(torch.as_tensor(joined[key]), torch.as_tensor(together[key])), key
    assert joined["cu_seqlens"].dtype == torch.int32 and isinstance(joined["max_seqlen"], int)
    with pytest.raises(ValueError, match="no packs"):
        ipm.concatenate_packs([])


@pytest.mark.parametrize(
    "settings",
    [{}, {"img_num": 2}, {"max_pixels": 500_000}, {"max_image_size": 384, "min_image_size": 56},
     {"max_image_size": 390, "min_image_size": 56}, {"bagel_interleaved_resize": True}],
)  # fmt: skip
def test_max_patches_per_image_bounds_every_size(settings):
    """The bound extract_features.py checks its token budget against: no image size exceeds it."""
    processor = Processor(**settings)
    bound = processor.max_patches_per_image()
    rng = np.random.default_rng(5)
    sizes = [(w, h) for w in range(900, 1100, 7) for h in range(900, 1100, 11)]
    sizes += [tuple(int(v) for v in rng.integers(1, 4000, 2)) for _ in range(400)]
    counts = [math.prod(processor.patch_grid(w, h)) for w, h in sizes]
    assert max(counts) <= bound
    side = ipm.bagel_fit(processor.max_image_size, 14) // 14
    assert bound == side * side
    assert Processor(do_resize=False).max_patches_per_image() is None
