"""One-command GPU check: bf16 backends vs fp32 eager, packing on the GPU, tokens/s and MFU.

    python benchmarks/gpu_check.py [--layers 26] [--repeats 10] [--peak-tflops 989]

Runs as it is on a bare CUDA machine with torch >= 2.1 and transformers 4.49 / 5.x (no network, flash-attn
optional). Full BAGEL-7B-MoT ViT shape (so400m/14, 980 px grid, rope=False, random weights), a mixed pack
[4900, 1024, 2304, 576] patches. Checks (DESIGN.md bounds): every bf16 path vs fp32 eager, cosine >= 0.9999 and
max|diff| <= 5e-2; fp32 sdpa vs fp32 eager (TF32 off) <= 1e-4; packed == per-image in bf16. Then tokens/s and
MFU (analytic FLOPs / time / the GPU's dense bf16 peak) of each bf16 path. Prints markdown; exit code 1 if a
check fails. Takes about a minute on one H100.
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import cfg_mod, model_mod  # noqa: E402  (imports the remote-code files as a package)

GRIDS = [(70, 70), (32, 32), (48, 48), (24, 24)]
SIDE = 70
# dense bf16 peak in TFLOP/s, by a substring of torch.cuda.get_device_name()
PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0, "4090": 165.0}


def make_pack(grids, device, gen):
    pixels, positions, lengths = [], [], []
    for h, w in grids:
        pixels.append(torch.randn(h * w, 588, generator=gen))
        positions.append((torch.arange(h)[:, None] * SIDE + torch.arange(w)[None, :]).flatten())
        lengths.append(h * w)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    pack = dict(packed_pixel_values=torch.cat(pixels), packed_flattened_position_ids=torch.cat(positions),
                cu_seqlens=cu, max_seqlen=max(lengths))  # fmt: skip
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in pack.items()}, lengths


def flops(lengths, layers, hidden=1152, mlp=4304):
    total = sum(lengths)
    per_layer = 2 * total * (4 * hidden * hidden + 2 * hidden * mlp) + sum(4 * n * n * hidden for n in lengths)
    return layers * per_layer + 2 * total * 588 * hidden


def cuda_time(fn, repeats):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=26)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak; guessed from the GPU name")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_grad_enabled(False)
    device = torch.device("cuda")
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in PEAKS.items() if k in name), None)
    import transformers

    print(f"{name}; torch {torch.__version__}; transformers {transformers.__version__}; "
          f"flash-attn: {model_mod.flash_attn_varlen_func is not None}; torch varlen: {model_mod.varlen_attn is not None}\n")  # fmt: skip

    config = cfg_mod.SiglipNaViTConfig(hidden_size=1152, intermediate_size=4304, num_attention_heads=16,
                                       num_hidden_layers=args.layers, patch_size=14, image_size=980, rope=False)  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model_mod.SiglipVisionModel(config).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    pack, lengths = make_pack(GRIDS, device, gen)
    reference = model(**pack).last_hidden_state.float()

    failures = []
    rows = []

    def check(label, out, cos_min, diff_max):
        out = out.float()
        cos = F.cosine_similarity(out.flatten(), reference.flatten(), dim=0).item()
        diff = (out - reference).abs().max().item()
        ok = cos >= cos_min and diff <= diff_max
        rows.append(f"| {label} | {cos:.6f} | {diff:.2e} | {'ok' if ok else 'FAIL'} |")
        if not ok:
            failures.append(label)

    config._attn_implementation = "sdpa"
    check("fp32 sdpa (per-image SDPA) vs fp32 eager", model(**pack).last_hidden_state, 0.999999, 1e-4)
    bf16 = model_mod.SiglipVisionModel(config).to(device).eval()
    bf16.load_state_dict(model.state_dict())
    bf16.to(torch.bfloat16)
    paths = {"sdpa": "sdpa"}
    if model_mod.flash_attn_varlen_func is not None:
        paths["flash_attention_2"] = "flash_attention_2"
    timing = {}
    for label, impl in paths.items():
        bf16.config._attn_implementation = impl
        kernel = model_mod.select_attention_kernel(impl, device, torch.bfloat16, 0.0)
        out = bf16(**pack).last_hidden_state
        check(f"bf16 {impl} ({kernel}) vs fp32 eager", out, 0.9999, 5e-2)
        # packing is invisible on the GPU too
        singles, start = [], 0
        for n in lengths:
            one = {k: v for k, v in pack.items()}
            one["packed_pixel_values"] = pack["packed_pixel_values"][start : start + n]
            one["packed_flattened_position_ids"] = pack["packed_flattened_position_ids"][start : start + n]
            one["cu_seqlens"] = torch.tensor([0, n], dtype=torch.int32, device=device)
            one["max_seqlen"] = n
            singles.append(bf16(**one).last_hidden_state)
            start += n
        diff = (torch.cat(singles).float() - out.float()).abs().max().item()
        rows.append(f"| bf16 {impl}: packed vs per-image | - | {diff:.2e} | {'ok' if diff <= 5e-2 else 'FAIL'} |")
        if diff > 5e-2:
            failures.append(f"{impl} packing")
        timing[f"bf16 {impl} ({kernel})"] = cuda_time(lambda: bf16(**pack), args.repeats)
    bf16.config._attn_implementation = "sdpa"
    timing["bf16 sdpa, validate_inputs=False"] = cuda_time(lambda: bf16(**pack, validate_inputs=False), args.repeats)
    model.config._attn_implementation = "sdpa"
    timing["fp32 sdpa (per-image SDPA)"] = cuda_time(lambda: model(**pack), max(3, args.repeats // 2))

    print(f"### Accuracy ({args.layers} layers, pack {lengths})\n")
    print("| check | cosine | max abs diff | |\n| --- | --- | --- | --- |")
    print("\n".join(rows) + "\n")
    total_flops = flops(lengths, args.layers)
    print(f"### Throughput (median of {args.repeats}; {total_flops / 1e12:.2f} TFLOP per forward)\n")
    print(f"| path | ms / forward | patches/s | MFU (bf16 peak {peak or '?'} TFLOP/s) |\n| --- | --- | --- | --- |")
    for label, seconds in timing.items():
        mfu = f"{100 * total_flops / seconds / (peak * 1e12):.1f}%" if peak else "-"
        print(f"| {label} | {seconds * 1e3:.1f} | {sum(lengths) / seconds:,.0f} | {mfu} |")
    print(f"\n{'ALL CHECKS PASSED' if not failures else 'FAILED: ' + ', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
