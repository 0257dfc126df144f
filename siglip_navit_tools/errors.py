# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""The tools' user-facing error types: the bottom of the stack, so every layer can raise them.

Owns `ToolError` (a message meant for the user, printed as one paragraph, with its own exit code) and the two
commands' kinds of it (`ConversionError`, exit 1; `UsageError`, exit 2). Must not import anything of the package:
io, convert, extract and cli all import from here, never the other way round.
"""

from __future__ import annotations


class ToolError(Exception):
    """A failure with a message meant for the user, printed as one paragraph; the process exits with `exit_code`."""

    exit_code = 1


class ConversionError(ToolError):
    """A conversion failure with a message meant for the user (printed as one paragraph, exit status 1)."""


class UsageError(ToolError):
    """Bad arguments or a bad output folder: reported in one line, exit code 2."""

    exit_code = 2


__all__ = ["ConversionError", "ToolError", "UsageError"]
