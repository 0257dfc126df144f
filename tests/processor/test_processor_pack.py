"""SiglipNaViTImageProcessor's pack: the patch layout (and its inverse), the pack's structure and types,
unpack, the patch grid from the size alone, joining packs, and the settings that follow a model's geometry."""

import json
import math

import numpy as np
import PIL.Image
import pytest
import torch
from _processor_reference import DEFAULT, rand_rgb, ref_patchify, ref_resize, ref_to_tensor_normalize, smooth_rgb

from siglip_navit_tools import repo_code
from siglip_navit_tools.testing import tiny_config

ipm = repo_code.image_processing()

Processor = ipm.SiglipNaViTImageProcessor


# ----------------------------------------------------------------------------------------------------------------
# patchify layout, pack structure
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
# the patch grid from the size alone, joined packs, the largest pack of one image
# ----------------------------------------------------------------------------------------------------------------
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
