"""Run the extractor's command with some ranks slowed down from outside (production code has no test hook):

    python -m torch.distributed.run ... tests/extract/_extract_slow_rank_worker.py RANK:SECONDS[,RANK:SECONDS] <args>
    python tests/extract/_extract_slow_rank_worker.py 0:60 <args>

Those ranks sleep that long before each shard they encode (their DataLoader workers already started), then the
extractor's own `main()` runs as `extract_features.py` does. Not a test module (no `test_` prefix)."""

import functools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, as extract_features.py has it

from siglip_navit_tools.extract import run  # noqa: E402
from siglip_navit_tools.extract.cli import main  # noqa: E402


def delays(spec: str) -> dict[int, float]:
    """`"1:2.5,3:1"` -> {1: 2.5, 3: 1.0}."""
    return {int(rank): float(seconds) for rank, seconds in (item.split(":") for item in spec.split(",") if item)}


def slowed(encode_shard, seconds: float):
    @functools.wraps(encode_shard)
    def wrapper(*args, **kwargs):
        time.sleep(seconds)
        return encode_shard(*args, **kwargs)

    return wrapper


if __name__ == "__main__":
    spec = sys.argv.pop(1)
    seconds = delays(spec).get(int(os.environ.get("RANK", "0")), 0.0)
    if seconds:
        run.encode_shard = slowed(run.encode_shard, seconds)
    sys.exit(main())
