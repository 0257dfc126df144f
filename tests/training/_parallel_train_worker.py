"""One rank of a 2-process data-parallel training check (DDP or FSDP2), launched with torchrun.

    python -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node 2 \
        tests/training/_parallel_train_worker.py --mode {ddp,fsdp2} [--grad-ckpt] --out DIR

(`--mode ddp fsdp2` runs both modes one after the other in the same launch: each torchrun start costs
seconds of interpreter and import time.)

Every rank builds the same tiny model (fixed seed, every parameter randomised) and trains it for two SGD
steps on ITS OWN pack (several images of different sizes; the packs differ between ranks). For each pass
(rope off/on; with --grad-ckpt also with non-reentrant gradient checkpointing) each rank saves to
DIR/{mode}_rank{r}.pt: its first-step output, its losses, the full (rank-averaged) gradients of the first
step and the full parameters after the second step, plus facts showing the wrapping really happened.

`single_process_reference(rope)` computes the same quantities in one process without torch.distributed;
tests/training/test_training_parallel.py compares the two. The module is importable: the pack, loss and model
definitions live here once and are shared by both sides.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch

from siglip_navit_tools.testing import make_model, make_pack, tiny_config

WORLD_SIZE = 2
# Different packs per rank: several images of different (h, w) patch grids on a 6x6 max grid.
RANK_GRIDS = {
    0: [(3, 5), (6, 6), (2, 2)],
    1: [(6, 4), (1, 6), (5, 5), (2, 3)],
}
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 0.01
STEPS = 2


def config_for(rope: bool):
    return tiny_config(rope=rope, num_hidden_layers=3)


def build_model(rope: bool) -> torch.nn.Module:
    """Identical on every rank: fixed seed, every parameter random, train mode (dropout is 0)."""
    return make_model(config_for(rope), attn="sdpa", seed=7).train()


def rank_pack(rank: int, rope: bool) -> dict:
    return make_pack(RANK_GRIDS[rank], config_for(rope), seed=100 + rank)


def rank_loss(out: torch.Tensor, rank: int) -> torch.Tensor:
    """A fixed random linear functional of the packed features, normalised by the rank's patch count."""
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(200 + rank), dtype=out.dtype)
    return (out * weights).sum() / out.shape[0]


def make_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def enable_checkpointing(model) -> list[str]:
    """Non-reentrant activation checkpointing through transformers' API; returns any deprecation warnings.

    transformers 5.x renamed `gradient_checkpointing_enable` to `activation_checkpointing_enable` (the old
    name emits a FutureWarning); 4.x only has the old name. Non-reentrant is what PyTorch recommends and what
    FSDP2 is designed around (reentrant also needs an input that requires grad)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]


def single_process_reference(rope: bool) -> dict:
    """What data parallelism must reproduce: per-rank gradients averaged, then the same optimizer steps."""
    model = build_model(rope)
    optimizer = make_optimizer(model.parameters())
    params = dict(model.named_parameters())
    result = {"outputs": {}, "losses": {r: [] for r in RANK_GRIDS}}
    for step in range(STEPS):
        per_rank = []
        for rank in RANK_GRIDS:
            model.zero_grad(set_to_none=True)
            out = model(**rank_pack(rank, rope)).last_hidden_state
            loss = rank_loss(out, rank)
            loss.backward()
            per_rank.append({n: p.grad.clone() for n, p in params.items()})
            result["losses"][rank].append(loss.detach())
            if step == 0:
                result["outputs"][rank] = out.detach()
        for name, p in params.items():
            p.grad = sum(g[name] for g in per_rank) / WORLD_SIZE
        if step == 0:
            result["grads"] = {n: p.grad.clone() for n, p in params.items()}
            result["rank_grads"] = per_rank
        optimizer.step()
    result["params"] = {n: p.detach().clone() for n, p in params.items()}
    return result


def run_pass(mode: str, rope: bool, grad_ckpt: bool, rank: int) -> dict:
    from torch.distributed.tensor import DTensor

    model = build_model(rope)
    record = {"deprecation_warnings": []}
    if grad_ckpt:
        record["deprecation_warnings"] = enable_checkpointing(model)
    record["ckpt_flag"] = bool(model.vision_model.encoder.gradient_checkpointing)
    layers = model.vision_model.encoder.layers
    calls = [0]
    for layer in layers:  # counts layer forwards: checkpointing re-runs each one during backward
        layer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))

    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model)  # CPU: no device_ids
        inner = wrapped.module
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        for layer in layers:  # one FSDP unit per encoder layer ...
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)  # ... and the root (embeddings, post_layernorm)
        wrapped = inner = model
        local = sum(p.to_local().numel() for p in model.parameters())
        record["local_numel"], record["global_numel"] = local, sum(p.numel() for p in model.parameters())
        record["all_dtensor"] = all(isinstance(p, DTensor) for p in model.parameters())
        record["layer_classes"] = [type(layer).__name__ for layer in layers]

    def full(t: torch.Tensor) -> torch.Tensor:
        return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()

    optimizer = make_optimizer(wrapped.parameters())
    pack = rank_pack(rank, rope)
    record["losses"] = []
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        out = wrapped(**pack).last_hidden_state
        loss = rank_loss(out, rank)
        loss.backward()
        record["losses"].append(loss.detach())
        if step == 0:
            record["output"] = out.detach().clone()
            record["grads"] = {n: full(p.grad) for n, p in inner.named_parameters()}  # full_tensor: collective
            record["layer_calls_first_step"] = calls[0]
        optimizer.step()
    record["params"] = {n: full(p) for n, p in inner.named_parameters()}
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["ddp", "fsdp2"], nargs="+", required=True)
    parser.add_argument("--grad-ckpt", action="store_true", help="also run the passes with gradient checkpointing")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != WORLD_SIZE:
        raise SystemExit(f"this check runs on exactly {WORLD_SIZE} processes, got {world}")
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        for mode in args.mode:
            results = {"rank": rank, "world_size": world, "mode": mode, "passes": {}}
            for rope in (False, True):
                for grad_ckpt in ((False, True) if args.grad_ckpt else (False,)):
                    results["passes"][f"rope={rope},ckpt={grad_ckpt}"] = run_pass(mode, rope, grad_ckpt, rank)
                    dist.barrier()
            torch.save(results, args.out / f"{mode}_rank{rank}.pt")
            print(f"rank {rank}: {mode} done ({len(results['passes'])} passes)", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
