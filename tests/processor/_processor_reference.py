"""BAGEL's image transform re-written independently of the processor (data/transforms.py, data/data_utils.py,
torchvision's ToTensor + Normalize for PIL input), the settings BAGEL runs it with, and the test images. The
processor must match these bit for bit (tests/processor)."""

import math

import numpy as np
import PIL.Image
import torch


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


# a valid image, to put beside a bad one
GOOD = np.zeros((20, 20, 3), dtype=np.uint8)
