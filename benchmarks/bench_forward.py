"""Packed-forward benchmark on CPU against the peers, run in the same process; prints markdown tables of ratios.

    .venv/bin/python benchmarks/bench_forward.py [--layers 2] [--repeats 5] [--skip-compile] [--native-only]

Shapes: the real so400m width (hidden 1152, 16 heads, MLP 4304, patch 14, 980 px grid), fp32, depth reduced
to --layers so one run takes about a minute. Timings are medians of --repeats runs, peers interleaved run by
run (A B A B ...) so drifting machine load hits both sides alike. Sections:
  1. one native 980x980 image (4900 patches): ours (sdpa) vs stock transformers SiglipVisionModel (sdpa)
  2. a mixed pack [4900, 1024, 2304, 576]: ours packed vs ours image by image vs Siglip2VisionModel (NaFlex)
     on the same images padded to one batch with its attention mask
  3. achieved FLOP rate of 2. (analytic: linear layers + attention) vs this machine's torch.matmul fp32 rate
  4. bf16 vs fp32 on this CPU: time ratio and max|diff|
  5. peak memory of 2. and the largest tensor any op allocates (vs total x total)
  6. torch.compile of the model: graph breaks and time ratio
"""

import argparse
import statistics
import subprocess
import sys
import time

import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

from _common import interleaved_medians, interleaved_times  # benchmarks/ is this script's folder: on sys.path

from siglip_navit_tools import cpu, repo_code

cfg_mod, model_mod = repo_code.configuration(), repo_code.modeling()

HIDDEN, HEADS, MLP, PATCH, IMAGE = 1152, 16, 4304, 14, 980
SIDE = IMAGE // PATCH
MIXED_GRIDS = [(70, 70), (32, 32), (48, 48), (24, 24)]  # 4900 + 1024 + 2304 + 576 = 8804 patches


def ours_config(layers: int):
    config = cfg_mod.SiglipNaViTConfig(
        hidden_size=HIDDEN, intermediate_size=MLP, num_attention_heads=HEADS, num_hidden_layers=layers,
        patch_size=PATCH, image_size=IMAGE, rope=False,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    return config


def build_models(layers: int):
    torch.manual_seed(0)
    config = ours_config(layers)
    ours = model_mod.SiglipVisionModel(config).eval()

    stock_config = transformers.SiglipVisionConfig(
        hidden_size=HIDDEN, intermediate_size=MLP, num_attention_heads=HEADS, num_hidden_layers=layers,
        patch_size=PATCH, image_size=IMAGE, vision_use_head=False,
    )  # fmt: skip
    stock_config._attn_implementation = "sdpa"
    stock = transformers.SiglipVisionModel(stock_config).eval()
    state = {}
    for key, value in stock.state_dict().items():  # same weights in both (conv -> linear layout)
        key = key.removeprefix("vision_model.")
        if key.endswith("position_ids"):
            continue
        if key == "embeddings.patch_embedding.weight":
            value = model_mod.conv2d_weight_to_linear(value)
        state["vision_model." + key] = value
    ours.load_state_dict(state)
    return config, ours, stock


def make_pack(grids, gen):
    pixels, positions, lengths = [], [], []
    for h, w in grids:
        pixels.append(torch.randn(h * w, 3 * PATCH * PATCH, generator=gen))
        positions.append((torch.arange(h)[:, None] * SIDE + torch.arange(w)[None, :]).flatten())
        lengths.append(h * w)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return dict(packed_pixel_values=torch.cat(pixels), packed_flattened_position_ids=torch.cat(positions),
                cu_seqlens=cu, max_seqlen=max(lengths))  # fmt: skip


def split_pack(pack, grids):
    singles, start = [], 0
    for h, w in grids:
        n = h * w
        singles.append(dict(
            packed_pixel_values=pack["packed_pixel_values"][start : start + n],
            packed_flattened_position_ids=pack["packed_flattened_position_ids"][start : start + n],
            cu_seqlens=torch.tensor([0, n], dtype=torch.int32), max_seqlen=n,
        ))  # fmt: skip
        start += n
    return singles


def analytic_flops(lengths, layers: int) -> float:
    """Multiply-adds x 2 of the linear layers (q, k, v, out, fc1, fc2, patch embedding) and attention (QK^T, AV)."""
    total = sum(lengths)
    linear = 2 * total * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * MLP)
    attention = sum(2 * 2 * n * n * HIDDEN for n in lengths)
    return layers * (linear + attention) + 2 * total * 3 * PATCH * PATCH * HIDDEN


def matmul_rate(total: int, repeats: int) -> float:
    """torch.matmul fp32 FLOP/s on the layer's own linear shapes (no bias, no activation): the machine's ceiling.

    Both weight layouts are timed (`x @ W` with W (in, out) row-major, and `x @ W.T` with W (out, in) as
    nn.Linear stores it); the faster one is the ceiling."""
    x, h = torch.randn(total, HIDDEN), torch.randn(total, MLP)
    shapes = [(x, HIDDEN, HIDDEN)] * 4 + [(x, HIDDEN, MLP), (h, MLP, HIDDEN)]
    plain = [(a, torch.randn(k, n)) for a, k, n in shapes]
    transposed = [(a, torch.randn(n, k).T) for a, k, n in shapes]
    seconds = interleaved_medians({
        "x @ W": lambda: [torch.matmul(a, w) for a, w in plain],
        "x @ W.T": lambda: [torch.matmul(a, w) for a, w in transposed],
    }, repeats)  # fmt: skip
    return 2 * total * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * MLP) / min(seconds.values())


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any op returns (proof that no (total x total) score matrix is built)."""

    def __init__(self):
        super().__init__()
        self.numel, self.shape, self.op = 0, None, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.shape, self.op = t.numel(), tuple(t.shape), str(func)
        return out


def rss_peak_bytes() -> int:
    """This process's peak RSS (VmHWM). Not getrusage's ru_maxrss: on Linux that carries over from the parent across
    fork + exec, so a child started by a big process would report the parent's peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def native_image(ours, stock, gen, repeats: int) -> None:
    """Section 1: one 980x980 image, ours vs stock SigLIP."""
    image = torch.randn(1, 3, IMAGE, IMAGE, generator=gen)
    native = make_pack([(SIDE, SIDE)], gen)
    native["packed_pixel_values"] = repo_code.image_processing().patchify(image[0], PATCH)  # the one patch layout
    diff = (ours(**native).last_hidden_state - stock(pixel_values=image).last_hidden_state[0]).abs().max().item()
    t = interleaved_times({"stock": lambda: stock(pixel_values=image), "ours": lambda: ours(**native)}, repeats)
    print("### 1. One 980x980 image (4900 patches)\n")
    print("| model | time / stock: median (fastest run) | max abs diff vs stock |\n| --- | --- | --- |")
    print("| transformers SiglipVisionModel (sdpa) | 1.00 | - |")
    ratio = statistics.median(t["ours"]) / statistics.median(t["stock"])
    print(f"| ours (sdpa, packed API) | {ratio:.3f} ({min(t['ours']) / min(t['stock']):.3f}) | {diff:.1e} |\n")


def mixed_pack(ours, gen, layers: int, repeats: int) -> tuple[dict, list[int], float]:
    """Section 2: the mixed pack, ours packed vs image by image vs Siglip2 padded. Returns (pack, lengths, seconds)."""
    pack = make_pack(MIXED_GRIDS, gen)
    singles = split_pack(pack, MIXED_GRIDS)
    lengths = [h * w for h, w in MIXED_GRIDS]
    siglip2_config = transformers.Siglip2VisionConfig(
        hidden_size=HIDDEN, intermediate_size=MLP, num_attention_heads=HEADS, num_hidden_layers=layers,
        patch_size=PATCH, num_patches=SIDE * SIDE, vision_use_head=False,
    )  # fmt: skip
    siglip2_config._attn_implementation = "sdpa"
    siglip2 = transformers.Siglip2VisionModel(siglip2_config).eval()
    longest = max(lengths)
    padded = torch.zeros(len(lengths), longest, 3 * PATCH * PATCH)
    mask = torch.zeros(len(lengths), longest, dtype=torch.long)
    for i, single in enumerate(singles):
        padded[i, : lengths[i]] = single["packed_pixel_values"]
        mask[i, : lengths[i]] = 1
    shapes = torch.tensor(MIXED_GRIDS)
    t = interleaved_medians({
        "packed": lambda: ours(**pack),
        "single": lambda: [ours(**s) for s in singles],
        "siglip2": lambda: siglip2(pixel_values=padded, pixel_attention_mask=mask, spatial_shapes=shapes),
    }, repeats)  # fmt: skip
    flops_packed = analytic_flops(lengths, layers)
    flops_padded = analytic_flops([longest] * len(lengths), layers)
    print(f"### 2. Mixed pack {lengths} ({sum(lengths)} patches)\n")
    print("| run | time / ours packed | analytic GFLOP |\n| --- | --- | --- |")
    print(f"| ours, one packed forward | 1.00 | {flops_packed / 1e9:.0f} |")
    print(f"| ours, image by image | {t['single'] / t['packed']:.2f} | {flops_packed / 1e9:.0f} |")
    print(f"| Siglip2VisionModel (NaFlex), padded batch + mask | {t['siglip2'] / t['packed']:.2f} | "
          f"{flops_padded / 1e9:.0f} |\n")  # fmt: skip

    return pack, lengths, t["packed"]


def flop_rate(lengths: list[int], packed_seconds: float, layers: int, repeats: int) -> None:
    """Section 3: the packed forward's FLOP rate against torch.matmul on the same shapes."""
    flops_packed = analytic_flops(lengths, layers)
    achieved = flops_packed / packed_seconds
    ceiling = matmul_rate(sum(lengths), repeats)
    print("### 3. Achieved FLOP rate of the packed forward\n")
    print("| | GFLOP/s | share of matmul |\n| --- | --- | --- |")
    print(f"| torch.matmul fp32 on the layer's linear shapes (faster weight layout) | {ceiling / 1e9:.0f} | 100% |")
    print(f"| ours, mixed pack (linear + attention FLOPs) | {achieved / 1e9:.0f} | {100 * achieved / ceiling:.0f}% |\n")



def bf16_on_this_cpu(config, ours, pack, lengths, reference, gen, repeats: int) -> None:
    """Section 4: bf16 vs fp32 on this CPU, the whole tower and one Linear."""
    ours_bf16 = model_mod.SiglipVisionModel(config).eval()
    ours_bf16.load_state_dict(ours.state_dict())
    ours_bf16.to(torch.bfloat16)
    bf16_out = ours_bf16(**pack).last_hidden_state.float()
    t = interleaved_medians({"fp32": lambda: ours(**pack), "bf16": lambda: ours_bf16(**pack)}, max(2, repeats // 2))
    cos = torch.nn.functional.cosine_similarity(bf16_out.double().flatten(), reference.double().flatten(), dim=0).item()
    x32 = torch.randn(sum(lengths), HIDDEN, generator=gen)
    fc32 = torch.nn.Linear(HIDDEN, MLP).eval()
    fc16 = torch.nn.Linear(HIDDEN, MLP).eval().to(torch.bfloat16)
    x16 = x32.to(torch.bfloat16)
    lin = interleaved_medians({"fp32": lambda: fc32(x32), "bf16": lambda: fc16(x16)}, repeats)
    print(f"### 4. bf16 on this CPU (mixed pack): {cpu.bf16_support()}\n")
    print("| dtype | whole tower: time / fp32 | one MLP Linear: time / fp32 | max abs diff vs fp32 | cosine vs fp32 |")
    print("| --- | --- | --- | --- | --- |")
    print("| fp32 | 1.00 | 1.00 | - | - |")
    print(f"| bf16 | {t['bf16'] / t['fp32']:.2f} | {lin['bf16'] / lin['fp32']:.2f} | "
          f"{(bf16_out - reference).abs().max().item():.2e} | {cos:.6f} |\n")  # fmt: skip
    advice = "load in bf16 (faster here)" if t["bf16"] < t["fp32"] else "load in float32 (bf16 is slower here)"
    print(f"CPU users on this kind of CPU: {advice}.\n")



def memory(ours, pack, lengths, layers: int) -> None:
    """Section 5: peak RSS in a fresh process and the largest tensor any op returns."""
    total = sum(lengths)
    with LargestAllocation() as largest:
        ours(**pack)
    probe = subprocess.run([sys.executable, __file__, "--memory-probe", "--layers", str(layers)],
                           capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    model_gib, forward_gib = float(probe[0]), float(probe[1])
    print("### 5. Memory (mixed pack)\n")
    print("| | value |\n| --- | --- |")
    print(f"| peak RSS of a fresh process: after building the model / during the packed forward | "
          f"{model_gib:.2f} GiB / {forward_gib:.2f} GiB (+{forward_gib - model_gib:.2f} GiB for the forward) |")  # fmt: skip
    print(f"| largest tensor any op returned | {largest.shape} = {largest.numel / 1e6:.1f} M elements ({largest.op}) |")
    print(f"| a (total x total) score matrix would be | ({total}, {total}) = {total * total / 1e6:.1f} M elements per head |")
    print(f"| largest / (total x total) | {largest.numel / (total * total):.3f} |\n")



def compile_section(ours, pack, reference, repeats: int) -> None:
    """Section 6: torch.compile -- graph breaks, compile time, speed."""
    from torch import _dynamo

    _dynamo.reset()
    explanation = _dynamo.explain(ours)(**pack)
    compiled = torch.compile(ours)
    start = time.perf_counter()
    compiled_out = compiled(**pack).last_hidden_state
    compile_seconds = time.perf_counter() - start
    t = interleaved_medians({"eager": lambda: ours(**pack), "compiled": lambda: compiled(**pack)}, max(2, repeats // 2))
    print("### 6. torch.compile (mixed pack)\n")
    print("| | value |\n| --- | --- |")
    print(f"| graphs / graph breaks | {explanation.graph_count} / {explanation.graph_break_count} |")
    for reason in explanation.break_reasons[:5]:
        print(f"| break reason | {str(reason.reason).splitlines()[0][:120]} |")
    print(f"| first call (compile) | {compile_seconds:.0f} s |")
    print(f"| compiled time / eager time | {t['compiled'] / t['eager']:.2f} |")
    print(f"| max abs diff compiled vs eager | {(compiled_out - reference).abs().max().item():.1e} |\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--native-only", action="store_true", help="run section 1 only")
    parser.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)  # section 5's subprocess
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    gen = torch.Generator().manual_seed(0)
    if args.memory_probe:  # only our model and the pack in this process: print peak RSS before / during the forward
        ours = model_mod.SiglipVisionModel(ours_config(args.layers)).eval()
        pack = make_pack(MIXED_GRIDS, gen)
        before = rss_peak_bytes()
        ours(**pack)
        print(before / 2**30, rss_peak_bytes() / 2**30)
        return 0
    config, ours, stock = build_models(args.layers)
    print(f"CPU: {cpu.describe()}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads; "
          f"so400m width (hidden {HIDDEN}, {HEADS} heads, MLP {MLP}), {args.layers} layers, fp32, "
          f"median of {args.repeats}\n")  # fmt: skip
    native_image(ours, stock, gen, args.repeats)
    if args.native_only:
        return 0
    pack, lengths, packed_seconds = mixed_pack(ours, gen, args.layers, args.repeats)
    flop_rate(lengths, packed_seconds, args.layers, args.repeats)
    reference = ours(**pack).last_hidden_state
    bf16_on_this_cpu(config, ours, pack, lengths, reference, gen, args.repeats)
    memory(ours, pack, lengths, args.layers)
    if not args.skip_compile:
        compile_section(ours, pack, reference, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
