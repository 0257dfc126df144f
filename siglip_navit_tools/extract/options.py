# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""The extractor's options: one dataclass a newcomer can read every knob from (errors: `errors.UsageError`).

Owns the defaults and the checks that need nothing but the options themselves (`ExtractOptions.validate`). Must
not parse command lines (the CLI builds the object) nor touch files, models or processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..compat import DTYPES
from ..errors import UsageError

DTYPE_CHOICES = (*sorted(DTYPES), "auto")  # auto: resolved per device at the start of a run (pipeline.resolve_dtype)
ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")
DEFAULT_SHARD_SIZE = 256
DEFAULT_MAX_PATCHES_PER_BATCH = 16384
DEFAULT_LOOKAHEAD = 256
# output formats (writers.WRITERS): today's safetensors shards, parquet shards, autofaiss / clip-retrieval's npy layout
FORMATS = ("safetensors", "parquet", "npy")
DEFAULT_IMAGE_KEY = "jpg;jpeg;png;webp"  # webdataset's `;`-separated choices, the first present wins


@dataclass
class ExtractOptions:
    """What one extraction run encodes, with which model, into which folder, and how."""

    # model folder or Hub repo id (config + weights + preprocessor_config.json)
    model: str
    # image folder, glob, .txt / .lst list of paths, image file, `datasets` save_to_disk folder or Hub dataset id;
    # webdataset .tar shards or parquet files (one, a glob, a brace range, a list, a folder of them; fsspec URLs)
    input: str
    # output folder: manifest.json + shard files
    output: str
    # output format: one of FORMATS (safetensors: shard-*.safetensors; parquet: shard-*.parquet; npy:
    # embeddings/*.npy + metadata/*.parquet)
    format: str = "safetensors"
    # token budget of one forward, in patches (must hold the largest image the processor makes)
    max_patches_per_batch: int = DEFAULT_MAX_PATCHES_PER_BATCH
    # also save each image's (h, w, C) feature map, in the model dtype
    save_grids: bool = False
    # model dtype: a key of DTYPES, or "auto" (bfloat16 on CUDA with bf16 and on CPUs with native bf16, else float32)
    dtype: str = "float32"
    # torch device; None: cuda:LOCAL_RANK when CUDA is available, else cpu
    device: Optional[str] = None
    # attention backend: one of ATTN_IMPLEMENTATIONS
    attn_implementation: str = "sdpa"
    # images per shard; None: inputs / ranks, at most DEFAULT_SHARD_SIZE (a resumed run keeps the first run's)
    shard_size: Optional[int] = None
    # DataLoader workers decoding and preprocessing images, per process (0: in the main process)
    num_workers: int = 2
    # dataset split (datasets input only)
    split: Optional[str] = None
    # dataset configuration name (Hub dataset input)
    dataset_config: Optional[str] = None
    # image column of a dataset or parquet files; None: the first image column
    image_column: Optional[str] = None
    # tar input: a sample's image is its first entry among these extensions (webdataset's `;` convention)
    image_key: str = DEFAULT_IMAGE_KEY
    # tar / parquet input: images read ahead and packed together (first-fit decreasing); their encoded bytes are
    # what a look-ahead holds in memory
    lookahead: int = DEFAULT_LOOKAHEAD
    # model revision (branch, tag or commit) on the Hub
    revision: Optional[str] = None
    # run the code of `model`'s own repo (through the Auto classes) instead of this repo's
    trust_remote_code: bool = False
    # how long ranks wait for each other (start, end) under torchrun, in minutes
    dist_timeout_minutes: float = 360.0
    # replace a different run's results in `output` instead of refusing
    overwrite: bool = False
    # progress bars (shown only on a terminal)
    progress: bool = True

    def validate(self) -> None:
        """Raise UsageError for values no run can use (the checks that need a model or the inputs come later)."""
        for flag, value in (("--model", self.model), ("--input", self.input), ("--output", self.output)):
            if not str(value).strip():  # Path("") is the current directory: never assumed
                raise UsageError(f"{flag} is empty ({value!r}): name it (write . to mean the current directory)")
        if self.max_patches_per_batch <= 0:
            raise UsageError(
                f"--max-patches-per-batch must be a positive number of patches, got {self.max_patches_per_batch}"
            )
        if self.shard_size is not None and self.shard_size <= 0:
            raise UsageError(f"--shard-size must be a positive number of images, got {self.shard_size}")
        if self.num_workers < 0:
            raise UsageError(f"--num-workers must be 0 or more, got {self.num_workers}")
        if self.lookahead <= 0:
            raise UsageError(f"--lookahead must be a positive number of images, got {self.lookahead}")
        if self.format not in FORMATS:
            raise UsageError(f"--format must be one of {list(FORMATS)}, got {self.format!r}")
        if self.format == "npy" and self.save_grids:
            raise UsageError(
                "--format npy holds the pooled vectors only (embeddings/*.npy); to keep each image's (h, w, C) map "
                "too, use --format parquet or safetensors with --save-grids"
            )
        choices = self.image_key.split(";")
        if not all(choices) or any(c != c.strip() or "/" in c for c in choices):
            raise UsageError(
                f"--image-key must be extensions separated by ';' (webdataset's convention, e.g. "
                f"{DEFAULT_IMAGE_KEY!r}), got {self.image_key!r}"
            )
        if self.dtype not in DTYPE_CHOICES:
            raise UsageError(f"--dtype must be one of {list(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise UsageError(
                f"--attn-implementation must be one of {list(ATTN_IMPLEMENTATIONS)}, got {self.attn_implementation!r}"
            )
