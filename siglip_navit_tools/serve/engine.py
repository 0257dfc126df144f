# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""The model side of the server: loading, a request's images -> patch counts -> packs, and one packed forward.

Owns the served model and its image processor (loaded as the extractor loads them: `load_model_and_processor`,
`resolve_dtype` for --dtype auto), the request limits (`handler.RequestLimits`, from the options) and what each
image's result is (the pooled float32 vector, or its `(h, w, C)` grid). The request format (base64 / data URL ->
bytes -> header checks -> PIL) is `handler.py`'s, imported through `repo_code`: this module must not decode
requests itself, nor compute a grid, a patch count or a pack boundary (the image processor's `patch_grid`,
`concatenate_packs` and `unpack` do), nor know HTTP.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import PIL.Image
import torch

from .. import repo_code
from ..extract.distributed import pick_device
from ..extract.options import UsageError
from ..extract.pipeline import load_model_and_processor, resolve_dtype
from .batcher import Waiting
from .options import ServeOptions

logger = logging.getLogger(__name__)

OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16}  # /v1/features `dtype`


class BadImage(ValueError):
    """A request image that cannot be used (named in the message, e.g. `input[3]: not an image`)."""


class OverLimit(ValueError):
    """A request over one of the request limits (named in the message)."""


@dataclass
class Prepared:
    """One image, preprocessed: its own pack, and what its result should be."""

    pack: Any  # the image processor's output for this image alone
    output: str  # "pooled", or a key of OUTPUT_DTYPES: the (h, w, C) grid in that dtype


@dataclass
class RequestImages:
    """A request's images, opened (headers read and checked) but not decoded, with their patch grids."""

    images: list  # PIL images, lazily opened
    where: list[str]  # "input[i]": how errors name each image
    grids: list[tuple[int, int]]  # (h, w) patch grids, from the header sizes (the processor's patch_grid)

    @property
    def patches(self) -> list[int]:
        return [h * w for h, w in self.grids]

    def hand_over(self) -> list:
        """The images, forgotten here: whoever prepares one holds it until it is preprocessed, and no longer (a
        request's decoded images must not all stay alive until its response is built)."""
        images, self.images = self.images, [None] * len(self.images)
        return images


class Engine:
    """The served model, its processor and the request limits."""

    def __init__(self, model: torch.nn.Module, processor: Any, options: ServeOptions, device: torch.device):
        self.model, self.processor, self.device = model, processor, device
        self.request_format = repo_code.handler()
        self.limits = options.request_limits()
        self.name = options.model_name()
        self.hidden_size = int(model.config.hidden_size)
        largest = processor.max_patches_per_image()
        if largest is not None and largest > options.max_patches_per_batch:
            raise UsageError(
                f"--max-patches-per-batch {options.max_patches_per_batch} cannot hold the largest image this model's "
                f"processor makes ({largest} patches); raise it"
            )

    @classmethod
    def load(cls, options: ServeOptions) -> "Engine":
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # a server logs lines, not progress bars
        device = _device(options.device)
        dtype, why = resolve_dtype(options.dtype, device)
        logger.info("%s", why)
        model, processor = load_model_and_processor(
            options.model, device, dtype=dtype, attn_implementation=options.attn_implementation,
            revision=options.revision, trust_remote_code=options.trust_remote_code,
        )  # fmt: skip
        return cls(model, processor, options, device)

    # ---- the request side (worker threads) ----------------------------------------------------------------------
    def open_images(self, inputs: Sequence[Any], pooled: bool) -> RequestImages:
        """Open a request's images (the count, bytes and pixel limits first), their patch grids from the header
        sizes, and the per-forward and response-size limits; nothing is decoded."""
        fmt = self.request_format
        try:
            images = fmt.open_images(inputs, "input", self.limits)
        except fmt.RequestLimitError as err:
            raise OverLimit(str(err)) from err
        except ValueError as err:
            raise BadImage(str(err)) from err
        where = [f"input[{i}]" for i in range(len(images))]
        grids = []
        for image, name in zip(images, where):
            try:
                grids.append(tuple(self.processor.patch_grid(*image.size)))
            except (ValueError, TypeError) as err:
                raise BadImage(f"{name}: {_without_image_prefix(err)}") from err
        try:
            fmt.check_patches([h * w for h, w in grids], where, self.hidden_size, pooled, self.limits)
        except ValueError as err:
            raise OverLimit(str(err)) from err
        return RequestImages(images, where, grids)

    def prepare(self, image: PIL.Image.Image, where: str, grid: tuple[int, int], output: str) -> Prepared:
        """Decode one image and preprocess it into its own pack (on a worker thread, one image at a time); the image
        is closed afterwards, so its decoded pixels are freed as soon as its pack exists (not when its request ends)."""
        try:
            pack = self._pack(image, where)
        finally:
            image.close()
        got = tuple(int(v) for v in pack["image_grid_hw"][0])
        if got != tuple(grid):  # the header promised another size than the data holds
            raise BadImage(f"{where}: the image header says a {grid} patch grid, the decoded image gives {got}")
        return Prepared(pack, output)

    def _pack(self, image: PIL.Image.Image, where: str) -> Any:
        """Decode + preprocess; a bad image is BadImage, one over a limit OverLimit (both named by `where`)."""
        try:
            decoded = self.request_format.decode_pixels(image, where)
        except self.request_format.RequestLimitError as err:
            raise OverLimit(str(err)) from err
        except ValueError as err:
            raise BadImage(str(err)) from err
        try:
            return self.processor(decoded)
        except (ValueError, TypeError, OSError) as err:
            raise BadImage(f"{where}: {_without_image_prefix(err)}") from err

    # ---- the model thread ---------------------------------------------------------------------------------------
    def forward(self, items: list[Waiting]) -> list[torch.Tensor]:
        """One packed forward over the items' images -> each item's result, on the CPU."""
        pack = self.processor.concatenate_packs([item.payload.pack for item in items])
        device = self.device
        inputs = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in pack.items()}
        with torch.inference_mode():
            hidden = self.model(**inputs).last_hidden_state
        grids = self.processor.unpack(hidden, pack["image_grid_hw"])
        pooled = None
        if any(item.payload.output == "pooled" for item in items):  # the processor's float32 mean, as the pipeline's
            pooled = self.processor.mean_pool(hidden, pack["image_grid_hw"]).cpu()
        return [
            pooled[i] if item.payload.output == "pooled"
            else grid.to(device="cpu", dtype=OUTPUT_DTYPES[item.payload.output], copy=True)  # not a view of the pack
            for i, (grid, item) in enumerate(zip(grids, items))
        ]

    def warm_up(self) -> None:
        """One forward on a small gray image (the first forward allocates; no request should pay for it)."""
        image = PIL.Image.fromarray(np.full((64, 64, 3), 128, dtype=np.uint8))
        grid = tuple(self.processor.patch_grid(64, 64))
        prepared = Prepared(self.processor(image), "pooled")
        self.forward([Waiting(ticket=None, index=0, patches=math.prod(grid), payload=prepared, arrived=0.0)])


def _device(name: Optional[str]) -> torch.device:
    """--device -> a cpu or cuda device this machine has (the extractor's rule, `distributed.pick_device`: None is
    cuda when available, else cpu)."""
    device = pick_device(name)
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: the server runs on cpu or cuda devices")
    return device


def _without_image_prefix(err: Exception) -> str:
    """The image processor names an image it got alone "image 0: "; the server names it by its place in the request."""
    text = str(err)
    return text[len("image 0: "):] if text.startswith("image 0: ") else text
