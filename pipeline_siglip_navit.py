# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""The repo's own `image-feature-extraction` pipeline: images -> per-image features, batches packed NaViT-style.

Remote code, registered through `custom_pipelines` in config.json (transformers resolves it with
`get_class_from_dynamic_module`, on 4.49 and 5.x alike). It owns the pipeline's call: options, grouping images into
packs (at most `batch_size` images and `max_patches_per_batch` patches per forward, in input order) and the output
nesting. Everything about the image <-> pack geometry stays in the image processor (`concatenate_packs`, `unpack`,
`mean_pool`); this file never pads, never recomputes a grid, and imports only torch, transformers and PIL.

It also owns THE dtype rule for loading the repo (`default_dtype(device)`: bf16 where bf16 is fast, fp32 elsewhere,
with the CPU's bf16 detection) and the name of from_pretrained's dtype argument (`dtype_kwarg()`): `handler.py` asks
the repo's own copy of this file for both, and the tools (`siglip_navit_tools.cpu`, `.compat`) delegate to it.
"""

from __future__ import annotations

import collections.abc
import copy
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar, Union

import PIL.Image
import torch
import transformers
from transformers import AutoImageProcessor
from transformers.dynamic_module_utils import custom_object_save
from transformers.image_utils import load_image
from transformers.pipelines.base import Pipeline

T = TypeVar("T")

TASK = "image-feature-extraction"
# config.json's entry that makes `pipeline(TASK, model=repo, trust_remote_code=True)` and `pipeline(model=repo,
# trust_remote_code=True)` (the only entry gives the task, offline) build this class on transformers 4.49 and 5.x.
CUSTOM_PIPELINES = {
    TASK: {"impl": "pipeline_siglip_navit.SiglipNaViTFeatureExtractionPipeline", "pt": ["AutoModel"], "type": "image"}
}

# Keyword arguments `__call__` takes (the packing options are popped before `_sanitize_parameters`).
CALL_PARAMETERS = (
    "batch_size", "max_patches_per_batch", "pool", "return_grid", "return_tensors", "image_processor_kwargs",
    "timeout",
)  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Loading: the one dtype rule
# --------------------------------------------------------------------------------------------------------------
NATIVE_BF16 = "native bf16 (AMX)", "native bf16 (AVX512_BF16)"
EMULATED_BF16 = "no native bf16 (AVX2 or older: bf16 is emulated)"


def _cpuinfo_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_bf16_support() -> str:
    """One of NATIVE_BF16 (AMX first) or EMULATED_BF16, from torch's own CPU probes (Linux flags as fallback).

    CPUs with native bf16 matrix units (AMX, AVX512_BF16) run the tower's Linear layers in bf16 several times faster
    than fp32; on AVX2-only CPUs bf16 is emulated and 4-6x SLOWER."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    flags = _cpuinfo_flags() if amx is None or avx512_bf16 is None else set()
    if (amx() if amx is not None else "amx_bf16" in flags):
        return NATIVE_BF16[0]
    if (avx512_bf16() if avx512_bf16 is not None else "avx512_bf16" in flags):
        return NATIVE_BF16[1]
    return EMULATED_BF16


def default_dtype(device: Union[str, int, torch.device, None] = None) -> torch.dtype:
    """THE dtype to load this repo in on `device`: bf16 where it is fast (CUDA devices that support it, CPUs with
    native bf16), else fp32. None means the device transformers' `pipeline()` picks: cuda:0 when CUDA is available,
    else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device, int) and device < 0:  # transformers' old spelling of the CPU
        device = "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_bf16_support() in NATIVE_BF16 else torch.float32
    return torch.float32


def transformers_major() -> int:
    """The installed transformers' major version (4 or 5: both are supported)."""
    return int(transformers.__version__.split(".")[0])


def dtype_kwarg() -> str:
    """from_pretrained's dtype argument: `dtype=` on transformers 5.x, `torch_dtype=` on 4.x (5.x warns on it)."""
    return "dtype" if transformers_major() >= 5 else "torch_dtype"


# --------------------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------------------
def group_in_order(
    items: Iterable[T], size: Callable[[T], int], max_items: Optional[int], max_size: Optional[int]
) -> Iterator[list[T]]:
    """Consecutive groups of `items` (input order kept, streaming) of at most `max_items` items and at most `max_size`
    total `size`; None means no limit. An item larger than `max_size` on its own is a ValueError naming its index."""
    group: list[T] = []
    total = 0
    for index, item in enumerate(items):
        n = size(item)
        if max_size is not None and n > max_size:
            raise ValueError(
                f"image {index}: its {n} patches do not fit max_patches_per_batch={max_size}; raise the budget "
                "(an image is never split across forwards)."
            )
        full = max_items is not None and len(group) >= max_items
        if group and (full or (max_size is not None and total + n > max_size)):
            yield group
            group, total = [], 0
        group.append(item)
        total += n
    if group:
        yield group


def open_image(source: "str | os.PathLike", timeout: Optional[float] = None) -> PIL.Image.Image:
    """A local file as PIL opens it (the processor then applies BAGEL's RGB rule, exactly as for
    `PIL.Image.open(path)`); anything else (a URL) through transformers' `load_image`, which also converts to RGB
    (alpha dropped, not composited over white) and applies the EXIF orientation. An image above PIL's decompression
    bomb guard is a ValueError (the caller names the image), never a bare `DecompressionBombError`."""
    try:
        if os.path.isfile(source):
            image = PIL.Image.open(source)
            image.load()
            return image
        return load_image(str(source), timeout=timeout)
    except PIL.Image.DecompressionBombError as err:
        raise ValueError(f"the image is too large to decode safely ({err})") from err


def _positive_int_or_none(name: str, value: Any) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer or None, got {value!r}")
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}")
    return value


def _load_image_processor(model: Any) -> Any:
    """The processor saved beside the model. transformers 4.49's `pipeline()` loads image processors only for
    built-in config classes, so ours (remote code from the repo this pipeline came from) is loaded here."""
    name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not name:
        raise ValueError(
            "SiglipNaViTFeatureExtractionPipeline: no image processor given and the model has no name_or_path to "
            "load one from; pass image_processor=AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)."
        )
    revision = getattr(model.config, "_commit_hash", None)
    extra = {"revision": revision} if revision else {}
    return AutoImageProcessor.from_pretrained(name, trust_remote_code=True, **extra)


class SiglipNaViTFeatureExtractionPipeline(Pipeline):
    r"""
    Image feature extraction for SigLIP-NaViT (BAGEL's vision tower), with NaViT packing instead of padding.

    ```python
    >>> from transformers import pipeline
    >>> extractor = pipeline("image-feature-extraction", model=repo, trust_remote_code=True)
    >>> extractor(image)                        # [1][n][C] nested lists, n = h * w patches, row-major
    >>> extractor(image, return_tensors=True)   # a tensor (1, n, C)
    >>> extractor([a, b, c], batch_size=3)      # a list of those, all three images in ONE forward
    >>> extractor(image, pool=True)             # [1][C]: the mean over the image's patches
    >>> extractor(image, return_grid=True)      # [h][w][C]: the patch grid (a tensor (h, w, C) with return_tensors)
    ```

    Inputs: a PIL image, a numpy array or torch tensor (what the image processor takes), a local path (opened with
    PIL as it is: the same result as passing `PIL.Image.open(path)`), a URL (transformers' `load_image`, which
    converts to RGB first), or a list / tuple / generator / torch Dataset of them. A list gives a list of
    per-image results; a generator or Dataset gives an iterator of them.

    Batching is packing: `batch_size=k` puts up to k consecutive images into ONE forward (their patches concatenated,
    `cu_seqlens` keeping the images apart), `max_patches_per_batch=N` also caps each forward's patches (an image is
    never split; one larger than N is a ValueError). With neither set, each image gets its own forward; with only
    `max_patches_per_batch`, the patch budget alone decides. Packing never changes a result: every output equals the
    model's forward on that image alone.

    Pooling: BAGEL's tower has no attention-pooling head (SigLIP's `head` is not part of it), so `pool=True` is a
    plain mean over the image's patch features (of `last_hidden_state`, after the post-layernorm), computed AND
    returned in float32 whatever the model's dtype (the image processor's `mean_pool`: the same numbers as
    `extract_features.py`'s `pooled`).

    Args (per call, or at construction as defaults):
        batch_size (`int`, *optional*): most images per forward.
        max_patches_per_batch (`int`, *optional*): most patches per forward.
        pool (`bool`, defaults to `False`): the mean feature per image, `[1][C]`.
        return_grid (`bool`, defaults to `False`): the `(h, w, C)` patch grid per image (not with `pool`).
        return_tensors (`bool`, defaults to `False`): torch tensors instead of nested lists.
        image_processor_kwargs (`dict`, *optional*): one-call processor settings, e.g. `{"max_pixels": 500_000}`.
        timeout (`float`, *optional*): seconds to wait for an image URL.
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args: Any, max_patches_per_batch: Optional[int] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._max_patches_per_batch = _positive_int_or_none("max_patches_per_batch", max_patches_per_batch)
        _positive_int_or_none("batch_size", self._batch_size)
        if self.image_processor is None:
            self.image_processor = _load_image_processor(self.model)
        if not all(hasattr(self.image_processor, name) for name in ("concatenate_packs", "unpack", "mean_pool")):
            raise TypeError(
                f"SiglipNaViTFeatureExtractionPipeline needs the SiglipNaViTImageProcessor (it packs and unpacks "
                f"images), got {type(self.image_processor).__name__}"
            )

    def save_pretrained(self, save_directory: Union[str, os.PathLike], **kwargs: Any) -> None:
        """As transformers' (the model with its code, the image processor), plus this file and `custom_pipelines`
        in config.json, so that `pipeline(model=save_directory, trust_remote_code=True)` builds this class again."""
        existing = getattr(self.model.config, "custom_pipelines", None) or {}
        self.model.config.custom_pipelines = {**existing, **copy.deepcopy(CUSTOM_PIPELINES)}
        super().save_pretrained(save_directory, **kwargs)
        custom_object_save(self, save_directory)

    # ---- parameters ------------------------------------------------------------------------------------------
    def _sanitize_parameters(
        self,
        image_processor_kwargs: Optional[dict] = None,
        timeout: Optional[float] = None,
        pool: Optional[bool] = None,
        return_grid: Optional[bool] = None,
        return_tensors: Optional[bool] = None,
        **unused: Any,  # what transformers' pipeline() hands every pipeline class (e.g. local_files_only)
    ) -> tuple[dict, dict, dict]:
        preprocess_params: dict[str, Any] = {}
        if image_processor_kwargs is not None:
            if not isinstance(image_processor_kwargs, dict):
                kind = type(image_processor_kwargs).__name__
                raise ValueError(f"`image_processor_kwargs` must be a dict, got {kind}")
            preprocess_params.update(image_processor_kwargs)
        if timeout is not None:
            preprocess_params["timeout"] = timeout
        postprocess_params = {
            name: _flag(name, value)
            for name, value in (("pool", pool), ("return_grid", return_grid), ("return_tensors", return_tensors))
            if value is not None
        }
        return preprocess_params, {}, postprocess_params

    def _packing(self, batch_size: Any, max_patches_per_batch: Any) -> tuple[Optional[int], Optional[int]]:
        """(most images, most patches) per forward for one call: the call's values, else the construction's; one
        image per forward when neither limit is set anywhere."""
        batch_size = _positive_int_or_none("batch_size", batch_size)
        max_patches = _positive_int_or_none("max_patches_per_batch", max_patches_per_batch)
        batch_size = batch_size if batch_size is not None else self._batch_size
        max_patches = max_patches if max_patches is not None else self._max_patches_per_batch
        if batch_size is None and max_patches is None:
            batch_size = 1
        return batch_size, max_patches

    # ---- the call --------------------------------------------------------------------------------------------
    def __call__(self, inputs: Any, **kwargs: Any) -> Any:
        """Features of one image (one result) or of a list / generator / Dataset of images (a list / an iterator of
        results). Keyword arguments: see the class docstring."""
        unknown = sorted(set(kwargs) - set(CALL_PARAMETERS))
        if unknown:
            raise TypeError(
                f"SiglipNaViTFeatureExtractionPipeline got unexpected keyword argument(s) {unknown}; valid: "
                f"{', '.join(CALL_PARAMETERS)}"
            )
        max_images, max_patches = self._packing(
            kwargs.pop("batch_size", None), kwargs.pop("max_patches_per_batch", None)
        )
        preprocess_params, forward_params, postprocess_params = self._sanitize_parameters(**kwargs)
        preprocess_params = {**self._preprocess_params, **preprocess_params}
        forward_params = {**self._forward_params, **forward_params}
        postprocess_params = {**self._postprocess_params, **postprocess_params}
        if postprocess_params.get("pool") and postprocess_params.get("return_grid"):
            raise ValueError("`pool=True` and `return_grid=True` exclude each other: pick one")

        def run(images: Iterable[Any]) -> Iterator[Any]:
            return self._run(images, max_images, max_patches, preprocess_params, forward_params, postprocess_params)

        if isinstance(inputs, (list, tuple)):
            if not inputs:
                raise ValueError("no images given: the list is empty")
            return list(run(inputs))
        if isinstance(inputs, collections.abc.Iterator):
            return run(inputs)
        if isinstance(inputs, torch.utils.data.Dataset):
            return run(inputs[i] for i in range(len(inputs)))
        return next(run([inputs]))

    def _run(
        self,
        images: Iterable[Any],
        max_images: Optional[int],
        max_patches: Optional[int],
        preprocess_params: dict,
        forward_params: dict,
        postprocess_params: dict,
    ) -> Iterator[Any]:
        """Preprocess each image alone, pack consecutive ones into forwards, split each forward's output per image."""
        packs = (self.preprocess(image, index=i, **preprocess_params) for i, image in enumerate(images))
        for group in group_in_order(packs, self._num_patches, max_images, max_patches):
            pack = dict(self.image_processor.concatenate_packs(group))
            for grid_features in self.forward(pack, **forward_params)["grids"]:
                yield self.postprocess(grid_features, **postprocess_params)

    @staticmethod
    def _num_patches(pack: Any) -> int:
        return int(pack["packed_pixel_values"].shape[0])

    # ---- the three steps -------------------------------------------------------------------------------------
    def preprocess(self, image: Any, index: int = 0, timeout: Optional[float] = None, **processor_kwargs: Any) -> Any:
        """One image -> its own pack (torch tensors). `index` (the image's place in the call) names it in errors."""
        try:
            if isinstance(image, (str, os.PathLike)):
                image = open_image(image, timeout)
            return self.image_processor(image, **processor_kwargs)
        except (ValueError, TypeError, OSError) as err:
            # the processor saw this image alone ("image 0"): name it by its place in the call, type and errno kept
            raise self.image_processor.with_image_index(err, index, replaces=0) from err

    def _forward(self, model_inputs: dict) -> dict:
        """One pack of any number of images -> `{"grids": [(h_i, w_i, C), ...]}` (views of the packed output)."""
        outputs = self.model(**model_inputs)
        return {"grids": self.image_processor.unpack(outputs.last_hidden_state, model_inputs["image_grid_hw"])}

    def postprocess(
        self, grid_features: torch.Tensor, pool: bool = False, return_grid: bool = False, return_tensors: bool = False
    ) -> Any:
        """One image's `(h, w, C)` features -> `(1, n, C)`, `(1, C)` float32 (pool) or `(h, w, C)` (return_grid)."""
        h, w, c = grid_features.shape
        if pool:  # the processor's mean: float32, the same numbers as the extractor's `pooled`
            out = self.image_processor.mean_pool(grid_features.reshape(h * w, c), [(h, w)])
        elif return_grid:
            out = grid_features
        else:
            out = grid_features.reshape(1, h * w, c)
        if return_tensors:
            return out.clone()  # its own storage, not a view keeping the whole pack alive
        return out.tolist()


__all__ = [
    "CUSTOM_PIPELINES",
    "EMULATED_BF16",
    "NATIVE_BF16",
    "SiglipNaViTFeatureExtractionPipeline",
    "cpu_bf16_support",
    "default_dtype",
    "dtype_kwarg",
    "group_in_order",
    "open_image",
    "transformers_major",
]
