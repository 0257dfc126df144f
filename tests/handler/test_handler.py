"""The Inference Endpoints handler (`handler.py`), loaded as the endpoint does: imported as a top-level module from a
converted repo folder (handler.py copied beside the remote-code files), `EndpointHandler(path)` then `handler(data)`.

Outputs are compared with the model's forward on each image alone (fp32, max|diff| <= 1e-5)."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import shutil

import PIL.Image
import pytest
import torch
from _pipeline_repo import close, count_forwards, images, make_pipeline_repo, reference

from siglip_navit_tools import repo_code
from siglip_navit_tools.testing import make_model, tiny_config

ROOT = repo_code.REPO_ROOT

HANDLER_FILE = "handler.py"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    folder = make_pipeline_repo(tmp_path_factory.mktemp("handler"), make_model(tiny_config(), attn="sdpa", seed=5))
    shutil.copy(ROOT / HANDLER_FILE, folder / HANDLER_FILE)
    return folder


def import_handler_module(folder):
    """What Inference Endpoints do: load `<repo>/handler.py` as a top-level module (no package, no relative imports)."""
    spec = importlib.util.spec_from_file_location("handler", folder / HANDLER_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def handler(repo):
    return import_handler_module(repo).EndpointHandler(str(repo))


def png_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64(image: PIL.Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode()


def hidden(handler) -> int:
    return handler.pipeline.model.config.hidden_size


def want_flat(handler, image) -> torch.Tensor:
    return reference(handler.pipeline, image).reshape(1, -1, hidden(handler))


def roundtrip(image: PIL.Image.Image) -> PIL.Image.Image:
    return PIL.Image.open(io.BytesIO(png_bytes(image)))


# ---- loading ----------------------------------------------------------------------------------------------------
def test_loads_our_pipeline_in_fp32_on_cpu(handler):
    assert type(handler.pipeline).__name__ == "SiglipNaViTFeatureExtractionPipeline"
    native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert handler.pipeline.model.dtype == (torch.bfloat16 if native_bf16 else torch.float32)  # no GPU: the CPU rule


def test_default_path_is_the_working_directory(repo, monkeypatch):
    monkeypatch.chdir(repo)
    handler = import_handler_module(repo).EndpointHandler()
    assert type(handler.pipeline).__name__ == "SiglipNaViTFeatureExtractionPipeline"


# ---- inputs -----------------------------------------------------------------------------------------------------
def test_base64(handler):
    image = images()[1]
    out = handler({"inputs": b64(image)})
    json.dumps(out)  # JSON-serialisable
    close(out, want_flat(handler, roundtrip(image)))


def test_data_url_base64_and_urlsafe(handler):
    image = images()[4]  # RGBA: composited over white by the processor, like a PIL.Image.open of the file
    encoded = b64(image)
    out = handler({"inputs": "data:image/png;base64," + encoded})
    close(out, want_flat(handler, roundtrip(image)))
    urlsafe = base64.urlsafe_b64encode(png_bytes(image)).decode().rstrip("=")
    assert "-" in urlsafe or "_" in urlsafe  # really the URL-safe alphabet
    close(handler({"inputs": urlsafe}), want_flat(handler, roundtrip(image)))


def test_raw_bytes_and_pil(handler):
    image = images()[2]
    close(handler({"inputs": png_bytes(image)}), want_flat(handler, roundtrip(image)))
    close(handler({"inputs": bytearray(png_bytes(image))}), want_flat(handler, roundtrip(image)))
    close(handler({"inputs": image}), want_flat(handler, image))


def test_list_with_batch_size_is_one_forward(handler):
    imgs = images()
    payload = {"inputs": [b64(imgs[0]), png_bytes(imgs[1]), imgs[2], b64(imgs[3])], "parameters": {"batch_size": 4}}
    calls, handle = count_forwards(handler.pipeline.model)
    try:
        out = handler(payload)
    finally:
        handle.remove()
    assert len(calls) == 1
    json.dumps(out)
    assert len(out) == 4
    for got, image in zip(out, [roundtrip(imgs[0]), roundtrip(imgs[1]), imgs[2], roundtrip(imgs[3])]):
        close(got, want_flat(handler, image))


def test_parameters_pool_and_grid(handler):
    image = images()[3]
    want = reference(handler.pipeline, image)
    pooled = handler({"inputs": image, "parameters": {"pool": True}})
    close(pooled, want.reshape(-1, want.shape[-1]).mean(0, keepdim=True))
    for name in ("grid", "return_grid"):
        grid = handler({"inputs": [image], "parameters": {name: True, "max_patches_per_batch": 36}})
        assert len(grid) == 1
        close(grid[0], want)
    json.dumps(pooled)


VALID = b64(images()[0])


# ---- bad payloads -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "payload, message",
    [
        ([1, 2], r"the payload must be an object \(dict\) with an 'inputs' key, got list"),
        ({"parameters": {}}, r"the payload has no 'inputs'"),
        ({"inputs": [], "parameters": {}}, r"'inputs' is an empty list"),
        ({"inputs": 3}, r"inputs: expected a base64 string, raw image bytes or a PIL image, got int"),
        ({"inputs": [VALID, {"image": "x"}]}, r"inputs\[1\]: expected a base64 string, .* got dict"),
        ({"inputs": "not base64 at all!"}, r"inputs: not valid base64"),
        ({"inputs": [VALID, "s3://bucket/cat.jpg"]}, r"inputs\[1\]: 's3://bucket/cat.jpg' is a URL; images are not fetched"),
        ({"inputs": ""}, r"inputs: empty base64 string"),
        ({"inputs": "data:image/png,abc"}, r"inputs: a data: URL must look like 'data:image/png;base64,<data>'"),
        ({"inputs": b""}, r"inputs: no image data \(0 bytes\)"),
        ({"inputs": [None, base64.b64encode(b"hello world").decode()]}, r"inputs\[0\]: expected .* got NoneType"),
        ({"inputs": ["QUJD", base64.b64encode(b"hello world").decode()]}, r"inputs\[0\]: not an image"),
        ({"inputs": "QUJD", "parameters": {"pool": True, "colour": 1}}, r"unknown parameter\(s\) \['colour'\]"),
        ({"inputs": "QUJD", "parameters": {"return_tensors": True}}, r"unknown parameter\(s\) \['return_tensors'\]"),
        ({"inputs": "QUJD", "parameters": [1]}, r"'parameters' must be an object \(dict\), got list"),
        ({"inputs": "QUJD", "parameters": {"grid": True, "return_grid": True}}, r"give 'grid' or 'return_grid'"),
        ({"inputs": "QUJD", "parametres": {}}, r"unknown payload key\(s\) \['parametres'\]"),
    ],
)
def test_bad_payloads(handler, payload, message):
    with pytest.raises(ValueError, match=message):
        handler(payload)


def test_truncated_image_is_named(handler):
    data = png_bytes(images()[0])
    with pytest.raises(ValueError, match=r"inputs\[1\]: the image data cannot be decoded"):
        handler({"inputs": [data, data[: len(data) // 2]]})


@pytest.mark.parametrize(
    "parameters, message",
    [
        ({"pool": "yes"}, r"`pool` must be True or False"),
        ({"batch_size": 0}, r"`batch_size` must be a positive integer"),
        ({"pool": True, "grid": True}, r"exclude each other"),
        ({"max_patches_per_batch": 4}, r"image 0: its 36 patches do not fit max_patches_per_batch=4"),
    ],
)
def test_bad_parameter_values(handler, parameters, message):
    with pytest.raises(ValueError, match=message):
        handler({"inputs": [images()[0]], "parameters": parameters})


def test_processor_errors_name_the_image(handler):
    empty = PIL.Image.new("RGB", (0, 0))
    with pytest.raises((ValueError, TypeError), match=r"^image 1: "):
        handler({"inputs": [images()[0], empty]})
