# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Hugging Face Inference Endpoints handler: `EndpointHandler(path)(data)` -> JSON-ready features.

Inference Endpoints import this file as a top-level module from the repo folder (so no relative imports here) and
call `EndpointHandler(path)` once, then `handler(data)` per request. It owns only the request format: decoding the
payload's images (base64 strings, data: URLs, raw bytes, PIL images) and checking its parameters. The model, the
processor and the pipeline come from the repo folder itself, through `transformers.pipeline(model=path,
trust_remote_code=True)` (the task comes from config.json's `custom_pipelines`). It never reads paths or fetches
URLs named in a request. The dtype it loads in is the repo's one rule (`pipeline_siglip_navit.default_dtype`: bf16 on
GPUs and CPUs where bf16 is fast, fp32 elsewhere), read from the repo's own code.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from typing import Any, Optional, Union

import PIL.Image
import torch
import transformers
from transformers.dynamic_module_utils import get_class_from_dynamic_module

# Request parameter -> the pipeline's keyword argument.
PARAMETERS = {
    "pool": "pool",
    "grid": "return_grid",
    "return_grid": "return_grid",
    "batch_size": "batch_size",
    "max_patches_per_batch": "max_patches_per_batch",
}
PAYLOAD_KEYS = ("inputs", "parameters")


def repo_function(folder: str, name: str) -> Any:
    """A function of the repo's own `pipeline_siglip_navit.py` (e.g. `default_dtype`, the one dtype rule), loaded from
    `folder` the way transformers loads the pipeline itself (this file has no package to import it from)."""
    return get_class_from_dynamic_module(f"pipeline_siglip_navit.{name}", folder)


def _decode_base64(text: str, where: str) -> bytes:
    """A base64 string, or a `data:<type>;base64,<data>` URL -> bytes."""
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ValueError(f"{where}: a data: URL must look like 'data:image/png;base64,<data>', got {header[:60]!r}")
    compact = "".join(text.split())
    if not compact:
        raise ValueError(f"{where}: empty base64 string")
    try:
        if "-" in compact or "_" in compact:  # the URL-safe alphabet, often sent without padding
            return base64.b64decode(compact + "=" * (-len(compact) % 4), altchars=b"-_", validate=True)
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"{where}: not valid base64 ({err})") from err


def decode_image(item: Any, where: str) -> PIL.Image.Image:
    """One payload image (a base64 string / data: URL, raw bytes, or a PIL image) -> a PIL image, decoded in full."""
    if isinstance(item, PIL.Image.Image):
        return item
    if isinstance(item, str):
        raw = _decode_base64(item, where)
    elif isinstance(item, (bytes, bytearray, memoryview)):
        raw = bytes(item)
    else:
        raise ValueError(
            f"{where}: expected a base64 string, raw image bytes or a PIL image, got {type(item).__name__}"
        )
    if not raw:
        raise ValueError(f"{where}: no image data (0 bytes)")
    try:
        image = PIL.Image.open(io.BytesIO(raw))
        image.load()
    except PIL.UnidentifiedImageError as err:
        raise ValueError(f"{where}: not an image (PIL cannot identify {len(raw)} bytes of data)") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{where}: the image data cannot be decoded ({err})") from err
    return image


def pipeline_kwargs(parameters: Any) -> dict[str, Any]:
    """The request's `parameters` -> the pipeline's keyword arguments (values are checked by the pipeline)."""
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise ValueError(f"'parameters' must be an object (dict), got {type(parameters).__name__}")
    unknown = sorted(set(parameters) - set(PARAMETERS))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown}; supported: {', '.join(PARAMETERS)}")
    if "grid" in parameters and "return_grid" in parameters:
        raise ValueError("give 'grid' or 'return_grid', not both (they are the same parameter)")
    return {PARAMETERS[name]: value for name, value in parameters.items()}


def parse_payload(data: Any) -> tuple[Union[PIL.Image.Image, list], dict[str, Any]]:
    """`{"inputs": <image | [images]>, "parameters": {...}}` -> (a PIL image or a list of them, pipeline kwargs)."""
    if not isinstance(data, dict):
        raise ValueError(f"the payload must be an object (dict) with an 'inputs' key, got {type(data).__name__}")
    if "inputs" not in data:
        raise ValueError("the payload has no 'inputs' (an image, or a list of images)")
    unknown = sorted(set(data) - set(PAYLOAD_KEYS))
    if unknown:
        raise ValueError(f"unknown payload key(s) {unknown}; expected {', '.join(PAYLOAD_KEYS)}")
    kwargs = pipeline_kwargs(data.get("parameters"))
    inputs = data["inputs"]
    if isinstance(inputs, (list, tuple)):
        if not inputs:
            raise ValueError("'inputs' is an empty list; send at least one image")
        return [decode_image(item, f"inputs[{i}]") for i, item in enumerate(inputs)], kwargs
    return decode_image(inputs, "inputs"), kwargs


class EndpointHandler:
    """Inference Endpoints' custom handler for this repo: image features from the repo's own pipeline.

    Request: `{"inputs": <image | list of images>, "parameters": {...}}`, an image being a base64 string (optionally
    a `data:image/...;base64,` URL), raw bytes, or a PIL image (what the endpoint gives for an image/* request body).
    Parameters: `pool` (the mean over each image's patches), `grid` / `return_grid` (each image's `(h, w, C)` grid),
    `batch_size` and `max_patches_per_batch` (images packed into one forward; results unchanged).
    Response: one image -> `[1][n][C]` (pool: `[1][C]`; grid: `[h][w][C]`) nested lists; a list -> a list of those.
    A bad request raises a ValueError that says what was wrong (and which image).
    """

    def __init__(self, path: str = "", dtype: Optional[torch.dtype] = None, device: Optional[Any] = None):
        folder = os.path.abspath(path or ".")
        if dtype is None:
            dtype = repo_function(folder, "default_dtype")(device)
        kwargs: dict[str, Any] = {repo_function(folder, "dtype_kwarg")(): dtype}
        if device is not None:
            kwargs["device"] = device
        self.pipeline = transformers.pipeline(model=folder, trust_remote_code=True, **kwargs)

    def __call__(self, data: dict[str, Any]) -> list:
        images, kwargs = parse_payload(data)
        return self.pipeline(images, **kwargs)
