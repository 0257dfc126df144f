#!/usr/bin/env python
"""Benchmark convert_checkpoint.py on a BAGEL-layout checkpoint of realistic size.

Builds `ema.safetensors` with BAGEL's real key layout: the full so400m ViT slice (26 layers, 421 tensors, 402.55 M
parameters, bf16, ~0.81 GB of real data, at the END of the file as in BAGEL's name-sorted file) plus non-ViT tensors
(connector, vit_pos_embed, ...) and one huge language-model tensor that is a sparse hole (never written, never read),
so the file is >= 10 GB but takes ~0.85 GB of disk. Then it evicts the file from the page cache, runs the converter in
a subprocess (the command's own `main`, `siglip_navit_tools.convert.cli.main`) and reports:

- wall time of the whole command (imports included) and of `main()` alone;
- bytes read from the source: the converter's own count, and, independently, the source pages the kernel brought
  into the page cache during the run (mincore after evicting the file first), and the process' storage reads
  (`read_bytes` of /proc/<pid>/io); `rchar` (every read() syscall: source + the verification re-read of the OUTPUT +
  Python imports) is shown for completeness;
- peak RSS of the converter process (ru_maxrss), next to that of a process that only imports its dependencies.

Targets (issue 4): bytes read <= 1.1x the ViT slice, peak RSS <= 1.5 GB.

    python benchmarks/bench_convert.py [--workdir DIR] [--keep] [--size-gb 10.5]
"""

import argparse
import ctypes
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

HIDDEN, MLP, LAYERS, PATCH, SIDE, CHANNELS = 1152, 4304, 26, 14, 70, 3
LLM_HIDDEN = 3584  # Qwen2-7B hidden size (BAGEL's language model)

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from siglip_navit_tools.convert.cli import main
if sys.argv[1] == "--imports-only":
    from siglip_navit_tools import repo_code
    repo_code.configuration(), repo_code.modeling()
    rc, wall = 0, 0.0
else:
    t = time.perf_counter()
    rc = main(sys.argv[1:])
    wall = time.perf_counter() - t
io = {}
with open("/proc/self/io") as f:
    for line in f:
        k, v = line.split(":")
        io[k.strip()] = int(v)
print("BENCH " + json.dumps({"rc": rc, "main_s": wall, "total_s": time.perf_counter() - t0, "io": io,
                             "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}), flush=True)
sys.exit(rc)
"""


def vit_shapes() -> dict:
    p = "vit_model.vision_model."
    shapes = {
        p + "embeddings.patch_embedding.weight": (HIDDEN, PATCH * PATCH * CHANNELS),
        p + "embeddings.patch_embedding.bias": (HIDDEN,),
        p + "embeddings.position_embedding.weight": (SIDE * SIDE, HIDDEN),
        p + "post_layernorm.weight": (HIDDEN,),
        p + "post_layernorm.bias": (HIDDEN,),
    }
    for i in range(LAYERS):
        layer = f"{p}encoder.layers.{i}."
        for ln in ("layer_norm1", "layer_norm2"):
            shapes[f"{layer}{ln}.weight"] = (HIDDEN,)
            shapes[f"{layer}{ln}.bias"] = (HIDDEN,)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{layer}self_attn.{proj}.weight"] = (HIDDEN, HIDDEN)
            shapes[f"{layer}self_attn.{proj}.bias"] = (HIDDEN,)
        shapes[f"{layer}mlp.fc1.weight"] = (MLP, HIDDEN)
        shapes[f"{layer}mlp.fc1.bias"] = (MLP,)
        shapes[f"{layer}mlp.fc2.weight"] = (HIDDEN, MLP)
        shapes[f"{layer}mlp.fc2.bias"] = (HIDDEN,)
    return shapes


def other_shapes(total_bytes_target: int, vit_bytes: int) -> tuple[dict, str]:
    shapes = {
        "connector.fc1.weight": (LLM_HIDDEN, HIDDEN),
        "connector.fc1.bias": (LLM_HIDDEN,),
        "connector.fc2.weight": (LLM_HIDDEN, LLM_HIDDEN),
        "connector.fc2.bias": (LLM_HIDDEN,),
        "vit_pos_embed.pos_embed": (SIDE * SIDE, LLM_HIDDEN),
        "latent_pos_embed.pos_embed": (4096, LLM_HIDDEN),
        "time_embedder.mlp.0.weight": (LLM_HIDDEN, 256),
        "vae2llm.weight": (LLM_HIDDEN, 64),
        "llm2vae.weight": (64, LLM_HIDDEN),
    }
    small = sum(2 * torch.Size(s).numel() for s in shapes.values())
    rows = -(-(total_bytes_target - vit_bytes - small) // (2 * LLM_HIDDEN))
    hole = "language_model.model.embed_tokens.weight"
    shapes[hole] = (rows, LLM_HIDDEN)  # the sparse hole standing in for the 7B language model
    return shapes, hole


def build_source(folder: Path, size_gb: float) -> dict:
    vit = vit_shapes()
    vit_bytes = sum(2 * torch.Size(s).numel() for s in vit.values())
    other, hole = other_shapes(int(size_gb * 1e9), vit_bytes)
    shapes = {**other, **vit}
    order = sorted(shapes)  # name order, as safetensors writes a single-dtype file (ViT near the end)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for k in order:
        n = 2 * torch.Size(shapes[k]).numel()
        header[k] = {"dtype": "BF16", "shape": list(shapes[k]), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path = folder / "ema.safetensors"
    pool = (torch.randn(8 * 2**20, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    pool = pool.view(torch.uint8).numpy().tobytes()  # 16 MiB of finite bf16 values, reused cyclically
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for k in order:
            n = header[k]["data_offsets"][1] - header[k]["data_offsets"][0]
            if k == hole:
                f.seek(n, os.SEEK_CUR)
                continue
            while n:
                chunk = min(n, len(pool))
                f.write(pool[:chunk])
                n -= chunk
        f.truncate(f.tell())
        f.flush()
        os.fsync(f.fileno())
    (folder / "vit_config.json").write_text(json.dumps({
        "hidden_size": HIDDEN, "image_size": SIDE * PATCH, "intermediate_size": MLP,
        "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": LAYERS + 1,
        "patch_size": PATCH,
    }, indent=2))
    return {"path": path, "vit_bytes": vit_bytes, "vit_tensors": len(vit), "header_bytes": 8 + len(raw),
            "file_bytes": path.stat().st_size, "disk_bytes": path.stat().st_blocks * 512}


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_bytes(path: Path) -> int:
    """Bytes of `path` in the page cache (mincore over a read-only mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = path.stat().st_size
    page = os.sysconf("SC_PAGE_SIZE")
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            data = bytes(vec)
            return (len(data) - data.count(0)) * page
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def run_child(args: list[str]) -> tuple[dict, str, float]:
    t = time.perf_counter()
    # `python -c` puts its working directory first on sys.path: from the repo root the tools package imports as a
    # user's checkout has it, installed or not
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    line = next((l for l in proc.stdout.splitlines() if l.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"converter failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[len("BENCH "):]), proc.stderr, wall


def gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=tempfile.gettempdir(), help="where the sparse source and the output go")
    ap.add_argument("--size-gb", type=float, default=10.5, help="apparent size of the source file (>= 10)")
    ap.add_argument("--keep", action="store_true", help="keep the source and output (default: delete them)")
    args = ap.parse_args()

    work = Path(args.workdir)
    print(subprocess.run(["df", "-h", str(work)], capture_output=True, text=True).stdout.strip(), file=sys.stderr)
    need = 3 * 10**9  # ~0.85 GB real source data + ~0.81 GB output + margin
    free = shutil.disk_usage(work).free
    if free < need:
        print(f"not enough free disk in {work}: {gb(free)} free, need {gb(need)}", file=sys.stderr)
        return 1
    folder = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=work))
    try:
        src = folder / "BAGEL-7B-MoT"
        src.mkdir()
        t = time.perf_counter()
        info = build_source(src, args.size_gb)
        print(f"built {info['path']} ({gb(info['file_bytes'])} apparent, {gb(info['disk_bytes'])} on disk) in "
              f"{time.perf_counter() - t:.1f} s", file=sys.stderr)

        base, _, _ = run_child(["--imports-only"])
        evict(info["path"])
        before = resident_bytes(info["path"])
        out = folder / "siglip-navit-bagel"
        res, stderr, wall = run_child(["--src", str(src), "--out", str(out), "--no-progress"])
        cached = resident_bytes(info["path"]) - before
        m = re.search(r"from the source \((\d+) bytes\)", stderr)
        counted = int(m.group(1)) if m else -1
        out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))

        vit = info["vit_bytes"]
        rss = res["maxrss_kb"] * 1024
        rows = [
            ("source file (BAGEL layout, sparse)", f"{gb(info['file_bytes'])} apparent, {gb(info['disk_bytes'])} on disk", ">= 10 GB", info["file_bytes"] >= 10e9),
            ("ViT slice (421 tensors, bf16)", f"{gb(vit)} ({info['vit_tensors']} tensors) + {info['header_bytes']} B header", "", None),
            ("bytes read from the source (converter's count)", f"{gb(counted)} = {counted / vit:.4f}x slice", "<= 1.1x", counted <= 1.1 * vit),
            ("source bytes brought into the page cache (mincore)", f"{gb(cached)} = {cached / vit:.4f}x slice", "<= 1.1x", cached <= 1.1 * vit),
            ("process storage reads (/proc read_bytes)", f"{gb(res['io']['read_bytes'])}", "", None),
            ("process rchar (source + output verification + imports)", f"{gb(res['io']['rchar'])} (imports alone: {gb(base['io']['rchar'])})", "", None),
            ("peak RSS, converter process", f"{rss / 1e9:.3f} GB", "<= 1.5 GB", rss <= 1.5e9),
            ("peak RSS, a process that only imports torch + transformers + the model code", f"{base['maxrss_kb'] * 1024 / 1e9:.3f} GB", "", None),
            ("wall time, whole command (imports included)", f"{wall:.1f} s", "", None),
            ("wall time, main() (read, convert, hash, write, fsync, verify)", f"{res['main_s']:.1f} s", "", None),
            ("output", f"{gb(out_bytes)} in {len(list(out.glob('*.safetensors')))} safetensors file(s)", "", None),
        ]
        print("| metric | value | target | ok |")
        print("|---|---|---|---|")
        for name, value, target, ok in rows:
            print(f"| {name} | {value} | {target} | {'' if ok is None else ('yes' if ok else 'NO')} |")
        print(f"\nmachine: {os.cpu_count()} CPUs, torch {torch.__version__}, python {sys.version.split()[0]}")
        return 0 if all(ok is not False for *_, ok in rows) else 1
    finally:
        if args.keep:
            print(f"kept {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
