# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Token-budget packed feature extraction into resumable safetensors shards (`extract_features.py`'s library).

    options      ExtractOptions (every knob, one comment each) and UsageError
    packing      plan_batches: the pure first-fit-decreasing packer
    inputs       --input -> ids, image sizes and decoded images (files, datasets); the bad-image policy
    pipeline     model + processor loading, the DataLoader of packs, the encode loop (processor.unpack)
    shards       shard files, the manifest (rebuilt from the shards when lost), the run's plan and fingerprint
    lock         the output lock (held by the main process alone: never by forked DataLoader workers)
    distributed  torchrun helpers (rank, device, collectives that are no-ops on one process, shard claims)
    run          extract(options) -> summary: the steps above, in order
    cli          argparse -> ExtractOptions -> extract(), errors -> exit codes

Must not import argparse outside `cli`, nor re-derive any image <-> pack geometry (the image processor owns it).
"""

from .options import ExtractOptions, UsageError
from .packing import plan_batches
from .run import extract

__all__ = ["ExtractOptions", "UsageError", "extract", "plan_batches"]
