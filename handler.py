# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Hugging Face Inference Endpoints handler: `EndpointHandler(path)(data)` -> JSON-ready features.

Inference Endpoints import this file as a top-level module from the repo folder (so no relative imports here) and
call `EndpointHandler(path)` once, then `handler(data)` per request. It owns the request format and its limits:
decoding a request's images (base64 strings, data: URLs, raw bytes, PIL images) lazily, after their headers are
checked against `RequestLimits` (images per request, bytes, pixels per image, patches per forward, response size),
and checking its parameters. `siglip-navit-serve` imports the same functions (through
`siglip_navit_tools.repo_code.handler()`), so both speak one format with one set of limits. The model, the processor
and the pipeline come from the repo folder itself, through `transformers.pipeline(model=path,
trust_remote_code=True)` (the task comes from config.json's `custom_pipelines`). It never reads paths or fetches
URLs named in a request. The dtype it loads in is the repo's one rule (`pipeline_siglip_navit.default_dtype`: bf16 on
GPUs and CPUs where bf16 is fast, fp32 elsewhere), read from the repo's own code.
"""

# No `from __future__ import annotations`: Inference Endpoints may exec this file without registering it in sys.modules,
# and dataclasses then cannot resolve string annotations.
import base64
import binascii
import dataclasses
import io
import math
import os
import struct
import zlib
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

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


# ---- the request format and its limits (shared with `siglip-navit-serve`, which imports this file) ------------
# The image formats a request image may be in (PIL's names). Others are refused unread: PIL's EPS plugin runs
# Ghostscript, and the rarer decoders are the least exercised.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
LIMITS_ENV_PREFIX = "SIGLIP_NAVIT_"  # the handler reads each limit from SIGLIP_NAVIT_<FIELD IN CAPITALS> if set


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for, checked before any image is decoded (the handler's and the server's limits).

    The handler reads each field from the environment variable `SIGLIP_NAVIT_<FIELD>` (e.g.
    `SIGLIP_NAVIT_MAX_IMAGE_PIXELS=100000000`), `siglip-navit-serve` from the flag of the same name.
    """

    # bytes of image data in one request: base64 characters and raw bytes of all its images (the server: its body)
    max_request_bytes: int = 32 * 1024 * 1024
    # images in one request
    max_images_per_request: int = 64
    # pixels (width x height) of one image, read from its header BEFORE decoding (PIL's own bomb guard, 178,956,970,
    # stays in force above it)
    max_image_pixels: int = 50_000_000
    # patches in one forward: a request's `batch_size` / `max_patches_per_batch` never make a larger one
    max_patches_per_batch: int = 16384
    # numbers in one response (patches x channels per image, or channels per pooled image), all images together
    max_response_values: int = 32 * 1024 * 1024

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"RequestLimits: `{field.name}` must be a positive integer, got {value!r}")

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "RequestLimits":
        """The defaults, with every `SIGLIP_NAVIT_<FIELD>` set in `environ` (default: `os.environ`) applied."""
        environ = os.environ if environ is None else environ
        values = {}
        for field in dataclasses.fields(cls):
            name = LIMITS_ENV_PREFIX + field.name.upper()
            if name in environ:
                try:
                    values[field.name] = int(environ[name])  # 1_000_000 is fine too
                except ValueError:
                    raise ValueError(f"{name} must be a positive integer, got {environ[name]!r}") from None
        return cls(**values)


DEFAULT_LIMITS = RequestLimits()


class RequestLimitError(ValueError):
    """A request over one of its `RequestLimits` (a ValueError, the handler's documented error; the server answers
    it with 413 instead of 400)."""


def _decode_base64(text: str, where: str, max_bytes: Optional[int] = None) -> bytes:
    """A base64 string, or a `data:<type>;base64,<data>` URL -> bytes (at most `max_bytes`, refused before decoding)."""
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ValueError(f"{where}: a data: URL must look like 'data:image/png;base64,<data>', got {header[:60]!r}")
    elif "://" in text[:64]:  # never base64 (its alphabet has no ':'): the commonest mistake, a link to the image
        raise ValueError(
            f"{where}: {text[:80]!r} is a URL; images are not fetched from URLs: send the image's bytes as base64 or "
            "as a 'data:image/png;base64,<data>' URL"
        )
    compact = "".join(text.split())
    if not compact:
        raise ValueError(f"{where}: empty base64 string")
    if max_bytes is not None and len(compact) // 4 * 3 > max_bytes:
        raise RequestLimitError(
            f"{where}: about {len(compact) // 4 * 3:,} bytes of image data, more than max_request_bytes={max_bytes:,}"
        )
    try:
        if "-" in compact or "_" in compact:  # the URL-safe alphabet, often sent without padding
            return base64.b64decode(compact + "=" * (-len(compact) % 4), altchars=b"-_", validate=True)
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"{where}: not valid base64 ({err})") from err


def _check_pixels(image: PIL.Image.Image, where: str, limits: RequestLimits) -> PIL.Image.Image:
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise RequestLimitError(
            f"{where}: the image is {width}x{height} = {width * height:,} pixels, more than max_image_pixels="
            f"{limits.max_image_pixels:,} (read from its header; nothing was decoded). Send a smaller image: it is "
            "resized to the model's size anyway."
        )
    return image


def open_image(item: Any, where: str, limits: RequestLimits = DEFAULT_LIMITS) -> PIL.Image.Image:
    """One request image (a base64 string / data: URL, raw bytes, or a PIL image) -> a PIL image whose header is read
    and checked (format, `max_image_pixels`) but whose pixels are NOT decoded yet (`decode_pixels` does that)."""
    if isinstance(item, PIL.Image.Image):
        return _check_pixels(item, where, limits)
    if isinstance(item, str):
        raw = _decode_base64(item, where, limits.max_request_bytes)
    elif isinstance(item, (bytes, bytearray, memoryview)):
        raw = bytes(item)
    else:
        raise ValueError(
            f"{where}: expected a base64 string, raw image bytes or a PIL image, got {type(item).__name__}"
        )
    if not raw:
        raise ValueError(f"{where}: no image data (0 bytes)")
    PIL.Image.init()  # registers every plugin, so that IMAGE_FORMATS can be checked against what this PIL reads
    try:
        image = PIL.Image.open(io.BytesIO(raw), formats=[f for f in IMAGE_FORMATS if f in PIL.Image.OPEN])
    except PIL.Image.DecompressionBombError as err:  # PIL's own guard, above max_image_pixels' usual values
        raise RequestLimitError(
            f"{where}: the image is too large to decode safely ({err}); the limit is max_image_pixels="
            f"{limits.max_image_pixels:,}"
        ) from err
    except PIL.UnidentifiedImageError as err:
        raise ValueError(
            f"{where}: not an image (PIL cannot identify {len(raw)} bytes of data as one of {', '.join(IMAGE_FORMATS)})"
        ) from err
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as err:
        raise ValueError(f"{where}: the image header cannot be read ({err})") from err
    return _check_pixels(image, where, limits)


def decode_pixels(image: PIL.Image.Image, where: str) -> PIL.Image.Image:
    """Decode the pixels of an image `open_image` returned (errors name the image as `where`)."""
    try:
        image.load()
    except PIL.Image.DecompressionBombError as err:
        raise RequestLimitError(f"{where}: the image is too large to decode safely ({err})") from err
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, MemoryError) as err:
        raise ValueError(f"{where}: the image data cannot be decoded ({err})") from err
    return image


def decode_image(item: Any, where: str, limits: RequestLimits = DEFAULT_LIMITS) -> PIL.Image.Image:
    """One payload image (a base64 string / data: URL, raw bytes, or a PIL image) -> a PIL image, decoded in full."""
    return decode_pixels(open_image(item, where, limits), where)


def open_images(items: Sequence[Any], name: str, limits: RequestLimits = DEFAULT_LIMITS) -> list[PIL.Image.Image]:
    """A request's list of images (the field `name`) -> PIL images, headers checked, nothing decoded: the count and
    the total size are refused before any base64 is decoded."""
    if not items:
        raise ValueError(f"'{name}' is an empty list; send at least one image")
    if len(items) > limits.max_images_per_request:
        raise RequestLimitError(
            f"'{name}' holds {len(items)} images, more than max_images_per_request={limits.max_images_per_request}"
        )
    size = sum(len(item) for item in items if isinstance(item, (str, bytes, bytearray, memoryview)))
    if size > limits.max_request_bytes:
        raise RequestLimitError(
            f"'{name}' holds {size:,} bytes of image data, more than max_request_bytes={limits.max_request_bytes:,}"
        )
    return [open_image(item, f"{name}[{i}]", limits) for i, item in enumerate(items)]


def check_patches(
    patches: Sequence[int], where: Sequence[str], channels: int, pooled: bool, limits: RequestLimits = DEFAULT_LIMITS
) -> None:
    """Refuse, before decoding, an image whose `patches` (from the processor's `patch_grid` of its header size) do not
    fit one forward, and a response of more than `max_response_values` numbers."""
    for n, name in zip(patches, where):
        if n > limits.max_patches_per_batch:
            raise RequestLimitError(
                f"{name}: its {n} patches do not fit one forward (max_patches_per_batch={limits.max_patches_per_batch})"
            )
    values = channels * (len(patches) if pooled else sum(patches))
    if values > limits.max_response_values:
        raise RequestLimitError(
            f"the response would hold {values:,} numbers ({len(patches)} images), more than max_response_values="
            f"{limits.max_response_values:,}; send fewer or smaller images, or ask for pooled features"
        )


def _string_keys(mapping: dict, what: str) -> None:
    bad = [key for key in mapping if not isinstance(key, str)]
    if bad:
        raise ValueError(f"{what} keys must be strings, got {bad[0]!r} ({type(bad[0]).__name__})")


def pipeline_kwargs(parameters: Any, limits: RequestLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """The request's `parameters` -> the pipeline's keyword arguments (values are checked by the pipeline); a forward
    never holds more than `limits.max_patches_per_batch` patches, whatever `batch_size` asks for."""
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise ValueError(f"'parameters' must be an object (dict), got {type(parameters).__name__}")
    _string_keys(parameters, "'parameters'")
    unknown = sorted(set(parameters) - set(PARAMETERS))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown}; supported: {', '.join(PARAMETERS)}")
    if "grid" in parameters and "return_grid" in parameters:
        raise ValueError("give 'grid' or 'return_grid', not both (they are the same parameter)")
    kwargs = {PARAMETERS[name]: value for name, value in parameters.items()}
    budget = kwargs.get("max_patches_per_batch")
    if isinstance(budget, int) and not isinstance(budget, bool) and budget > limits.max_patches_per_batch:
        raise RequestLimitError(
            f"'max_patches_per_batch' = {budget} is more than this endpoint allows (max_patches_per_batch="
            f"{limits.max_patches_per_batch} patches per forward)"
        )
    if kwargs.get("batch_size") is not None and budget is None:
        kwargs["max_patches_per_batch"] = limits.max_patches_per_batch
    return kwargs


def parse_payload(
    data: Any, limits: RequestLimits = DEFAULT_LIMITS
) -> tuple[Union[PIL.Image.Image, list], dict[str, Any]]:
    """`{"inputs": <image | [images]>, "parameters": {...}}` -> (a PIL image or a list of them, pipeline kwargs).

    The images are opened and their headers checked against `limits`, but not decoded (`decode_pixels`)."""
    if not isinstance(data, dict):
        raise ValueError(f"the payload must be an object (dict) with an 'inputs' key, got {type(data).__name__}")
    _string_keys(data, "payload")
    if "inputs" not in data:
        raise ValueError("the payload has no 'inputs' (an image, or a list of images)")
    unknown = sorted(set(data) - set(PAYLOAD_KEYS))
    if unknown:
        raise ValueError(f"unknown payload key(s) {unknown}; expected {', '.join(PAYLOAD_KEYS)}")
    kwargs = pipeline_kwargs(data.get("parameters"), limits)
    inputs = data["inputs"]
    if isinstance(inputs, (list, tuple)):
        return open_images(inputs, "inputs", limits), kwargs
    return open_image(inputs, "inputs", limits), kwargs


def _decoded_in_turn(images: list, where: Sequence[str], given: Sequence[Any]) -> Iterator[PIL.Image.Image]:
    """Decode `images` one at a time as the pipeline asks for them, and release each one once the pipeline has
    preprocessed it (when it asks for the next): the list forgets it, and an image this handler opened itself is
    closed (its pixels freed). A request's peak memory is one decoded image, not all of them; an image the caller gave
    as a PIL image (`given`) is the caller's, and is not closed."""
    for index, name in enumerate(where):
        image, images[index] = images[index], None
        try:
            yield decode_pixels(image, name)
        finally:
            if image is not given[index]:
                image.close()


class EndpointHandler:
    """Inference Endpoints' custom handler for this repo: image features from the repo's own pipeline.

    Request: `{"inputs": <image | list of images>, "parameters": {...}}`, an image being a base64 string (optionally
    a `data:image/...;base64,` URL), raw bytes, or a PIL image (what the endpoint gives for an image/* request body).
    Parameters: `pool` (the mean over each image's patches), `grid` / `return_grid` (each image's `(h, w, C)` grid),
    `batch_size` and `max_patches_per_batch` (images packed into one forward; results unchanged).
    Response: one image -> `[1][n][C]` (pool: `[1][C]`; grid: `[h][w][C]`) nested lists; a list -> a list of those.
    A bad request raises a ValueError that says what was wrong (and which image). Every request is checked against
    `limits` (default: `RequestLimits.from_env()`) before any image is decoded, and the images are decoded one at a
    time, as the pipeline reaches them.
    """

    def __init__(
        self,
        path: str = "",
        dtype: Optional[torch.dtype] = None,
        device: Optional[Any] = None,
        limits: Optional[RequestLimits] = None,
    ):
        folder = os.path.abspath(path or ".")
        self.limits = limits if limits is not None else RequestLimits.from_env()
        if dtype is None:
            dtype = repo_function(folder, "default_dtype")(device)
        kwargs: dict[str, Any] = {repo_function(folder, "dtype_kwarg")(): dtype}
        if device is not None:
            kwargs["device"] = device
        self.pipeline = transformers.pipeline(model=folder, trust_remote_code=True, **kwargs)

    def __call__(self, data: dict[str, Any]) -> list:
        images, kwargs = parse_payload(data, self.limits)
        given = data["inputs"] if isinstance(data["inputs"], (list, tuple)) else [data["inputs"]]
        if not isinstance(images, list):
            self._check_patches([images], ["inputs"], kwargs)
            return next(self.pipeline(_decoded_in_turn([images], ["inputs"], given), **kwargs))
        where = [f"inputs[{i}]" for i in range(len(images))]
        self._check_patches(images, where, kwargs)
        return list(self.pipeline(_decoded_in_turn(images, where, given), **kwargs))

    def _check_patches(self, images: list, where: list[str], kwargs: dict[str, Any]) -> None:
        """Each image's patch count from its header size (the processor's `patch_grid`), checked before decoding."""
        processor = self.pipeline.image_processor
        patches = []
        for index, image in enumerate(images):
            try:
                patches.append(math.prod(processor.patch_grid(*image.size)))
            except (ValueError, TypeError) as err:  # e.g. an empty PIL image: named as the pipeline names it
                raise processor.with_image_index(err, index) from err
        channels = self.pipeline.model.config.hidden_size
        check_patches(patches, where, channels, kwargs.get("pool") is True, self.limits)
