# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""What kind of CPU this is, for the one dtype decision that depends on it: bf16 or fp32 on the CPU.

CPUs with native bf16 matrix units (AVX512_BF16, or AMX) run the tower's Linear layers in bf16 several times
faster than fp32; on AVX2-only CPUs bf16 is emulated and 4-6x SLOWER. Owns that detection and the `auto` dtype
choice built on it (benchmarks/bench_forward.py prints it, extract_features.py --dtype auto uses it). Must not
import the model or change any global torch setting.
"""

from __future__ import annotations

import platform

import torch

from .io.files import read_regular_text

CPUINFO = "/proc/cpuinfo"
NATIVE_BF16 = "native bf16 (AMX)", "native bf16 (AVX512_BF16)"
EMULATED_BF16 = "no native bf16 (AVX2 or older: bf16 is emulated)"


def _cpuinfo_flags() -> set[str]:
    try:
        text = read_regular_text(CPUINFO)
    except (OSError, ValueError):
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def bf16_support() -> str:
    """One of NATIVE_BF16 (AMX first) or EMULATED_BF16, from torch's own CPU probes (Linux flags as fallback)."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    flags = _cpuinfo_flags() if amx is None or avx512_bf16 is None else set()
    if (amx() if amx is not None else "amx_bf16" in flags):
        return NATIVE_BF16[0]
    if (avx512_bf16() if avx512_bf16 is not None else "avx512_bf16" in flags):
        return NATIVE_BF16[1]
    return EMULATED_BF16


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
    """bf16 where it is fast (CUDA devices that support it, CPUs with native bf16), else fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if has_native_bf16() else torch.float32
    return torch.float32
