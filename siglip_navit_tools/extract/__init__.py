# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Token-budget packed feature extraction into resumable shards (`extract_features.py`'s library).

    options        ExtractOptions (every knob, one comment each) and UsageError
    packing        plan_batches / plan_windows: the pure first-fit-decreasing packers
    inputs         the source interface; --input -> a source (files, datasets); the bad-image policy
    tar_input      webdataset tar shards as a source (one tar per shard, streamed; webdataset's key rule)
    parquet_input  parquet image columns as a source (one file per shard, a row group at a time)
    pipeline       model + processor loading, the DataLoader of packs, the encode loop (processor.unpack)
    writers        the output formats (safetensors, parquet, npy): one writer interface, shard files read back
    shards         the manifest (rebuilt from the shards when lost), the run's plan and fingerprint, resume
    lock           the output lock (held by the main process alone: never by forked DataLoader workers)
    distributed    torchrun helpers (rank, device, collectives that are no-ops on one process, shard claims)
    run            extract(options) -> summary: the steps above, in order
    cli            argparse -> ExtractOptions -> extract(), errors -> exit codes

Must not import argparse outside `cli`, nor re-derive any image <-> pack geometry (the image processor owns it).
"""

from .options import ExtractOptions, UsageError
from .packing import plan_batches
from .run import extract

__all__ = ["ExtractOptions", "UsageError", "extract", "plan_batches"]
