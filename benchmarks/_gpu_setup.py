# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Shared pieces of `gpu_check.py`: the repo's code without an install, the run's shapes, models, packs, timing.

Owns: importing `siglip_navit_tools` from this checkout by file location (the GPU image has the repo copied, not
pip-installed, and `sys.path` is never edited), the two geometries (the full BAGEL tower, and `--cpu-smoke`'s tiny
one), the per-run state (`Env`: device, cached models, failures), packs, analytic FLOPs, synced timing and markdown
tables. It must not measure anything itself: the sections (`_gpu_*.py`) do.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from _common import interleaved_medians

REPO_ROOT = Path(__file__).resolve().parents[1]
TOOLS = "siglip_navit_tools"
# dense bf16 peak in TFLOP/s, by a substring of torch.cuda.get_device_name() (SXM parts; first match wins)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0, "4090": 165.0}


def repo_code() -> ModuleType:
    """`siglip_navit_tools.repo_code` of THIS checkout: the package is registered from its folder (no install and no
    `sys.path` entry needed); one already imported (e.g. an editable install of this checkout) is reused."""
    if TOOLS not in sys.modules:
        folder = REPO_ROOT / TOOLS
        spec = importlib.util.spec_from_file_location(
            TOOLS, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules[TOOLS] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{TOOLS}.repo_code")


@dataclass(frozen=True)
class Geometry:
    """Every shape and count of one run: `full()` on a GPU, `smoke()` for the CPU dry run."""

    hidden: int  # hidden size
    mlp: int  # MLP intermediate size
    heads: int  # attention heads (head_dim divisible by 4 for RoPE)
    layers: int  # encoder layers
    patch: int  # patch side, pixels
    image_size: int  # native image side, pixels (image_size // patch positions per side)
    mixed_grids: tuple  # (h, w) patch grids of the mixed pack
    small_count: int  # images in the "many small images" pack
    small_px: tuple  # (min, max) side of those images, pixels
    budgets: tuple  # token budgets of the sweep, patches
    photos: int  # generated JPEG photos for the end-to-end extraction
    photo_px: tuple  # (min, max) long side of the photos, pixels
    workers: tuple  # DataLoader worker counts of the end-to-end runs
    extract_budget: int  # --max-patches-per-batch of the end-to-end runs (and their forward-only peer)
    repeats: int  # timed runs per measurement (median)
    compile_timeout: float  # seconds the CUDA-graph / torch.compile probe may take
    smoke: bool  # the CPU dry run: tiny shapes, skip what needs CUDA

    @property
    def side(self) -> int:
        return self.image_size // self.patch

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch * self.patch

    @classmethod
    def full(cls, layers: int = 26, repeats: int = 10) -> "Geometry":
        """BAGEL-7B-MoT's tower: so400m/14, 980 px (70 x 70 positions), 26 layers."""
        return cls(
            hidden=1152, mlp=4304, heads=16, layers=layers, patch=14, image_size=980,
            mixed_grids=((70, 70), (32, 32), (48, 48), (24, 24)), small_count=64, small_px=(224, 448),
            budgets=(4096, 16384, 65536), photos=256, photo_px=(320, 1600), workers=(0, 2, 4, 8),
            extract_budget=16384, repeats=repeats, compile_timeout=150.0, smoke=False,
        )  # fmt: skip

    @classmethod
    def smoke_test(cls) -> "Geometry":
        """A 2-layer, 64-wide tower on a 16 x 16 grid (224 px / 14 px patches): the whole script in seconds."""
        return cls(
            hidden=64, mlp=128, heads=4, layers=2, patch=14, image_size=224,
            mixed_grids=((16, 16), (8, 8), (12, 12), (6, 6)), small_count=8, small_px=(56, 112),
            budgets=(200, 512, 2048), photos=8, photo_px=(64, 300), workers=(1,),
            extract_budget=512, repeats=2, compile_timeout=120.0, smoke=True,
        )  # fmt: skip


@dataclass
class Env:
    """One run's state: the device, the half-precision dtype, the repo's modules, cached models, failures."""

    geo: Geometry
    device: torch.device
    half: torch.dtype  # the fast dtype under test (bf16)
    peak_tflops: Optional[float]  # dense bf16 peak of the GPU, for MFU
    failures: list = field(default_factory=list)  # labels of failed checks / crashed sections
    _models: dict = field(default_factory=dict)  # (rope, dtype) -> our model

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def modeling(self) -> ModuleType:
        return repo_code().modeling()

    def config(self, rope: bool = False, attn: str = "sdpa"):
        g = self.geo
        config = repo_code().configuration().SiglipNaViTConfig(
            hidden_size=g.hidden, intermediate_size=g.mlp, num_attention_heads=g.heads, num_hidden_layers=g.layers,
            patch_size=g.patch, image_size=g.image_size, rope=rope,
        )  # fmt: skip
        config._attn_implementation = attn
        return config

    def model(self, rope: bool = False, dtype: torch.dtype = torch.float32, attn: str = "sdpa"):
        """Our model with seeded random weights (the default init), cached per (rope, dtype): every dtype is a copy
        of the same fp32 weights. `attn` sets its attention implementation (the cached model is shared)."""
        key = (rope, dtype)
        if key not in self._models:
            if dtype == torch.float32:
                torch.manual_seed(0)
                with self.device:
                    self._models[key] = self.modeling.SiglipVisionModel(self.config(rope)).eval()
            else:
                self._models[key] = copy.deepcopy(self.model(rope, torch.float32)).to(dtype)
        model = self._models[key]
        model.config._attn_implementation = attn
        return model

    def drop_models(self, rope: Optional[bool] = None) -> None:
        """Free the cached models (of one rope setting, or all)."""
        for key in [k for k in self._models if rope is None or k[0] == rope]:
            del self._models[key]
        if self.cuda:
            torch.cuda.empty_cache()

    def kernel(self, attn: str, dtype: torch.dtype) -> str:
        """The name of the kernel our model runs for `attn` at `dtype` on this device (e.g. `torch_varlen_attention`,
        `sdpa_attention_per_image`, `flash_attn_varlen_attention`, `eager_attention_per_image`)."""
        return self.modeling.select_attention_kernel(attn, self.device, dtype, 0.0).__name__

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def medians(self, fns: dict[str, Callable[[], object]], repeats: Optional[int] = None) -> dict[str, float]:
        """Median seconds per call (`_common.interleaved_medians`), each call synchronised with the device."""

        def synced(fn):
            return lambda: (fn(), self.sync())

        return interleaved_medians({k: synced(fn) for k, fn in fns.items()}, repeats or self.geo.repeats)

    def check(self, ok: bool, label: str) -> str:
        """'ok' or 'FAIL' (and the label recorded as a failure)."""
        if not ok:
            self.failures.append(label)
        return "ok" if ok else "FAIL"

    def mfu(self, flop: float, seconds: float) -> str:
        if not self.peak_tflops or not self.cuda:
            return "-"
        return f"{100 * flop / seconds / (self.peak_tflops * 1e12):.1f}%"


# ----------------------------------------------------------------------------------------------------------------
# Packs and FLOPs
# ----------------------------------------------------------------------------------------------------------------
def make_pack(grids: Sequence[tuple[int, int]], env: Env, seed: int = 1, dtype: torch.dtype = torch.float32) -> dict:
    """Random pixels for images of the given (h, w) patch grids, packed (extrapolate position ids), on the device.
    The pixels are drawn on the device (a 64k-patch pack is 38 M numbers: slow on one CPU thread)."""
    gen = torch.Generator(device=env.device).manual_seed(seed)
    side, dim = env.geo.side, env.geo.patch_dim
    pixels = [torch.randn(h * w, dim, generator=gen, device=env.device) for h, w in grids]
    positions = [(torch.arange(h)[:, None] * side + torch.arange(w)[None, :]).flatten() for h, w in grids]
    lengths = [h * w for h, w in grids]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return dict(
        packed_pixel_values=torch.cat(pixels).to(env.device, dtype),
        packed_flattened_position_ids=torch.cat(positions).to(env.device),
        cu_seqlens=cu.to(env.device),
        max_seqlen=max(lengths),
    )


def pack_lengths(pack: dict) -> list[int]:
    return torch.diff(pack["cu_seqlens"].cpu()).tolist()


def split_pack(pack: dict) -> list[dict]:
    """One single-image pack per image of `pack` (views, on the same device)."""
    singles, device = [], pack["cu_seqlens"].device
    bounds = pack["cu_seqlens"].cpu().tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        singles.append(dict(
            packed_pixel_values=pack["packed_pixel_values"][start:end],
            packed_flattened_position_ids=pack["packed_flattened_position_ids"][start:end],
            cu_seqlens=torch.tensor([0, end - start], dtype=torch.int32, device=device), max_seqlen=end - start,
        ))  # fmt: skip
    return singles


def first_fit_decreasing(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices grouped into forwards of <= `budget` patches: extract_features.py's own packer."""
    repo_code()  # registers this checkout's siglip_navit_tools package
    return importlib.import_module(f"{TOOLS}.extract.packing").plan_batches(lengths, budget)


def analytic_flops(lengths: Sequence[int], geo: Geometry) -> float:
    """2 x multiply-adds of the linears (q, k, v, out, fc1, fc2, patch embedding) and attention (QK^T, AV)."""
    total = sum(lengths)
    linear = 2 * total * (4 * geo.hidden**2 + 2 * geo.hidden * geo.mlp)
    attention = sum(4 * n * n * geo.hidden for n in lengths)
    return geo.layers * (linear + attention) + 2 * total * geo.patch_dim * geo.hidden


def compare(out: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(cosine similarity, max abs diff) of two tensors, in float64."""
    a, b = out.detach().double().flatten(), reference.detach().double().flatten()
    return F.cosine_similarity(a, b, dim=0).item(), (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------------------
def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def skipped(what: str, why: str) -> str:
    return f"- {what}: skipped: {why}"


def run_section(env: Env, heading: str, body: Callable[[Env], str]) -> None:
    """Print one section: its heading first, then its body; a crash is reported (and counted as a failure) and the
    run goes on with the next section."""
    print(heading + "\n", flush=True)
    try:
        text = body(env)
    except Exception as exc:  # noqa: BLE001 - one broken section must not hide the others' numbers
        env.failures.append(f"{heading.lstrip('# ')} raised {type(exc).__name__}")
        text = f"- FAILED: {type(exc).__name__}: {exc}\n\n```\n{traceback.format_exc(limit=8)}```"
    print(text + "\n", flush=True)
    if env.cuda:
        torch.cuda.empty_cache()
