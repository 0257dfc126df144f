# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Checkpoint conversion: BAGEL / stock SigLIP / this repo -> a ready SigLIP-NaViT Hub repo (and back to stock).

    options   ConvertOptions (every knob, one comment each), ConversionError, parse_size
    sources   --src -> Source: weight files, every key's file (headers only), format detection, pickle policy
    keymap    map_key: a foreign tensor name -> ours, or why it is dropped (one pure function)
    config    the tower's config: from the source's config file or the tensor shapes, layer checks, rope
    plan      build_plan(source, options): every written tensor, validated before anything is written; shards
    write     the one streaming pass over the source, hashed shard files, side files, read-back verification
    hub       config.json, preprocessor_config.json, the model card (ModelCardData), push_to_hub
    run       convert(options) -> ConvertResult: the steps above, in order
    cli       argparse -> ConvertOptions -> convert(), errors -> exit codes

Must not import argparse outside `cli`, nor re-derive image <-> pack geometry (the image processor owns it).
"""

from .options import ConversionError, ConvertOptions
from .run import ConvertResult, convert

__all__ = ["ConversionError", "ConvertOptions", "ConvertResult", "convert"]
