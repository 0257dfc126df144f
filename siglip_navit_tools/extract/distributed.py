# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""torchrun helpers: this process's rank and device, and collectives that are no-ops in a world of one.

torchrun / `accelerate launch` set RANK, WORLD_SIZE and LOCAL_RANK; with world_size > 1 the process group is
joined (nccl on CUDA, gloo on CPU), in a key namespace of torchrun's store that is fresh for every attempt (torchrun
`--max-restarts`: `attempt_namespace`). Owns nothing about images, models or files: callers pass plain objects.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ..errors import ToolError, UsageError


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def pick_device(device: Optional[str]) -> torch.device:
    """`device` as given ("cuda" alone: one GPU per process, cuda:LOCAL_RANK), or by default cuda:LOCAL_RANK when
    CUDA is available, else the CPU."""
    if device is not None:
        chosen = check_device(device)
        if chosen.type == "cuda" and chosen.index is None:
            chosen = torch.device("cuda", local_rank() % torch.cuda.device_count())
        return chosen
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def check_device(text: str) -> torch.device:
    """`--device` as a torch.device this machine has; otherwise a UsageError naming it and what there is instead."""
    try:
        chosen = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"--device {text!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if chosen.type == "meta":
        raise UsageError(f"--device {text!r} holds no data (meta tensors have shapes only), so nothing can be encoded "
                         "on it: use cpu, cuda or cuda:N")  # fmt: skip
    if chosen.type == "cpu":
        return chosen
    backend = torch.backends.mps if chosen.type == "mps" else getattr(torch, chosen.type, None)
    if not (hasattr(backend, "is_available") and backend.is_available()):
        built = " (this torch is built without CUDA)" if chosen.type == "cuda" and torch.version.cuda is None else ""
        raise UsageError(f"--device {text!r}: this machine has no {chosen.type} device{built}; use --device cpu, or "
                         "leave --device out (a GPU is used when there is one)")  # fmt: skip
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if chosen.index is not None and chosen.index >= count:
        raise UsageError(f"--device {text!r}: this machine has {count} {chosen.type} device(s), "
                         f"{chosen.type}:0 to {chosen.type}:{count - 1}")  # fmt: skip
    return chosen


@dataclass(frozen=True)
class World:
    """This process's place in the torchrun world."""

    rank: int  # 0 .. size - 1 (RANK)
    size: int  # number of processes (WORLD_SIZE); 1 without torchrun
    device: torch.device  # where this process runs the model


def init_distributed(device: Optional[str], timeout_minutes: float) -> World:
    """This process's World from torchrun's environment; joins the process group when the world has more than one.

    Ranks wait for each other at the start (the model is loaded and the inputs are listed on rank 0 first) and at
    the end (ranks finish their shards at different times): the collectives' timeout is `timeout_minutes`, not
    torch's default (10 minutes for nccl), so waiting is not mistaken for a hang."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    chosen = pick_device(device)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if world_size > 1 and not dist.is_initialized():
        timeout = timedelta(minutes=timeout_minutes)
        store = _attempt_store(rank, world_size, timeout)
        dist.init_process_group(
            backend="nccl" if chosen.type == "cuda" else "gloo", timeout=timeout,
            **({"store": store, "rank": rank, "world_size": world_size} if store is not None else {}),
        )  # fmt: skip
    return World(rank, world_size, chosen)


# A limit of torch 2.13 worked around here: torchrun's agent shares its rendezvous TCPStore with the workers and keeps
# that ONE store for the whole job, across `--max-restarts` attempts (static and c10d rendezvous alike), and env://
# joins it with no per-attempt prefix. A restarted attempt's init_process_group thus finds the dead attempt's keys --
# each rank's gloo address under `default_pg/0//cpu//0/RANK`, nccl's unique id -- and a rank that reads its peer's
# key before the peer rewrites it connects to a dead port ("Gloo connectFullMesh failed ... Connection refused") or
# waits for a peer that never comes (as pytorch/pytorch#135712 reported for 2.5). TORCHELASTIC_RESTART_COUNT cannot
# name the attempt: each node's agent counts its own restarts only. So the ranks agree on a fresh namespace of the
# store themselves (`attempt_namespace`), and the process group and every key of the run live under it.
ATTEMPTS = "siglip_navit_extract/attempts/"


def _attempt_store(rank: int, world_size: int, timeout: timedelta) -> Optional[Any]:
    """The store to join the process group through: None (torch's own env:// rendezvous) unless torchrun's agent
    hosts a store that outlives this attempt (TORCHELASTIC_USE_AGENT_STORE=True); then a namespace of that store
    that no earlier attempt has used."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    agent = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
    )
    namespace = attempt_namespace(dist.PrefixStore(ATTEMPTS, agent), rank, world_size, timeout.total_seconds())
    return dist.PrefixStore(f"{ATTEMPTS}{namespace}/", agent)


def attempt_namespace(store: Any, rank: int, world_size: int, timeout: float, poll: float = 0.05) -> str:
    """A name every rank of this attempt agrees on and no earlier attempt used, through a `store` that may still hold
    earlier attempts' keys. Rank 0 draws it; every other rank publishes a nonce of its own (`join/RANK`) and waits
    for the answer filed under that nonce, which only this attempt's rank 0 can write; rank 0 answers whatever nonce
    each `join/RANK` holds (an earlier attempt's, then this one's) until every rank confirms under the new name."""
    if rank != 0:
        nonce = uuid.uuid4().hex
        store.set(f"join/{rank}", nonce)
        namespace = store.get(f"answer/{rank}/{nonce}").decode()  # waits (the store's timeout)
        store.set(f"joined/{namespace}/{rank}", "1")
        return namespace
    namespace = uuid.uuid4().hex
    others = list(range(1, world_size))
    answered: dict[int, bytes] = {}
    deadline = time.monotonic() + timeout
    while True:
        nonces = store.multi_get([f"join/{r}" for r in others])  # waits until every rank has published one
        fresh = [(r, nonce) for r, nonce in zip(others, nonces) if answered.get(r) != nonce]
        if fresh:
            store.multi_set([f"answer/{r}/{nonce.decode()}" for r, nonce in fresh], [namespace] * len(fresh))
            answered.update(fresh)
        if store.check([f"joined/{namespace}/{r}" for r in others]):
            return namespace
        if time.monotonic() > deadline:
            raise ToolError(f"torch.distributed: not every rank joined within {timeout:.0f} s (--dist-timeout-minutes)")
        time.sleep(poll)


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast(obj: Any, world_size: int) -> Any:
    """Rank 0's `obj`, on every rank."""
    if world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any, world_size: int) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def _shared_store(timeout_minutes: float) -> Any:
    """The key-value store every rank already reaches: the one the process group was initialised with (under
    torchrun, the TCPStore of torchrun's own rendezvous). `_get_default_store` has been there, unchanged, since torch
    1.x; should it go, a client of the TCPStore at MASTER_ADDR:MASTER_PORT (the same store under torchrun)."""
    get = getattr(dist.distributed_c10d, "_get_default_store", None)
    if get is not None:
        try:
            return get()
        except (RuntimeError, ValueError, KeyError):
            pass
    return dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
        timeout=timedelta(minutes=timeout_minutes),
    )  # fmt: skip


class Claims:
    """Positions 0, 1, 2, ... of a list every rank holds identically, handed out in claim order: each position to
    exactly one rank (an atomic `store.add` on one counter), until `total` are out. Keys live under `namespace`
    (unique per run), so a rerun inside the same torchrun store never sees an old counter. In a world of one, a
    local counter."""

    def __init__(self, total: int, namespace: str, world_size: int, timeout_minutes: float = 30.0):
        self.total = total
        self.next_local = 0
        self.store = None
        if world_size > 1:
            self.store = dist.PrefixStore(f"siglip_navit_extract/{namespace}/", _shared_store(timeout_minutes))

    def claim(self) -> Optional[int]:
        """The next unclaimed position, or None when every position is claimed."""
        if self.store is None:
            position, self.next_local = self.next_local, self.next_local + 1
        else:
            position = self.store.add("next", 1) - 1
        return position if position < self.total else None


def rank0_first(fn: Callable[[], Any], rank: int, world_size: int) -> Any:
    """Run `fn` on rank 0, then on the other ranks (they then find rank 0's downloads and caches); a ToolError on
    rank 0 is raised on every rank."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except ToolError as exc:
            error = exc
    error = broadcast(error, world_size)
    if error is not None:
        raise error
    return fn() if rank != 0 else result
