"""Large inputs are reduced before they are widened, or refused with their image index before any conversion
(issue 20 item 2): a huge 1-bit / 8-bit gray image is resized in its own mode first (exactly BAGEL's pixels), other
modes, arrays and tensors above MAX_INPUT_PIXELS are refused unconverted, an image taken as it is (do_resize=False)
is bounded before it is converted, and a MemoryError names its image."""

import struct
import zlib

import numpy as np
import PIL.Image
import pytest
import torch

from siglip_navit_tools import repo_code

ipm = repo_code.image_processing()
Processor = ipm.SiglipNaViTImageProcessor
GOOD = PIL.Image.new("RGB", (40, 30), (10, 200, 30))


def process(images, **kwargs):
    return Processor(**kwargs)(images=images, return_tensors="pt")


def random_gray(width, height, seed, mode="L"):
    values = np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)
    image = PIL.Image.fromarray(values)
    return image if mode == "L" else image.convert(mode)


@pytest.mark.parametrize("mode", ["L", "1"])
@pytest.mark.parametrize(
    "settings",
    [{}, {"bagel_interleaved_resize": True}, {"img_num": 4}, {"max_image_size": 378, "min_image_size": 56},
     {"position_id_mode": "interpolate"}],
)  # fmt: skip
def test_gray_images_resized_in_their_own_mode_give_bagels_pixels(monkeypatch, mode, settings):
    """The reduction path (taken above MAX_INPUT_PIXELS) against the normal convert-then-resize path, bit for bit, on
    sizes that are scaled down, up, and to odd aspect ratios."""
    sizes = [(1200, 900), (301, 77), (64, 640), (2000, 15), (224, 224), (997, 1013)]
    images = [random_gray(w, h, seed, mode) for seed, (w, h) in enumerate(sizes)]
    want = process(images, **settings)
    monkeypatch.setattr(ipm, "MAX_INPUT_PIXELS", 10)  # every image now takes the reduction path
    got = process(images, **settings)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_a_gray_image_with_transparency_is_not_reduced_but_refused(monkeypatch):
    image = random_gray(50, 40, 0)
    image.info["transparency"] = 3  # BAGEL composites it over white: not a per-channel conversion
    monkeypatch.setattr(ipm, "MAX_INPUT_PIXELS", 10)
    with pytest.raises(ValueError, match=r"^image 1: a PIL mode 'L' image of 50x40 \(WxH\) = 2,000 pixels is more"):
        process([GOOD, image])


def test_a_huge_1_bit_image_is_never_widened_to_full_size_rgb(monkeypatch):
    """The reported case, at the real limit: a 1-bit image just above MAX_INPUT_PIXELS (180 MB in PIL) is encoded,
    and no conversion ever makes a full-size RGB / RGBA copy (it would take 540 MB)."""
    side = 13_400
    assert side * side > ipm.MAX_INPUT_PIXELS
    image = PIL.Image.new("1", (side, side), 0)
    image.paste(1, (0, 0, side // 2, side))  # left half white
    conversions = []
    convert = PIL.Image.Image.convert

    def spy(self, mode=None, *args, **kwargs):
        conversions.append((self.mode, mode, self.size))
        return convert(self, mode, *args, **kwargs)

    monkeypatch.setattr(PIL.Image.Image, "convert", spy)
    out = process(image)
    assert out["image_grid_hw"].tolist() == [list(Processor().patch_grid(side, side))] == [[70, 70]]
    assert all(size[0] * size[1] <= 1000 * 1000 for _, target, size in conversions if target in ("RGB", "RGBA"))
    assert ("1", "L", (side, side)) in conversions  # the same-size 8-bit copy, the only full-size conversion
    pixels = ipm.pack_to_uint8_images(out["packed_pixel_values"], [(70, 70)], 14)[0]
    assert pixels[:, :480].min() == 255 and pixels[:, 500:].max() == 0  # white left, black right


def lazy_png(tmp_path, width, height, color_type, bit_depth=8):
    """A PNG that only has a header (PIL opens it lazily: nothing is decoded until it is loaded)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    path = tmp_path / f"lazy_{width}x{height}_{color_type}.png"
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


@pytest.mark.parametrize("color_type, mode", [(6, "RGBA"), (4, "LA"), (3, "P")])
def test_a_40000_square_image_is_refused_with_its_index_before_it_is_decoded(tmp_path, monkeypatch, color_type, mode):
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", None)  # a user who switched PIL's own bomb guard off
    path = lazy_png(tmp_path, 40_000, 40_000, color_type)
    image = PIL.Image.open(path)
    if image.mode != mode:
        pytest.skip(f"PIL opened it as {image.mode}")
    with pytest.raises(ValueError, match=rf"^image 2: a PIL mode '{mode}' image of 40000x40000 \(WxH\) = "
                                         r"1,600,000,000 pixels is more than the 178,956,970"):  # fmt: skip
        process([GOOD, GOOD, image])
    assert image.tile  # the decoder is still pending: nothing was decoded


@pytest.mark.parametrize(
    "make",
    [lambda: np.broadcast_to(np.float32(0.5), (13_400, 13_400, 3)),  # no memory: a view of one value
     lambda: torch.tensor(0.5).expand(3, 13_400, 13_400),
     lambda: np.broadcast_to(np.uint8(7), (13_400, 13_400))],
    ids=["float-array", "float-tensor", "uint8-array"],
)  # fmt: skip
def test_huge_arrays_and_tensors_are_refused_before_any_copy(make):
    with pytest.raises(ValueError, match=r"^image 1: (numpy array|torch tensor) of 13400x13400 \(WxH\)"):
        process([GOOD, make()])


def test_an_image_taken_as_it_is_is_bounded_before_it_is_converted():
    side = 4_200  # 300 x 300 patches in interpolate mode: within the grid, but 17.6 M pixels
    huge = np.broadcast_to(np.uint8(9), (side, side, 3))
    with pytest.raises(ValueError, match=r"^image 1: with do_resize=False it is used as it is, and 4200x4200 \(WxH\) = "
                                         r"17,640,000 pixels \(300x300 patches\) is more than the supported "
                                         r"16,777,216 pixels"):  # fmt: skip
        process([np.zeros((28, 28, 3), np.uint8), huge], do_resize=False, position_id_mode="interpolate")
    wide = PIL.Image.new("P", (14 * 1025, 14))  # 1025 patches in one row: more than any grid side
    with pytest.raises(ValueError, match=r"^image 0: .* \(1x1025 patches\) is more than the supported"):
        process(wide, do_resize=False, position_id_mode="interpolate")
    ok = process(np.zeros((28, 42, 3), np.uint8), do_resize=False, position_id_mode="interpolate")
    assert ok["image_grid_hw"].tolist() == [[2, 3]]


def test_a_memory_error_names_its_image(monkeypatch):
    resize = ipm.resize_bicubic

    def exhausted(image, width, height):
        if image.size == GOOD.size:
            raise MemoryError
        return resize(image, width, height)

    monkeypatch.setattr(ipm, "resize_bicubic", exhausted)
    with pytest.raises(MemoryError, match=r"^image 1: MemoryError$"):
        process([np.zeros((28, 28, 3), np.uint8), GOOD], do_resize=True, max_image_size=14, min_image_size=14)
