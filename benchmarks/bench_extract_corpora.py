"""Corpora formats of extract_features.py: images/s of tar / parquet input vs the same images as a folder (and of
each output format), and peak memory of --save-grids at two shard sizes. Prints markdown.

    .venv/bin/python benchmarks/bench_extract_corpora.py [--images 64] [--repeats 3] [--memory-images 64]
    .venv/bin/python benchmarks/bench_extract_corpora.py --skip-speed --before /path/to/older/checkout  # + old RSS

Speed: one process; first the input path alone (list, header size, decode, preprocess: where the input kinds differ),
then end to end: the same --images synthetic JPEGs (random sizes, 160..720 px a side) as a folder, as 4 webdataset
tars and as 4 parquet files (binary column), each run through `extract()` (default --num-workers 2, float32, a
random-weight model of the so400m geometry with --hidden / --layers reduced so a CPU run takes minutes); the
contenders are interleaved run by run and the median of --repeats images/s (the summary's, model loading excluded)
is reported, with its ratio to the folder input.

Memory: --memory-images 980 x 980 images (4900 patches each, one per forward), --save-grids, --shard-size 8 vs 64;
each run in a fresh process, whose peak RSS (ru_maxrss) is reported. With --before DIR the same runs use the
extractor of another checkout (e.g. one that held a shard's grids in memory until the shard was written).
"""

import argparse
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from siglip_navit_tools import cpu, repo_code
from siglip_navit_tools.extract import ExtractOptions, extract
from siglip_navit_tools.extract.inputs import resolve_input
from siglip_navit_tools.testing import build_hub_dir, make_model, tiny_config

ROOT = repo_code.REPO_ROOT


def model_folder(parent: Path, hidden: int, layers: int) -> Path:
    """A random-weight model of the so400m geometry (patch 14, 70x70 positions) at width `hidden`, with BAGEL's
    image processor (980 px)."""
    config = tiny_config(hidden_size=hidden, intermediate_size=hidden * 4 // 3, num_attention_heads=max(1, hidden // 64),
                         num_hidden_layers=layers, patch_size=14, image_size=980, rope=False)  # fmt: skip
    folder = build_hub_dir(parent, config, make_model(config))
    repo_code.image_processing().SiglipNaViTImageProcessor().save_pretrained(folder)
    return folder


def jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, height // 8), max(1, width // 8), 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BILINEAR)  # photo-like: compresses like one
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_corpus(root: Path, images: list[bytes]) -> dict[str, str]:
    """The same images as a folder, 4 tars and 4 parquet files; returns the --input of each."""
    (root / "folder").mkdir(parents=True)
    (root / "tars").mkdir()
    (root / "parquet").mkdir()
    for i, data in enumerate(images):
        (root / "folder" / f"{i:06d}.jpg").write_bytes(data)
    for part, chunk in enumerate(np.array_split(np.arange(len(images)), 4)):
        with tarfile.open(root / "tars" / f"{part:05d}.tar", "w") as tar:
            for i in chunk:
                info = tarfile.TarInfo(f"{i:06d}.jpg")
                info.size = len(images[i])
                tar.addfile(info, io.BytesIO(images[i]))
        table = pa.table({"jpg": pa.array([images[i] for i in chunk], pa.binary())})
        pq.write_table(table, str(root / "parquet" / f"{part:05d}.parquet"))
    return {"folder": str(root / "folder"), "tar": f"{root}/tars/{{00000..00003}}.tar",
            "parquet": str(root / "parquet")}  # fmt: skip


def input_path_rate(source, processor) -> float:
    """Images/s of one source's input path alone, in this process: list its items, read each header size, decode and
    preprocess each image (what the extractor does per image, but the model)."""
    start, count = time.perf_counter(), 0
    for item in source.items(source.ids):
        processor.patch_grid(*source.size(item.payload))
        processor(images=source.load(item.payload))
        count += 1
    return count / (time.perf_counter() - start)


def input_paths(args: argparse.Namespace, inputs: dict[str, str], model: Path) -> None:
    """The input paths without the model: the one place tar / parquet / folder input differ."""
    processor = repo_code.image_processing().SiglipNaViTImageProcessor.from_pretrained(model)
    sources = {kind: resolve_input(spec) for kind, spec in inputs.items()}
    rates = {kind: [] for kind in sources}
    for repeat in range(args.repeats * 3 + 1):
        for kind, source in sources.items():
            rate = input_path_rate(source, processor)
            if repeat:
                rates[kind].append(rate)
    base = statistics.median(rates["folder"])
    print(f"\n### Input path alone (no model: list, header size, decode, preprocess; one process, median of "
          f"{args.repeats * 3})\n")  # fmt: skip
    print("| input | images/s | vs folder |\n| --- | ---: | ---: |")
    for kind, values in rates.items():
        print(f"| {kind} | {statistics.median(values):.1f} | {statistics.median(values) / base:.2f}x |")


def speed(args: argparse.Namespace, work: Path) -> None:
    rng = np.random.default_rng(0)
    images = [jpeg(int(rng.integers(160, 721)), int(rng.integers(160, 721)), i) for i in range(args.images)]
    inputs = write_corpus(work / "corpus", images)
    model = model_folder(work, args.hidden, args.layers)
    input_paths(args, inputs, model)
    quarter = -(-args.images // 4)  # the folder in 4 shards, as the 4 tars / parquet files are
    runs = {
        "folder (4 shards) -> safetensors": (inputs["folder"], "safetensors", quarter),
        "folder (1 shard) -> safetensors": (inputs["folder"], "safetensors", None),
        "4 tars -> safetensors": (inputs["tar"], "safetensors", None),
        "4 parquet files -> safetensors": (inputs["parquet"], "safetensors", None),
        "folder (4 shards) -> parquet": (inputs["folder"], "parquet", quarter),
        "folder (4 shards) -> npy": (inputs["folder"], "npy", quarter),
    }
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(args.repeats + 1):  # the first pass warms caches and is not counted
        for n, (name, (spec, fmt, shard_size)) in enumerate(runs.items()):
            out = work / f"out-{repeat}-{n}"
            summary = extract(ExtractOptions(model=str(model), input=spec, output=str(out), format=fmt,
                                             shard_size=shard_size, progress=False, device="cpu"))  # fmt: skip
            assert summary["images"] == args.images, summary
            if repeat:
                rates[name].append(summary["images_per_second"])
    base = statistics.median(rates["folder (4 shards) -> safetensors"])
    print(f"\n### Input and output formats ({args.images} JPEGs of 160..720 px, hidden {args.hidden}, {args.layers} "
          f"layer(s), float32, 2 DataLoader workers; median of {args.repeats})\n")  # fmt: skip
    print("| input -> output | images/s | vs folder (4 shards) -> safetensors |\n| --- | ---: | ---: |")
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"| {name} | {rate:.2f} | {rate / base:.2f}x |")


CHILD = """
import resource, sys
from siglip_navit_tools.extract.cli import main
rc = main(sys.argv[1:])
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "RC", rc)
"""


def peak_rss_mb(code_root: Path, argv: list[str]) -> float:
    env = dict(os.environ, PYTHONPATH=str(code_root), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run([sys.executable, "-c", CHILD, *argv], cwd=code_root, env=env, capture_output=True,
                          text=True, timeout=3600)  # fmt: skip
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("MAXRSS_KB")), None)
    if proc.returncode != 0 or line is None or not line.endswith("RC 0"):
        raise SystemExit(f"the run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return int(line.split()[1]) / 1024


def memory(args: argparse.Namespace, work: Path) -> None:
    folder = work / "big"
    folder.mkdir()
    for i in range(args.memory_images):
        (folder / f"{i:04d}.jpg").write_bytes(jpeg(980, 980, 100 + i))
    model = model_folder(work, args.hidden, args.layers)
    grid_mb = 4900 * args.hidden * 4 / 2**20
    roots = {"this checkout": ROOT, **({"--before": Path(args.before)} if args.before else {})}
    print(f"\n### Peak RSS with --save-grids ({args.memory_images} images of 980 x 980 px = 4900 patches, hidden "
          f"{args.hidden}: {grid_mb:.1f} MB of float32 grid each; one image per forward, --num-workers 0)\n")  # fmt: skip
    print("| extractor | --shard-size 8 | --shard-size 64 | difference |\n| --- | ---: | ---: | ---: |")
    for name, root in roots.items():
        peaks = []
        for shard_size in (8, 64):
            out = work / f"mem-{len(peaks)}-{name.replace(' ', '')}"
            peaks.append(peak_rss_mb(root, ["--model", str(model), "--input", str(folder), "--output", str(out),
                                            "--save-grids", "--shard-size", str(shard_size), "--num-workers", "0",
                                            "--max-patches-per-batch", "4900", "--device", "cpu", "--no-progress"]))  # fmt: skip
        print(f"| {name} | {peaks[0]:.0f} MB | {peaks[1]:.0f} MB | {peaks[1] - peaks[0]:+.0f} MB |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--memory-images", type=int, default=64)
    parser.add_argument("--before", default=None, help="another checkout's root: its extractor's peak RSS too")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"CPU: {cpu.cpu_name()} ({cpu.bf16_support()}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_speed:
            speed(args, Path(tmp))
        if not args.skip_memory:
            memory(args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
