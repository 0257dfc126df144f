# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""The wire format: OpenAI's embeddings request / response / error shapes, and the native /v1/features shapes.

Owns parsing a JSON body into a checked request (`parse_embeddings`, `parse_features`: a 400 naming the field for
anything else), building the response bodies, and the error body (`ApiError`: `{"error": {"message", "type",
"param", "code"}}`, what the `openai` client reads). Must not decode images (handler.py's request format does) nor
run anything: pure functions over dicts and tensors.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

EMBEDDINGS_FIELDS = ("model", "input", "encoding_format", "user")  # `dimensions` etc. cannot be honoured: a 400
FEATURES_FIELDS = ("model", "input", "pool", "dtype")
ENCODING_FORMATS = ("float", "base64")
FEATURE_DTYPES = ("float32", "float16")


class ApiError(Exception):
    """An error answered in OpenAI's shape, with its HTTP status (and headers, e.g. Retry-After)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        param: Optional[str] = None,
        code: Optional[str] = None,
        headers: Optional[dict[str, str]] = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class EmbeddingsRequest:
    model: str
    inputs: list  # image strings: base64 or data: URLs (checked by the request format)
    encoding_format: str  # "float" or "base64"
    user: Optional[str]


@dataclass
class FeaturesRequest:
    model: str
    inputs: list
    pool: bool  # the pooled vector instead of the (h, w, C) grid
    dtype: str  # "float32" or "float16"


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as err:  # not UTF-8, not JSON, or nested deeper than the parser goes
        raise bad_request(f"the request body is not valid JSON ({type(err).__name__}: {err})"[:300],
                          code="invalid_json") from err  # fmt: skip


def _object(data: Any, fields: Sequence[str], endpoint: str) -> dict:
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise bad_request(
            f"{endpoint} does not support the field(s) {unknown}; supported: {', '.join(fields)}",
            param=unknown[0],
            code="unsupported_parameter",
        )
    return data


def _model(data: dict) -> str:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' must name the served model (see GET /v1/models)", param="model")
    return model


def _inputs(data: dict) -> list:
    """`input`: one image string or a list of them (each checked here to be a string; its content later)."""
    if "input" not in data:
        raise bad_request("'input' is missing: give an image (a base64 string or data: URL) or a list of them", "input")
    inputs = data["input"]
    if isinstance(inputs, str):
        return [inputs]
    if not isinstance(inputs, list):
        raise bad_request(f"'input' must be a string or a list of strings, got {type(inputs).__name__}", "input")
    if not inputs:
        raise bad_request("'input' is an empty list; send at least one image", "input")
    for i, item in enumerate(inputs):
        if not isinstance(item, str):
            raise bad_request(
                f"input[{i}]: expected an image as a base64 string or a data:image/...;base64, URL, got "
                f"{type(item).__name__}",
                "input",
            )
    return inputs


def _choice(data: dict, name: str, allowed: Sequence[str], default: str) -> str:
    value = data.get(name, default)
    if value is None:
        return default
    if value not in allowed:
        raise bad_request(f"'{name}' must be one of {list(allowed)}, got {value!r}", param=name)
    return value


def parse_embeddings(data: Any) -> EmbeddingsRequest:
    """The body of POST /v1/embeddings (OpenAI's fields; `dimensions` and other unknown fields are refused)."""
    data = _object(data, EMBEDDINGS_FIELDS, "/v1/embeddings")
    user = data.get("user")
    if user is not None and not isinstance(user, str):
        raise bad_request(f"'user' must be a string, got {type(user).__name__}", param="user")
    encoding = _choice(data, "encoding_format", ENCODING_FORMATS, "float")
    return EmbeddingsRequest(_model(data), _inputs(data), encoding, user)


def parse_features(data: Any) -> FeaturesRequest:
    """The body of POST /v1/features."""
    data = _object(data, FEATURES_FIELDS, "/v1/features")
    pool = data.get("pool")
    if pool is None:  # null means the default, as for `dtype`
        pool = False
    if not isinstance(pool, bool):
        raise bad_request(f"'pool' must be true or false, got {pool!r}", param="pool")
    dtype = _choice(data, "dtype", FEATURE_DTYPES, "float32")
    return FeaturesRequest(_model(data), _inputs(data), pool, dtype)


def little_endian_base64(tensor: torch.Tensor) -> str:
    """A CPU tensor's values as little-endian bytes (its dtype), in base64: what OpenAI's base64 encoding sends."""
    array = tensor.contiguous().numpy()
    return base64.b64encode(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()).decode("ascii")


def embeddings_body(vectors: Sequence[torch.Tensor], model: str, patches: int, encoding_format: str) -> bytes:
    """OpenAI's embeddings response: float32 vectors as JSON numbers, or as base64 little-endian float32."""
    data = []
    for index, vector in enumerate(vectors):
        vector = vector.to(torch.float32)
        embedding = little_endian_base64(vector) if encoding_format == "base64" else vector.tolist()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    usage = {"prompt_tokens": patches, "total_tokens": patches}
    return json.dumps({"object": "list", "data": data, "model": model, "usage": usage}).encode()


def features_body(
    results: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]], model: str, patches: int, dtype: str
) -> bytes:
    """/v1/features' response: per image its grid, dtype, shape and features (base64 little-endian bytes)."""
    data = [
        {
            "object": "features",
            "index": index,
            "grid_hw": [int(h), int(w)],
            "dtype": dtype,
            "shape": list(result.shape),
            "features": little_endian_base64(result.to(torch.float16 if dtype == "float16" else torch.float32)),
        }
        for index, (result, (h, w)) in enumerate(zip(results, grids))
    ]
    usage = {"prompt_tokens": patches, "total_tokens": patches}
    return json.dumps({"object": "list", "data": data, "model": model, "usage": usage}).encode()


def models_body(model: str, created: Optional[int] = None) -> dict:
    """OpenAI's model list: the one served model."""
    entry = {"id": model, "object": "model", "created": int(created or time.time()), "owned_by": "siglip-navit"}
    return {"object": "list", "data": [entry]}
