# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""The ONE tiny-checkpoint builder: small configs, random models, packs, and checkpoints in every layout we read.

Used by the tests (imported directly), the benchmarks, scripts/make_figures.py, examples/demo.py and the
notebook. Owns: tiny configs and seeded random weights, hand-made packs (position ids written independently of the
processor, as a cross-check), and writing checkpoints in BAGEL's layout (`ema.safetensors` + `vit_config.json`),
stock SigLIP layouts, and a converted Hub repo (through the converter, as a user makes one). It must not hold
model or conversion logic of its own: everything it writes is what the real code (or BAGEL) would read.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch

from . import repo_code
from .compat import dtype_kwarg, transformers_major  # noqa: F401  (re-exported for tests and scripts)

BAGEL_VIT_PREFIX = "vit_model."
_TEMPLATE = repo_code.template_config()  # the repo root's config.json: BAGEL-7B-MoT's tower, written once
# BAGEL-7B-MoT's vit_config.json geometry (patch 14, 980 px = a 70 x 70 position table) at a small width. As in
# BAGEL's own file, num_hidden_layers there says one layer more than the checkpoint stores (BAGEL drops the last).
BAGEL_GEOMETRY = dict(
    patch_size=_TEMPLATE["patch_size"], image_size=_TEMPLATE["image_size"], model_type="siglip_vision_model"
)


# ----------------------------------------------------------------------------------------------------------------
# Configs, models, packs
# ----------------------------------------------------------------------------------------------------------------
# A 2-layer model on a 6x6 patch grid (patch 4, 24 px): heads of 8 dims so RoPE halves are 4-wide.
TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_channels=3,
            image_size=24, patch_size=4, rope=False)  # fmt: skip
# BAGEL-7B-MoT's tower as BAGEL runs it (so400m/14, 980 px, 26 layers, learned positions), from config.json.
BAGEL_VIT = {
    name: _TEMPLATE[name]
    for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "patch_size",
                 "image_size", "rope")
}  # fmt: skip


def tiny_config(**overrides):
    """The TINY config with `overrides`."""
    return repo_code.configuration().SiglipNaViTConfig(**{**TINY, **overrides})


def bagel_config(**overrides):
    """BAGEL-7B-MoT's full-size tower config with `overrides` (build it on the meta device in tests)."""
    return repo_code.configuration().SiglipNaViTConfig(**{**BAGEL_VIT, **overrides})


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Give EVERY parameter (biases and LayerNorms too) random values, so no term can silently drop out."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * scale
            if name.endswith("layer_norm1.weight") or name.endswith("layer_norm2.weight") or "post_layernorm.weight" in name:
                noise = noise + 1.0
            p.copy_(noise.to(p.dtype))
    return model


def make_model(config=None, attn: str = "sdpa", seed: int = 0, **overrides):
    """Our SiglipVisionModel with random weights (`randomize_`), in eval mode."""
    config = config if config is not None else tiny_config(**overrides)
    config._attn_implementation = attn
    model = repo_code.modeling().SiglipVisionModel(config)
    randomize_(model, seed)
    return model.eval()


def positions_for(h: int, w: int, side: int) -> torch.Tensor:
    """Extrapolate-mode position ids (row * side + col), written independently of the model and processor code."""
    return torch.tensor([i * side + j for i in range(h) for j in range(w)], dtype=torch.long)


def make_pack(grids: Sequence[tuple[int, int]], config, seed: int = 1) -> dict:
    """Random pixels for images with the given (h, w) patch grids, packed with their index tensors."""
    gen = torch.Generator().manual_seed(seed)
    side = config.image_size // config.patch_size
    dim = config.num_channels * config.patch_size**2
    pixels = [torch.randn(h * w, dim, generator=gen) for h, w in grids]
    lengths = [h * w for h, w in grids]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)
    return dict(
        packed_pixel_values=torch.cat(pixels),
        packed_flattened_position_ids=torch.cat([positions_for(h, w, side) for h, w in grids]),
        cu_seqlens=cu,
        max_seqlen=max(lengths),
        image_grid_hw=torch.tensor(grids, dtype=torch.long),
    )


# ----------------------------------------------------------------------------------------------------------------
# Folders and checkpoints
# ----------------------------------------------------------------------------------------------------------------
def unique_dir(parent: Path, stem: str) -> Path:
    """transformers 4.x caches remote code by folder name: give every saved model its own name."""
    return Path(parent) / f"{stem}_{uuid.uuid4().hex[:10]}"


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path) -> Path:
    """safetensors with the `{"format": "pt"}` metadata transformers 4.49 insists on."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    return path


def copy_remote_code(target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for name in repo_code.HUB_CODE_FILES:
        shutil.copy(repo_code.REPO_ROOT / name, target / name)
    return target


def build_hub_dir(parent: Path, config, model, extra_tensors: Optional[dict] = None) -> Path:
    """What a user downloads, made directly from a model: remote-code files + config.json + model.safetensors."""
    target = copy_remote_code(unique_dir(parent, "hubdir"))
    data = config.to_dict()
    data["auto_map"] = repo_code.config_auto_map()
    data["custom_pipelines"] = repo_code.custom_pipelines()
    data.pop("_attn_implementation_autoset", None)
    (target / "config.json").write_text(json.dumps(data, indent=2))
    state = dict(model.state_dict())
    state.update(extra_tensors or {})
    save_safetensors(state, target / "model.safetensors")
    return target


def write_bagel_checkpoint(
    folder: Path,
    vit_state: Mapping[str, torch.Tensor],
    vit_config: Optional[dict],
    *,
    prefix: str = BAGEL_VIT_PREFIX,
    extra: Optional[Mapping[str, torch.Tensor]] = None,
) -> Path:
    """A BAGEL model folder: `ema.safetensors` with the tower's tensors (our parameter paths) under `prefix` plus
    `extra` tensors (BAGEL's other modules), and `vit_config.json` (skipped when `vit_config` is None)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {prefix + k: v for k, v in vit_state.items()}
    tensors.update(extra or {})
    save_safetensors(tensors, folder / "ema.safetensors")
    if vit_config is not None:
        (folder / "vit_config.json").write_text(json.dumps(vit_config, indent=2))
    return folder


def random_bagel_state(hidden: int, mlp: int, layers: int, patch: int, side: int, seed: int = 0) -> dict:
    """BAGEL-like tower weights: N(0, 0.02) matrices (the patch embedding in BAGEL's Linear layout, a side x side
    position table), zero biases, unit LayerNorms. The generation order is fixed: docs/*.png depend on it."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen) * 0.02

    vm = "vision_model."
    sd = {
        vm + "embeddings.patch_embedding.weight": randn(hidden, 3 * patch * patch),
        vm + "embeddings.patch_embedding.bias": torch.zeros(hidden),
        vm + "embeddings.position_embedding.weight": randn(side * side, hidden),
        vm + "post_layernorm.weight": torch.ones(hidden),
        vm + "post_layernorm.bias": torch.zeros(hidden),
    }
    for i in range(layers):
        pre = f"{vm}encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[f"{pre}self_attn.{name}.weight"], sd[f"{pre}self_attn.{name}.bias"] = randn(hidden, hidden), torch.zeros(hidden)
        sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"] = randn(mlp, hidden), torch.zeros(mlp)
        sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"] = randn(hidden, mlp), torch.zeros(hidden)
        for ln in ("layer_norm1", "layer_norm2"):
            sd[f"{pre}{ln}.weight"], sd[f"{pre}{ln}.bias"] = torch.ones(hidden), torch.zeros(hidden)
    return sd


def tiny_bagel_checkpoint(
    folder: Path, layers: int = 2, hidden: int = 64, mlp: int = 128, heads: int = 4, seed: int = 0
) -> Path:
    """A BAGEL-7B-MoT-shaped folder (14 px patches, 70 x 70 positions) at a small width, with seeded weights."""
    patch, image_size = BAGEL_GEOMETRY["patch_size"], BAGEL_GEOMETRY["image_size"]
    state = random_bagel_state(hidden, mlp, layers, patch, image_size // patch, seed)
    vit_config = dict(
        hidden_size=hidden, intermediate_size=mlp, num_attention_heads=heads, num_hidden_layers=layers + 1,
        **BAGEL_GEOMETRY,
    )  # fmt: skip
    return write_bagel_checkpoint(Path(folder), state, vit_config)


def convert(src: Path, out: Path, *extra_args: str) -> Path:
    """Run the converter as a user does (`convert_checkpoint.py --src SRC --out OUT ...`); raises on failure."""
    from .convert.cli import main as convert_main

    status = convert_main(["--src", str(src), "--out", str(out), "--no-progress", "--quiet", *extra_args])
    if status != 0:
        raise RuntimeError(f"convert_checkpoint.py --src {src} --out {out} failed with exit status {status}")
    return Path(out)


def run_commands(*commands: Sequence[Any], timeout: float = 300) -> list:
    """Run each command (`python *command`, this checkout on PYTHONPATH, one thread per process) AT ONCE and return
    their `subprocess.CompletedProcess`es in order: the commands' start-up (torch, transformers) is paid in parallel."""
    import concurrent.futures
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(repo_code.REPO_ROOT), OMP_NUM_THREADS="1")

    def run(command: Sequence[Any]) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *map(str, command)], capture_output=True, text=True, env=env,
                              timeout=timeout, stdin=subprocess.DEVNULL)  # fmt: skip

    with concurrent.futures.ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(run, commands))


def console_script(folder: Path, name: str) -> Path:
    """`folder/name`: the wrapper pip writes for pyproject.toml's `[project.scripts]` entry `name` (run it with
    `python folder/name`, this checkout on PYTHONPATH), so the console scripts can be tested without an install."""
    import tomllib

    from .io.files import read_regular_text

    scripts = tomllib.loads(read_regular_text(repo_code.REPO_ROOT / "pyproject.toml"))["project"]["scripts"]
    module, function = scripts[name].split(":")
    path = Path(folder) / name
    path.write_text(
        "import re\nimport sys\n"
        f"from {module} import {function}\n"
        "if __name__ == '__main__':\n"
        "    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
        f"    sys.exit({function}())\n"
    )
    return path


def tiny_converted_repo(out: Path, *, work: Optional[Path] = None, **bagel_kwargs: Any) -> Path:
    """A ready-to-load converted Hub repo at `out`: a `tiny_bagel_checkpoint` (kwargs) run through the converter."""
    import tempfile

    with tempfile.TemporaryDirectory(dir=work) as tmp:
        source = tiny_bagel_checkpoint(Path(tmp) / "bagel", **bagel_kwargs)
        return convert(source, out)


def saved_repo(out: Path, config, seed: int = 0) -> Path:
    """A ready-to-load repo made the `save_pretrained` way: our model with random weights for `config` (written
    with the remote-code files) plus the image processor whose settings fit it."""
    torch.manual_seed(seed)
    config.custom_pipelines = repo_code.custom_pipelines()
    model = repo_code.modeling().SiglipVisionModel(config)
    model.save_pretrained(out)  # config.json, model.safetensors and (registered classes) the remote-code .py files
    processing = repo_code.image_processing()
    settings = processing.SiglipNaViTImageProcessor.settings_for_model(config)
    processing.SiglipNaViTImageProcessor(**settings).save_pretrained(out)
    copy_remote_code(Path(out))  # + the pipeline and the Inference Endpoints handler, as a converted repo has
    return Path(out)


# ----------------------------------------------------------------------------------------------------------------
# A read-only location, for tests of what the tools say when they cannot write
# ----------------------------------------------------------------------------------------------------------------
# Runs "$@" with the folder "$0" bind-mounted read-only in a private mount namespace (gone with the process).
_RO_SCRIPT = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"'


def read_only_prefix(folder: Path) -> tuple[Optional[list[str]], str]:
    """(a command prefix that runs a command with `folder` read-only, or None; how, or why there is none). Root
    ignores permission bits, so as root `folder` is bind-mounted read-only in a private mount namespace (`unshare
    --mount`, util-linux): a real read-only file system (EROFS) that only the wrapped process sees. Otherwise the
    folder's write bits are cleared (EACCES) -- the caller restores them (`os.chmod(folder, 0o755)`)."""
    import os
    import subprocess

    folder = Path(folder)
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        return [], "write permission removed (not root)"
    prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c", _RO_SCRIPT, str(folder)]
    probe = folder / ".read-only-probe"
    try:
        result = subprocess.run([*prefix, "touch", str(probe)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"as root, a read-only location needs `unshare --mount` + `mount` ({exc})"
    if probe.exists():
        probe.unlink()
        return None, "the read-only bind mount did not take effect"
    if "Read-only file system" not in result.stderr:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"
        return None, f"as root, a read-only location needs `unshare --mount` + `mount`, which failed here: {reason}"
    return prefix, "a read-only bind mount in a private mount namespace"


# ----------------------------------------------------------------------------------------------------------------
# Hostile images (request-limit tests)
# ----------------------------------------------------------------------------------------------------------------
def _zlib_repeated(block: bytes, times: int, tail: bytes = b"") -> bytes:
    """A zlib stream of `block * times + tail` that compresses `block` only once: after a full flush nothing refers
    back, so one compressed copy can be repeated (a 144-megapixel bomb in ~0.1 s instead of seconds of deflate)."""
    import struct
    import zlib

    compressor = zlib.compressobj(9)
    first = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)  # the zlib header + one copy
    again = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)  # one copy on its own
    parts = [first] + [again] * (times - 1)
    if tail:
        parts.append(compressor.compress(tail) + compressor.flush(zlib.Z_FULL_FLUSH))
    final_block = compressor.flush()[:-4]  # its checksum covers what the compressor saw: replaced below
    checksum = 1
    for _ in range(times):
        checksum = zlib.adler32(block, checksum)
    checksum = zlib.adler32(tail, checksum)
    return b"".join(parts) + final_block + struct.pack(">I", checksum)


def png_bomb(width: int, height: int, rows: Optional[int] = None) -> bytes:
    """A valid `width x height` 8-bit RGB PNG of black pixels: a few hundred KB that decode to width*height*3 bytes
    (the image never exists decoded here). `rows` < height writes only that many rows: a valid header over truncated
    data, enough for whatever reads only the header."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = height if rows is None else rows
    row = b"\x00" * (1 + 3 * width)  # filter byte 0, then the row's pixels
    per_block = max(1, min(rows, (4 << 20) // len(row)))
    idat = _zlib_repeated(row * per_block, rows // per_block, row * (rows % per_block))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@contextlib.contextmanager
def no_hang(seconds: int = 60) -> Iterator[None]:
    """Fail with TimeoutError instead of hanging forever (a FIFO opened for reading blocks until a writer comes; a
    listing over a symlink loop never ends). Main thread only (SIGALRM)."""
    import signal

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: a read blocked or a listing never ended")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
