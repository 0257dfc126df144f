# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""What kind of CPU this is, for benchmark headers and `--dtype auto`'s explanation.

The rule itself (bf16 where it is fast, with the CPU's bf16 detection) is remote code: `pipeline_siglip_navit`'s
`default_dtype` / `cpu_bf16_support`, which `handler.py` also uses. This module only names the CPU (`cpu_name`,
`describe`) and delegates to that rule (`bf16_support`, `auto_dtype`). Must not import the model or change any global
torch setting.
"""

from __future__ import annotations

import platform

import torch

from . import repo_code
from .io.files import read_regular_text

CPUINFO = "/proc/cpuinfo"
NATIVE_BF16 = repo_code.pipeline().NATIVE_BF16
EMULATED_BF16 = repo_code.pipeline().EMULATED_BF16


def bf16_support() -> str:
    """One of NATIVE_BF16 (AMX first) or EMULATED_BF16: the repo's own detection."""
    return repo_code.pipeline().cpu_bf16_support()


def has_native_bf16() -> bool:
    return bf16_support() in NATIVE_BF16


def cpu_name() -> str:
    """The processor's model name (Linux), else what `platform` says."""
    try:
        for line in read_regular_text(CPUINFO).splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, ValueError):
        pass
    return platform.processor() or platform.machine()


def describe() -> str:
    """One line for benchmark headers: name, torch's vector ISA, and the bf16 case."""
    return f"{cpu_name()}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}; {bf16_support()}"


def auto_dtype(device: torch.device) -> torch.dtype:
    """bf16 where it is fast (CUDA devices that support it, CPUs with native bf16), else fp32: the repo's rule."""
    return repo_code.pipeline().default_dtype(device)
