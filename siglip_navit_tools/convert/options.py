# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""The converter's options: one dataclass a newcomer can read every knob from (errors: `errors.ConversionError`).

Owns the defaults, the normalisation that needs nothing but the options (the BAGEL prefix ends with a dot) and the
equivalent command line the model card shows. Must not parse command lines (the CLI builds the object), nor touch
files, checkpoints or the network.
"""

from __future__ import annotations

import dataclasses
import re
from decimal import Decimal
import shlex
from dataclasses import dataclass
from typing import Optional

from ..compat import DTYPES
from ..errors import ConversionError

PROG = "convert_checkpoint.py"
TARGETS = ("siglip-navit", "stock-siglip")
SOURCE_FORMATS = ("auto", "bagel", "siglip", "siglip-navit")
ROPE_CHOICES = ("auto", "true", "false")
DTYPE_CHOICES = ("keep", *DTYPES)
DEFAULT_VIT_PREFIX = "vit_model."
DEFAULT_MAX_SHARD_SIZE = "5GB"
DEFAULT_READ_CHUNK = "64MiB"
DEFAULT_LICENSE = "apache-2.0"  # BAGEL-7B-MoT and google/siglip-* are both Apache-2.0


@dataclass
class ConvertOptions:
    """What one conversion reads, what it writes, and how."""

    # source: a directory, a file or an fsspec URL (hf://org/repo, file:///..., s3://...)
    src: str
    # output directory (written through a temporary directory beside it, renamed into place when verified)
    out: str
    # output layout: "siglip-navit" (this repo's, remote code) or "stock-siglip" (plain transformers)
    to: str = "siglip-navit"
    # source layout: "auto" (detected from the tensor names) or one of SOURCE_FORMATS
    source_format: str = "auto"
    # the source's config when it is not beside the weights (BAGEL: vit_config.json, SigLIP: config.json)
    config: Optional[str] = None
    # key prefix of the ViT in a BAGEL checkpoint (a trailing "." is added when missing)
    vit_prefix: str = DEFAULT_VIT_PREFIX
    # rotary or learned positions: "auto" (from the keys: a stored position table means rope=False, none means
    # rope=True, e.g. BAGEL trained with --vit_rope True), "true" or "false" (must agree with the keys)
    rope: str = "auto"
    # keep only the first N encoder layers; None: every stored layer
    num_hidden_layers: Optional[int] = None
    # dtype of the written weights: "keep" (the source's) or a key of DTYPES
    dtype: str = "keep"
    # shard model.safetensors above this size: "5GB" (10**9), "2GiB" (2**30), or a number of bytes
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE
    # accept .bin / .pt pickle sources (loaded only with torch.load(weights_only=True))
    allow_pickle: bool = False
    # replace an existing non-empty `out` (only after the new checkpoint has been written and verified)
    force: bool = False
    # validate and print what would be written; write nothing
    dry_run: bool = False
    # license of the source weights for the model card; None: the source card's, else DEFAULT_LICENSE
    license: Optional[str] = None
    # base_model for the model card; None: derived from the source
    base_model: Optional[str] = None
    # upload the output to this Hub model repo id
    push_to_hub: Optional[str] = None
    # create that Hub repo as private
    private: bool = False
    # branch to upload to (created when missing); None: the default branch
    revision: Optional[str] = None
    # largest single read from the source (same units as max_shard_size)
    read_chunk_size: str | int = DEFAULT_READ_CHUNK
    # show a progress bar while converting
    progress: bool = True
    # print nothing but errors
    quiet: bool = False
    # the command shown in the model card's "How it was converted"; empty: the equivalent of these options
    command: str = ""

    def __post_init__(self) -> None:
        if self.vit_prefix and not self.vit_prefix.endswith("."):
            self.vit_prefix += "."

    def command_line(self) -> str:
        """`command`, or the command line that gives these options (only the flags that differ from the defaults)."""
        if self.command:
            return self.command
        words = [PROG, "--src", self.src, "--out", self.out]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("src", "out", "command", "progress", "quiet") or value == f.default:
                continue
            flag = "--" + f.name.replace("_", "-")
            words += [flag] if value is True else [flag, str(value)]
        words += ["--no-progress"] * (not self.progress) + ["--quiet"] * self.quiet
        return "python " + shlex.join(words)


PATH_HINTS = {"--src": "the checkpoint to convert", "--out": "the folder to write", "--config": "the source's config"}


def nonblank_path(text: str, flag: str) -> str:
    """A path option as given; an empty or blank one is refused (`Path("")` would silently be the current
    directory: converted from, or replaced with --force)."""
    if not str(text).strip():
        raise ConversionError(
            f"{flag} is empty ({str(text)!r}): name {PATH_HINTS.get(flag, 'a path')} (the current directory is "
            "never assumed; write . to mean it)."
        )
    return text


MAX_SIZE = 2**60  # 1 EiB: above any real size; a larger number is a typo (and would overflow the arithmetic)
READ_CHUNK_BOUNDS = (2**10, 2**34)  # 1 KiB .. 16 GiB: smaller would make millions of reads, larger is all memory


def parse_size(text: str | int, flag: str = "--max-shard-size", bounds: tuple[int, int] = (1, MAX_SIZE)) -> int:
    """'5GB' (10**9), '500MiB' (2**20), '10KB', or a plain number of bytes, within `bounds` (inclusive); `flag` names
    the option in errors. (huggingface_hub's parse_size_to_int knows only the decimal units, and the 2**n ones are
    documented flags.)"""
    low, high = bounds
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        size = _size_of_text(str(text), flag)
    if size <= 0:
        raise ConversionError(f"{flag} {text!r} must be positive: choose {low} to {high} bytes.")
    if not low <= size <= high:
        raise ConversionError(f"{flag} {text!r} is out of range: choose {low} to {high} bytes.")
    return size


def _size_of_text(text: str, flag: str) -> int:
    m = re.fullmatch(r"\s*(-?\d{1,30}(?:\.\d{1,30})?)\s*([KMGT]?i?B?)?\s*", text, re.I)
    if not m:
        raise ConversionError(f"{flag} {text[:100]!r}: use e.g. 5GB, 500MB, 2GiB or a number of bytes.")
    unit = (m.group(2) or "").upper()
    scale = {"": 1, "B": 1}
    for i, p in enumerate("KMGT", start=1):
        scale[p] = scale[p + "B"] = 1000**i
        scale[p + "I"] = scale[p + "IB"] = 1024**i
    if unit not in scale:
        raise ConversionError(f"{flag} {text!r}: unknown unit {m.group(2)!r}.")
    return int(Decimal(m.group(1)) * scale[unit])
