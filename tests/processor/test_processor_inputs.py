"""SiglipNaViTImageProcessor's inputs: PIL modes (BAGEL's RGB rule), 16-bit and float images, numpy and torch
arrays, do_resize=False, and bad input or settings as clear errors naming the image."""

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from _processor_reference import GOOD, assert_same_pack, rand_rgb, ref_pack, ref_pil_img2rgb

from siglip_navit_tools import repo_code

ipm = repo_code.image_processing()

Processor = ipm.SiglipNaViTImageProcessor


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
