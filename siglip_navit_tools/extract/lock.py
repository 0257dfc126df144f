# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""The output folder's lock: one run at a time per --output, and the lock dies with the process that took it.

The lock itself is the tools' one implementation (`siglip_navit_tools.io.lock`: an flock on `output/.lock`, never
held by forked DataLoader workers, freed by the kernel at once after `kill -9`; the file stays, so a waiter and the
holder share one inode). This module words its failures for the extractor: another run holds it, `.lock` is not a
regular file, or the folder cannot be written. Must not know what the folder holds (shards.py does).
"""

from __future__ import annotations

from pathlib import Path

from ..io.atomic import describe_os_error
from ..io.files import NotARegularFile
from ..io.lock import FileLock, LockBusy
from .options import UsageError

LOCK = ".lock"


class OutputLock(FileLock):
    """An exclusive lock on `output/.lock` (the folder is created when missing), held by this process alone until
    `release()` or the process's end; every failure is a UsageError naming --output."""

    def __init__(self, output: Path):
        where = f"--output {str(output)!r}"
        try:
            output.mkdir(parents=True, exist_ok=True)
            super().__init__(output / LOCK)
        except LockBusy as exc:
            raise UsageError(f"{where} is in use by another extract_features.py run") from exc
        except NotARegularFile as exc:
            raise UsageError(
                f"{where}: its lock file {LOCK} is {exc.kind or 'not a regular file'}, not a regular file (no run of "
                f"this tool makes that); remove {output / LOCK} or choose another --output"
            ) from None
        except OSError as exc:
            raise UsageError(
                f"{where} cannot be written ({describe_os_error(exc)}: {exc.filename or output}); choose an --output "
                "on a writable file system that you may write to"
            ) from None


def lock_output(output: Path) -> OutputLock:
    """Rank 0 holds an exclusive lock on `output` for the whole run: a second run into the same folder is refused
    (UsageError "in use") instead of deleting the first one's temporary files."""
    return OutputLock(output)
