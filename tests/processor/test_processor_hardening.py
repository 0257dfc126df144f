"""SiglipNaViTImageProcessor at the edges: every failure names its image, settings are bounded at construction,
big-endian data is read by value, and property-based checks of the size rule over random sizes and settings."""

import io

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from _processor_reference import ref_size

from siglip_navit_tools import repo_code

ipm = repo_code.image_processing()

Processor = ipm.SiglipNaViTImageProcessor
GOOD = np.zeros((28, 28, 3), dtype=np.uint8)


def png_bytes(width=300, height=200, seed=0) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# every failure names the image
# ----------------------------------------------------------------------------------------------------------------
def _truncated():
    return PIL.Image.open(io.BytesIO(png_bytes()[:2000]))


def _closed():
    image = PIL.Image.open(io.BytesIO(png_bytes()))
    image.load()
    image.close()
    return image


def _closed_gray():
    image = PIL.Image.open(io.BytesIO(png_bytes())).convert("L")
    image.close()
    return image


@pytest.mark.parametrize(
    "make_bad, error",
    [
        (_truncated, OSError),  # PIL: "image file is truncated" (an OSError without errno: a bad file, not a disk)
        (_closed, ValueError),  # RGB: reaches the resize before failing
        (_closed_gray, ValueError),  # converted to RGB first
        (lambda: torch.zeros(3, 30, 30, device="meta"), ValueError),
    ],
    ids=["truncated", "closed-rgb", "closed-gray", "meta-tensor"],
)
def test_failures_name_the_image_index(make_bad, error):
    with pytest.raises(error, match=r"^image 2: "):
        Processor()(images=[GOOD, GOOD, make_bad()])


def test_os_errors_keep_their_errno():
    import errno

    err = ipm.with_image_index(OSError(errno.EIO, "Input/output error", "x.png"), 3)
    assert isinstance(err, OSError) and err.errno == errno.EIO and err.filename == "x.png"
    assert str(err.strerror).startswith("image 3: ")
    # renumbering (the pipeline processes images one at a time): the prefix is replaced, type and errno kept
    again = ipm.with_image_index(FileNotFoundError(errno.ENOENT, "image 0: No such file", "y.png"), 5, replaces=0)
    assert type(again) is FileNotFoundError and again.errno == errno.ENOENT and again.strerror == "image 5: No such file"
    value = ipm.with_image_index(ValueError("image 0: bad"), 7, replaces=0)
    assert type(value) is ValueError and str(value) == "image 7: bad"


# ----------------------------------------------------------------------------------------------------------------
# big-endian arrays
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["u2", "f4", "f8", "i4", "u4", "i2"])
def test_big_endian_arrays_are_read_by_value(dtype):
    rng = np.random.default_rng(0)
    if dtype == "u2":  # 16-bit data, small values included (the old bug read <= 255 as 8-bit)
        values = rng.integers(0, 65536, (42, 28, 3)).astype("<u2")
        values[0, 0] = 200
    elif dtype.startswith("f"):
        values = rng.random((42, 28, 3)).astype("<" + dtype)
    else:
        values = rng.integers(0, 256, (42, 28, 3)).astype("<" + dtype)
    big = values.astype(">" + dtype)
    assert big.dtype.byteorder == ">" and np.array_equal(big, values)
    little = Processor()(images=values, return_tensors="pt")["packed_pixel_values"]
    assert torch.equal(Processor()(images=big, return_tensors="pt")["packed_pixel_values"], little)


# ----------------------------------------------------------------------------------------------------------------
# settings are bounded when the processor is built
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(max_image_size=140000, max_num_patches_per_side=10000), "max_image_size` = 140000 is more than"),
        (dict(max_num_patches_per_side=10000, position_id_mode="interpolate"), "max_num_patches_per_side` = 10000"),
        (dict(max_image_size=9000, position_id_mode="interpolate"), "max_image_size` = 9000"),
        (dict(min_image_size=10**6), "min_image_size` = 1000000"),
        (dict(patch_size=10**5, image_stride=10**5), "(patch_size|image_stride)` = 100000"),
        (dict(patch_size=1, image_stride=1, max_image_size=8000, position_id_mode="interpolate"), "8000 patches per side"),
    ],
)
def test_absurd_settings_are_refused_at_construction(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        Processor(**kwargs)
    with pytest.raises(ValueError, match=pattern):  # and as one call's overrides
        Processor()(images=GOOD, **kwargs)


def test_settings_at_the_bounds_are_accepted():
    Processor(max_num_patches_per_side=ipm.MAX_PATCHES_PER_SIDE, position_id_mode="interpolate")
    Processor(max_image_size=ipm.MAX_IMAGE_SIDE, max_num_patches_per_side=ipm.MAX_IMAGE_SIDE // 14 + 1)


# ----------------------------------------------------------------------------------------------------------------
# property-based: the size rule over random sizes and settings
# ----------------------------------------------------------------------------------------------------------------
SIDES = st.integers(min_value=1, max_value=20000)
RULES = st.fixed_dictionaries(
    {
        "max_image_size": st.integers(14, 2000),
        "min_image_size": st.integers(1, 1000),
        "image_stride": st.sampled_from([1, 2, 4, 14, 16, 32]),
        "max_pixels": st.integers(1, 4_000_000),
        "img_num": st.integers(1, 8),
    }
)
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(width=SIDES, height=SIDES, rule=RULES)
def test_size_rule_invariants(width, height, rule):
    w, h = ipm.bagel_resize_size(width, height, **rule)
    stride = rule["image_stride"]
    assert (w, h) == ref_size(
        width, height, rule["max_image_size"], rule["min_image_size"], stride, rule["max_pixels"], rule["img_num"]
    )
    assert w % stride == 0 and h % stride == 0 and w >= stride and h >= stride
    # the last step caps the long side: never more than the snapped maximum
    assert max(w, h) <= ipm.bagel_fit(rule["max_image_size"], stride)


@PROPERTY
@given(width=SIDES, height=SIDES, rule=RULES, mode=st.sampled_from(["extrapolate", "interpolate"]))
def test_patch_grid_is_bounded_for_every_accepted_setting(width, height, rule, mode):
    side = rule["max_image_size"] // rule["image_stride"] + 1
    try:
        processor = Processor(patch_size=rule["image_stride"], max_num_patches_per_side=side, position_id_mode=mode,
                              **rule)  # fmt: skip
    except ValueError:
        return  # refused at construction: nothing to bound
    grid_h, grid_w = processor.patch_grid(width, height)
    assert 1 <= grid_h <= ipm.MAX_PATCHES_PER_SIDE and 1 <= grid_w <= ipm.MAX_PATCHES_PER_SIDE
    assert grid_h * grid_w <= processor.max_patches_per_image()
    if mode == "extrapolate":
        assert grid_h <= side and grid_w <= side
        ids = ipm.position_ids_extrapolate(grid_h, grid_w, side)
        assert int(ids.max()) < side * side


@settings(max_examples=40, deadline=None)
@given(
    width=st.integers(1, 400),
    height=st.integers(1, 400),
    interleaved=st.booleans(),
    img_num=st.integers(1, 4),
)
def test_patch_grid_equals_preprocess(width, height, interleaved, img_num):
    processor = Processor(bagel_interleaved_resize=interleaved, img_num=img_num)
    image = PIL.Image.new("RGB", (width, height), (10, 20, 30))
    out = processor(images=image, return_tensors="pt")
    assert tuple(out["image_grid_hw"][0].tolist()) == processor.patch_grid(width, height)
