# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""The `extract_features.py` / `siglip-navit-extract` command: argparse -> ExtractOptions -> `extract()`.

Owns the flags (names, help, defaults shown from ExtractOptions) and main(): errors -> exit codes through the
tools' shared skeleton (`siglip_navit_tools.cli.run_main`: UsageError 2, Ctrl-C / SIGTERM 130), the log format,
and leaving the process group at the end. Must not hold extraction logic: everything testable is in the library.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from .. import cli
from . import distributed
from .options import ATTN_IMPLEMENTATIONS, DEFAULT_SHARD_SIZE, DTYPE_CHOICES, FORMATS, ExtractOptions
from .run import extract

PROG = "extract_features.py"
_DEFAULTS = ExtractOptions(model="", input="", output="")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The flags; `prog` is the name the command was called by (`siglip-navit-extract` or `extract_features.py`).
    Each help text states its own default, once (argparse's ArgumentDefaultsHelpFormatter would repeat them)."""
    d = _DEFAULTS
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Encode images with SigLIP-NaViT into safetensors, parquet or npy shards (token-budget packing, "
        "data parallel, resumable).",
    )
    add = parser.add_argument
    add("--model", required=True, help="model folder or Hub repo (SiglipVisionModel + its image processor)")
    add("--input", required=True,
        help="image folder, glob (quote it), .txt list of paths, `datasets` folder or Hub id; webdataset .tar shards "
        "or parquet files: one, a glob, a brace range (\"shards/{00000..00099}.tar\"), a list, a folder, fsspec URLs")  # fmt: skip
    add("--output", required=True, help="output folder (manifest.json + shards)")
    add("--format", choices=list(FORMATS), default=d.format,
        help="safetensors: shard-*.safetensors; parquet: shard-*.parquet (id, pooled, grid_h, grid_w[, features]); "
        "npy: embeddings/*.npy + metadata/*.parquet (autofaiss / clip-retrieval layout; default: %(default)s)")  # fmt: skip
    add("--max-patches-per-batch", type=int, default=d.max_patches_per_batch,
        help="token budget of one forward (default: %(default)s)")  # fmt: skip
    add("--save-grids", action="store_true", help="also save each image's (h, w, C) feature map")
    add("--dtype", choices=list(DTYPE_CHOICES), default=d.dtype,
        help="model dtype; auto: bfloat16 on CUDA (if supported) and on CPUs with native bf16 (AMX / AVX512_BF16), "
        "float32 elsewhere (the choice is logged and recorded in the manifest) (default: %(default)s)")  # fmt: skip
    add("--device", default=d.device, help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    add("--attn-implementation", default=d.attn_implementation, choices=list(ATTN_IMPLEMENTATIONS),
        help="attention backend (default: %(default)s)")  # fmt: skip
    add("--shard-size", type=int, default=d.shard_size,
        help=f"images per shard (default: inputs/ranks, max {DEFAULT_SHARD_SIZE}; tar / parquet input: one file per "
        "shard)")  # fmt: skip
    add("--num-workers", type=int, default=d.num_workers,
        help="DataLoader workers decoding images, per process (default: %(default)s)")  # fmt: skip
    add("--split", default=None, help="dataset split (datasets input)")
    add("--dataset-config", default=None, help="dataset configuration name (Hub dataset input)")
    add("--image-column", default=None, help="image column of a dataset or parquet files (default: the first one)")
    add("--image-key", default=d.image_key,
        help="tar input: a sample's image is its first entry among these extensions (webdataset's ';' convention; "
        "default: %(default)s)")  # fmt: skip
    add("--lookahead", type=int, default=d.lookahead,
        help="tar / parquet input: images read ahead and packed together (their encoded bytes are held; default: "
        "%(default)s)")  # fmt: skip
    add("--revision", default=None, help="model revision (branch, tag or commit) on the Hub")
    add("--trust-remote-code", action="store_true", help="run the code of --model's repo (default: ours)")
    add("--dist-timeout-minutes", type=float, default=d.dist_timeout_minutes,
        help="how long ranks wait for each other (start, end) under torchrun (default: %(default)s)")  # fmt: skip
    add("--overwrite", action="store_true", help="replace a different run's results in --output")
    add("--no-progress", action="store_true", help="no progress bars")
    return parser


def options_from_args(args: argparse.Namespace) -> ExtractOptions:
    fields = {name: value for name, value in vars(args).items() if name != "no_progress"}
    return ExtractOptions(**fields, progress=not args.no_progress)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; returns the exit status. Called with no `argv` (a real command line: this process is the
    command's own) it also turns SIGTERM, what torchrun sends its workers on Ctrl-C, into Ctrl-C."""
    prog = cli.command_name(argv, PROG)
    options = options_from_args(build_parser(prog).parse_args(argv))
    if argv is None:
        cli.install_sigterm_handler()
    cli.setup_logging(f"[rank {os.environ.get('RANK', '0')}] %(levelname)s %(message)s")

    def body() -> int:
        extract(options)
        return 0

    return cli.run_main(
        body,
        error_prefix=f"{prog}: error: ",
        interrupted=f"{prog}: interrupted; finished shards are kept, rerun to resume",
        cleanup=distributed.shutdown,
    )
