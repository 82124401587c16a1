"""PyTorch's own distributed engine, as `torchrun` sets it up: DDP or FSDP2, rank-0 I/O.

`torchrun` exports RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR/PORT); `setup()` reads
them and joins the process group (gloo on CPU, nccl on GPU). Without them it is one process
and nothing distributed happens. Only trainable (adapter) parameters get gradients, so DDP
all-reduces adapter gradients only; frozen base weights are never communicated.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: its rank among `world_size` and the device it uses."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this run called init_process_group, so it tears it down

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup() -> DistEnv:
    """Join the process group when launched by torchrun; a single-process env otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size <= 1:
        return DistEnv(device=device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, owns)


def teardown(env: DistEnv) -> None:
    """Leave the process group if `setup` created it (a caller's own group stays)."""
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_sum(env: DistEnv, values: list[float]) -> list[float]:
    """Element-wise sum of `values` over ranks (float64, so counts stay exact)."""
    if not env.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(env: DistEnv, obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(env: DistEnv, obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_model(model: nn.Module, env: DistEnv, fsdp: bool = False) -> nn.Module:
    """The model to train: itself (one process), DDP, or FSDP2 (`fully_shard`).

    DDP registers gradient hooks only on parameters with requires_grad, so only the adapter
    (and `modules_to_save`) gradients are all-reduced. FSDP2 shards each transformer block
    and then the root; frozen and trainable parameters may share a block.
    """
    model.to(env.device)
    if fsdp:
        if not env.distributed:
            from ..errors import ConfigError

            raise ConfigError("fsdp=True needs several processes; launch with torchrun")
        from torch.distributed.fsdp import fully_shard

        for block in _blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    if not env.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: a transformers model's `_no_split_modules`
    classes, else the items of every `nn.ModuleList` (the layer stacks)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if found:
        return found
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return [block for blocks in lists for block in blocks if any(True for _ in block.parameters())]


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 modules are the model itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def full_params(model: nn.Module, fsdp: bool) -> Iterator[None]:
    """Under FSDP2, all-gather every sharded parameter for the duration (e.g. to save the
    adapter from rank 0), then shard again; a no-op otherwise. Collective."""
    if not fsdp:
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
