# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""The `convert_checkpoint.py` / `siglip-navit-convert` command: argparse -> ConvertOptions -> `convert()`.

Owns the flags (names, help, defaults shown from ConvertOptions) and main(): errors -> exit codes through the
tools' shared skeleton (`siglip_navit_tools.cli.run_main`: ConversionError 1 as "error: ...", Ctrl-C / SIGTERM 130,
anything unexpected one paragraph unless --debug). Must not hold conversion logic: everything testable is in the
library.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Optional, Sequence

from .. import cli
from .options import DEFAULT_LICENSE, DTYPE_CHOICES, PROG, ROPE_CHOICES, SOURCE_FORMATS, TARGETS, ConvertOptions
from .run import convert

_D = ConvertOptions(src="", out="")
EXAMPLES = """examples:
  {run} --src /path/to/BAGEL-7B-MoT --out siglip-navit-bagel
  {run} --src hf://ByteDance-Seed/BAGEL-7B-MoT --out siglip-navit-bagel
  {run} --src /path/to/siglip-so400m-patch14-384 --out siglip-navit-so400m
  {run} --src siglip-navit-bagel --out siglip-stock --to stock-siglip
  {run} --src ... --out DIR --push-to-hub you/siglip-navit-bagel --private"""


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The flags; `prog` is the name the command was called by (`siglip-navit-convert` or `convert_checkpoint.py`)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Convert a BAGEL or stock SigLIP checkpoint into a ready SigLIP-NaViT Hub repo (streaming), or "
        "export one back to a stock transformers SiglipVisionModel.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES.format(run=cli.how_to_run(prog)),
    )
    add = p.add_argument
    add("--src", required=True, help="source directory, file, or fsspec URL (e.g. hf://ByteDance-Seed/BAGEL-7B-MoT)")
    add("--out", required=True, help="output directory (written via a temporary directory beside it)")
    add("--to", choices=TARGETS, default=_D.to,
        help="output layout: this repo's (remote code; default) or a plain transformers SiglipVisionModel")
    add("--source-format", choices=SOURCE_FORMATS, default=_D.source_format,
        help="override the detected source format (default: auto)")
    add("--config", help="the source's config (BAGEL: vit_config.json, SigLIP: config.json) when it is not beside "
        "the weights")
    add("--vit-prefix", default=_D.vit_prefix,
        help=f"key prefix of the ViT in a BAGEL checkpoint (default: {_D.vit_prefix})")
    add("--rope", choices=ROPE_CHOICES, default=_D.rope,
        help="rotary (true) or learned (false) positions; auto (default): from the keys, a stored position table "
        "means false, none means true (BAGEL trained with --vit_rope True). true/false must agree with the keys")
    add("--num-hidden-layers", type=int, help="keep only the first N encoder layers")
    add("--dtype", choices=DTYPE_CHOICES, default=_D.dtype,
        help="dtype of the written weights (default: keep the source's)")
    add("--max-shard-size", default=_D.max_shard_size,
        help=f"shard model.safetensors above this size, e.g. 5GB, 500MB, 2GiB (default: {_D.max_shard_size})")
    add("--allow-pickle", action="store_true",
        help="accept .bin/.pt pickle sources (loaded only with torch.load(weights_only=True))")
    add("--force", action="store_true", help="replace an existing non-empty --out")
    add("--dry-run", action="store_true", help="validate and list what would be written; write nothing")
    add("--license",
        help=f"license of the source weights for the model card (default: the source's, else {DEFAULT_LICENSE})")
    add("--base-model", help="base_model for the model card (default: derived from the source)")
    add("--push-to-hub", metavar="REPO_ID", help="upload the output to this Hub model repo")
    add("--private", action="store_true", help="create the Hub repo as private (with --push-to-hub)")
    add("--revision", help="branch to upload to (with --push-to-hub; created if missing)")
    add("--read-chunk-size", default=_D.read_chunk_size,
        help=f"largest single read from the source (default: {_D.read_chunk_size})")
    add("--no-progress", action="store_true", help="no progress bar")
    add("--quiet", action="store_true", help="only errors")
    add("--debug", action="store_true", help="show tracebacks of unexpected errors")
    return p  # fmt: skip


def options_from_args(args: argparse.Namespace, argv: Sequence[str], prog: str = PROG) -> ConvertOptions:
    fields = {k: v for k, v in vars(args).items() if k not in ("no_progress", "debug")}
    command = f"{cli.how_to_run(prog)} {shlex.join(argv)}"  # what the model card shows
    return ConvertOptions(**fields, progress=not args.no_progress, command=command)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; returns the exit status. Called with no `argv` (a real command line: this process is the
    command's own) it also turns SIGTERM into Ctrl-C, so that an interrupted run leaves no temporary behind."""
    prog = cli.command_name(argv, PROG)
    if argv is None:
        cli.install_sigterm_handler()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if (args.private or args.revision) and not args.push_to_hub:
        parser.error("--private and --revision only apply with --push-to-hub")
    options = options_from_args(args, argv, prog)

    def body() -> int:
        convert(options)
        return 0

    return cli.run_main(
        body,
        error_prefix="error: ",
        interrupted="error: interrupted; nothing was written to the target (the temporary directory was removed).",
        unexpected="Nothing was written to the target. Re-run with --debug for the traceback.",
        debug=args.debug,
    )
