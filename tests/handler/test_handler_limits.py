"""The request limits of the Inference Endpoints handler (`handler.py`), attacked as a hostile or clumsy client would:
a decompression bomb under PIL's own guard (refused from its header in milliseconds, no large allocation) and one
above it (the documented ValueError, not PIL's DecompressionBombError; through the pipeline for a local path too),
`batch_size=10**9`, too many images, too many bytes, a response too large, non-string payload keys, formats PIL
could read but a request must not use. Images are decoded one at a time, as the pipeline reaches them.

The handler is loaded as Inference Endpoints load it: `handler.py` imported as a top-level module from the repo
folder; outputs are compared with the model's forward on each image alone (fp32, max|diff| <= 1e-5)."""

from __future__ import annotations

import base64
import importlib.util
import io
import re
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from siglip_navit_tools import testing

TOL = 1e-5


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A saved repo (remote code + handler.py + weights + processor): 24 px images, 4 px patches, 6 x 6 grids."""
    folder = testing.unique_dir(tmp_path_factory.mktemp("limits"), "handler_limits")
    return testing.saved_repo(folder, testing.tiny_config())


def load_module(repo: Path):
    spec = importlib.util.spec_from_file_location("handler", repo / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def module(repo):
    return load_module(repo)


@pytest.fixture(scope="module")
def handler(repo, module):
    return module.EndpointHandler(str(repo), dtype=torch.float32)


@pytest.fixture(scope="module")
def bomb() -> str:
    """A real 12000 x 12000 PNG (432 MB decoded) in 561 KB of base64: under PIL's own bomb guard."""
    return base64.b64encode(testing.png_bomb(12000, 12000)).decode()


def png(image: PIL.Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def small_images(n: int, seed: int = 0) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(24, 24), (20, 8), (12, 16), (8, 24), (1, 1)]
    return [PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes * n][:n]


def reference(handler, image: PIL.Image.Image) -> torch.Tensor:
    """The model's own forward on this image alone, `(1, n, C)`."""
    processor, model = handler.pipeline.image_processor, handler.pipeline.model
    inputs = processor(image)
    with torch.no_grad():
        out = model(**inputs).last_hidden_state
    return out[None]


def close(got, want: torch.Tensor) -> None:
    got = torch.as_tensor(got, dtype=torch.float32)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert (got - want).abs().max().item() <= TOL


def peak_rss_growth(fn) -> tuple[float, float, Exception]:
    """(seconds, MB the peak resident memory grew, the exception) of `fn()`, which must raise. The peak is reset
    first (Linux clear_refs), so the growth is this call's own."""
    status = Path("/proc/self/status")

    def kb(field: str) -> int:
        return int(re.search(rf"{field}:\s+(\d+)", status.read_text()).group(1))

    Path("/proc/self/clear_refs").write_text("5")
    before = kb("VmRSS")
    start = time.perf_counter()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - returned to the caller, which checks its type
        seconds, growth = time.perf_counter() - start, (kb("VmHWM") - before) / 1024
        return seconds, growth, exc
    raise AssertionError("expected the call to raise")


# ---- decompression bombs -----------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns at open; we refuse right after
def test_bomb_under_pils_guard_is_refused_from_its_header(handler, bomb):
    ok = b64(png(small_images(1)[0]))
    seconds, growth, err = peak_rss_growth(lambda: handler({"inputs": [ok, bomb, bomb, bomb]}))
    assert isinstance(err, ValueError), repr(err)
    message = r"inputs\[1\]: the image is 12000x12000 = 144,000,000 pixels, more than max_image_pixels="
    assert re.match(message, str(err)), str(err)
    # decoding it takes seconds and 432 MB (testing.png_bomb's check); the header alone: milliseconds, nothing big
    assert seconds < 0.5, seconds
    assert growth < 64, f"peak RSS grew {growth:.0f} MB"


def test_bomb_above_pils_guard_is_the_documented_value_error(module, handler, monkeypatch):
    huge = b64(testing.png_bomb(20000, 20000, rows=4))  # 400 M pixels: PIL's own guard refuses it at open
    generous = module.RequestLimits(max_image_pixels=10**9)
    monkeypatch.setattr(handler, "limits", generous)
    with pytest.raises(ValueError, match=r"^inputs\[0\]: the image is too large to decode safely \(Image size"):
        handler({"inputs": [huge]})
    with pytest.raises(ValueError, match=r"^inputs: the image is too large to decode safely"):
        module.decode_image(huge, "inputs", generous)


def test_local_path_bomb_through_the_pipeline_names_the_image(handler, tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(testing.png_bomb(20000, 20000, rows=4))
    ok = small_images(1)[0]
    with pytest.raises(ValueError, match=r"^image 1: the image is too large to decode safely"):
        handler.pipeline([ok, str(path)])


# ---- patches per forward, images, bytes, response size -----------------------------------------------------------
def count_forwards(model) -> tuple[list[int], object]:
    sizes: list[int] = []
    handle = model.register_forward_hook(lambda mod, args, kwargs, out: sizes.append(out.last_hidden_state.shape[0]),
                                         with_kwargs=True)  # fmt: skip
    return sizes, handle


def test_batch_size_cannot_make_a_huge_forward(module, handler, monkeypatch):
    """The issue's attack: batch_size=10**9 over 200 1x1 PNGs made one 51,200-patch forward."""
    tiny_png = b64(png(PIL.Image.new("RGB", (1, 1), (200, 10, 30))))
    payload = {"inputs": [tiny_png] * 200, "parameters": {"batch_size": 10**9}}
    with pytest.raises(ValueError, match=r"^'inputs' holds 200 images, more than max_images_per_request=64$"):
        handler(payload)
    monkeypatch.setattr(handler, "limits", module.RequestLimits(max_images_per_request=256, max_patches_per_batch=144))
    sizes, hook = count_forwards(handler.pipeline.model)
    try:
        out = handler({**payload, "parameters": {"batch_size": 10**9, "pool": True}})
    finally:
        hook.remove()
    assert len(out) == 200 and max(sizes) <= 144 and sum(sizes) == 200 * 36, sizes
    want = reference(handler, PIL.Image.new("RGB", (1, 1), (200, 10, 30)))[0].mean(0, keepdim=True)
    for got in (out[0], out[199]):
        close(got, want)
    with pytest.raises(ValueError, match=r"'max_patches_per_batch' = 1000000000 is more than this endpoint allows"):
        handler({"inputs": [tiny_png], "parameters": {"max_patches_per_batch": 10**9}})


def test_request_bytes_are_refused_before_decoding(module, handler, monkeypatch):
    monkeypatch.setattr(handler, "limits", module.RequestLimits(max_request_bytes=1000))
    big = b64(png(PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8))))
    with pytest.raises(ValueError, match=r"^'inputs' holds [\d,]+ bytes of image data, more than max_request_bytes="):
        handler({"inputs": [big[:600], big[:600]]})
    with pytest.raises(ValueError, match=r"^inputs: about [\d,]+ bytes of image data, more than max_request_bytes="):
        handler({"inputs": big})


def test_response_size_is_bounded(module, handler, monkeypatch):
    images = [b64(png(image)) for image in small_images(4)]
    hidden = handler.pipeline.model.config.hidden_size
    patches = sum(int(np.prod(handler.pipeline.image_processor.patch_grid(*image.size))) for image in small_images(4))
    monkeypatch.setattr(handler, "limits", module.RequestLimits(max_response_values=patches * hidden - 1))
    message = rf"^the response would hold {patches * hidden:,} numbers \(4 images\), more than max_response_values="
    with pytest.raises(ValueError, match=message):
        handler({"inputs": images})
    assert len(handler({"inputs": images, "parameters": {"pool": True}})) == 4  # 4 x C numbers: fine


def test_images_are_decoded_one_at_a_time(module, handler, monkeypatch):
    """Lazy decoding: with one image per forward, each image is decoded when the pipeline reaches it (it reads one
    image ahead to close a group), never all of them before the first forward."""
    events: list[str] = []
    decode = module.decode_pixels
    def spy(image, where):
        events.append("decode")
        return decode(image, where)

    monkeypatch.setattr(module, "decode_pixels", spy)
    hook = handler.pipeline.model.register_forward_hook(lambda *args: events.append("forward"))
    try:
        out = handler({"inputs": [b64(png(image)) for image in small_images(5)]})
    finally:
        hook.remove()
    assert len(out) == 5
    assert events == ["decode", "decode"] + ["forward", "decode"] * 3 + ["forward", "forward"], events


def test_a_truncated_image_after_good_ones_is_named(handler):
    good, bad = png(small_images(1)[0]), png(small_images(2)[1])
    with pytest.raises(ValueError, match=r"^inputs\[2\]: the image data cannot be decoded"):
        handler({"inputs": [b64(good), b64(good), b64(bad[: len(bad) - 30])]})


# ---- payload shape -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "payload, message",
    [
        ({1: "x", "inputs": "QUJD"}, r"^payload keys must be strings, got 1 \(int\)$"),
        ({None: 1}, r"^payload keys must be strings, got None \(NoneType\)$"),
        ({"inputs": "QUJD", "parameters": {("pool",): True}}, r"^'parameters' keys must be strings, got \('pool',\)"),
        ({"inputs": "QUJD", "parameters": {2: True}}, r"^'parameters' keys must be strings, got 2 \(int\)"),
    ],
)
def test_non_string_payload_keys(handler, payload, message):
    with pytest.raises(ValueError, match=message):
        handler(payload)


def test_formats_outside_the_list_are_refused_unread(module, handler):
    image = small_images(1)[0]
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"  # PIL's EPS plugin would run Ghostscript
    for data in (eps, png(image, "ICO"), png(image, "TGA")):
        with pytest.raises(ValueError, match=r"^inputs: not an image \(PIL cannot identify \d+ bytes of data as"):
            handler({"inputs": b64(data)})
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"):
        decoded = PIL.Image.open(io.BytesIO(png(image, fmt)))
        close(handler({"inputs": b64(png(image, fmt))}), reference(handler, decoded))


# ---- configuration ---------------------------------------------------------------------------------------------
def test_limits_from_the_environment(repo, module, monkeypatch):
    environ = {"SIGLIP_NAVIT_MAX_IMAGES_PER_REQUEST": "8", "SIGLIP_NAVIT_MAX_IMAGE_PIXELS": "1_000_000"}
    limits = module.RequestLimits.from_env(environ)
    assert (limits.max_images_per_request, limits.max_image_pixels) == (8, 1_000_000)
    assert limits.max_patches_per_batch == module.RequestLimits().max_patches_per_batch
    with pytest.raises(ValueError, match=r"^SIGLIP_NAVIT_MAX_REQUEST_BYTES must be a positive integer, got 'lots'$"):
        module.RequestLimits.from_env({"SIGLIP_NAVIT_MAX_REQUEST_BYTES": "lots"})
    with pytest.raises(ValueError, match=r"^RequestLimits: `max_image_pixels` must be a positive integer, got 0$"):
        module.RequestLimits.from_env({"SIGLIP_NAVIT_MAX_IMAGE_PIXELS": "0"})
    monkeypatch.setenv("SIGLIP_NAVIT_MAX_IMAGES_PER_REQUEST", "2")
    endpoint = module.EndpointHandler(str(repo), dtype=torch.float32)
    ok = b64(png(small_images(1)[0]))
    assert len(endpoint({"inputs": [ok, ok]})) == 2
    with pytest.raises(ValueError, match=r"holds 3 images, more than max_images_per_request=2"):
        endpoint({"inputs": [ok, ok, ok]})
