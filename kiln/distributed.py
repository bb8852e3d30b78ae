"""Data parallelism for the training stages: process group set-up, DDP or FSDP2 wrapping, rank helpers.

One process (the default) needs none of this: `init()` returns rank 0 of 1 and every helper is a no-op. With N
processes, the stage task starts them with torchrun (`torchrun_command`), each calls `init()`, wraps its model with
`wrap()`, and takes its rows of every global batch (data/shards.BucketBatches with rank and world_size), so N
processes see exactly the samples, noise and timesteps one process would see with the same global batch.

Strategies: "ddp" replicates the model and all-reduces gradients (small models); "fsdp" is FSDP2's fully_shard per
transformer block and then the root (parameters, gradients and optimizer state sharded: large models).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def ranks() -> Ranks:
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return Ranks()


def init() -> Ranks:
    """Join the process group torchrun describes in the environment (nccl on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return ranks()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_for(device: torch.device, r: Ranks) -> torch.device:
    """One GPU per process: cuda:LOCAL_RANK."""
    return torch.device("cuda", r.local_rank) if device.type == "cuda" and r.distributed else device


def wrap(model: torch.nn.Module, strategy: str, device: torch.device) -> torch.nn.Module:
    """The module the training step calls. DDP returns a wrapper (the raw model keeps the weights); FSDP2 shards
    the model in place (its parameters become DTensors) and returns it."""
    if not ranks().distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # static_graph: the last MMDiT block's text-stream outputs feed nothing, so a few parameters never get
        # gradients; the set is the same every step, which DDP records once instead of searching each step.
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       static_graph=True)
    if strategy == "fsdp":
        shard(model)
        return model
    raise ValueError(f"distributed.strategy must be ddp or fsdp, got {strategy!r}")


def shard(model: torch.nn.Module) -> None:
    """FSDP2: one communication unit per transformer block, then the rest (embedders, norms, projections)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer_blocks:
        fully_shard(block)
    fully_shard(model)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """(b, ...) on each rank -> (world_size * b, ...) in rank order, on every rank."""
    if not ranks().distributed:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on one (e.g. a SIGTERM seen by one process: all must checkpoint together)."""
    if not ranks().distributed:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def average_gradients(model: torch.nn.Module) -> None:
    """Data parallelism by hand for loops DDP's reducer cannot follow (several forwards and backwards per
    optimizer step, as in Diffusion-DPO and GRPO): all-reduce the accumulated gradients once, before the step."""
    if not ranks().distributed:
        return
    world = dist.get_world_size()
    for param in model.parameters():
        if param.grad is not None:  # None on every rank alike (the same graph everywhere)
            dist.all_reduce(param.grad)
            param.grad /= world


def max_across(value: torch.Tensor) -> torch.Tensor:
    """The largest of a per-process value over all processes (a worst case every rank must see, e.g. for logging)."""
    if not ranks().distributed:
        return value.detach()
    value = value.detach().clone().float()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def mean_across(value: torch.Tensor) -> torch.Tensor:
    """The mean of a per-process value over all processes (for logging and for decisions all ranks must share)."""
    if not ranks().distributed:
        return value.detach()
    value = value.detach().clone().float()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def barrier() -> None:
    if ranks().distributed:
        dist.barrier()


def torchrun_command(dist_cfg, module: str, args: list[str]) -> list[str]:
    """The torchrun command line for `python -m module args`. One node: --standalone (a free local port). Several
    nodes: every node runs this same command; c10d rendezvous at dist_cfg.rdzv_endpoint (node 0's host:port)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={dist_cfg.nproc_per_node}"]
    if dist_cfg.nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={dist_cfg.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={dist_cfg.rdzv_endpoint}",
                f"--rdzv-id={dist_cfg.rdzv_id}"]
    return [*cmd, "-m", module, *args]
