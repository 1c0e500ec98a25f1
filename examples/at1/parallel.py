"""Process group setup and FSDP2 sharding.

The same code path runs on CUDA (NCCL, bf16 compute with fp32 master weights and fp32
gradient reduction) and on CPU (gloo, fp32): torch 2.11's `fully_shard` works on CPU
device meshes, so no DDP fallback is needed.

Without WORLD_SIZE in the environment (plain `python train.py`) there is no process
group and the model is not wrapped: parameters are ordinary tensors, and everything
below treats them as a one-rank shard.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    sharded: bool  # True when the model is wrapped with fully_shard
    owns_process_group: bool  # we created it, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_choice: str = "auto") -> DistContext:
    env_world = os.environ.get("WORLD_SIZE")
    if device_choice == "auto":
        device_choice = "cuda" if torch.cuda.is_available() else "cpu"
    if device_choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device_choice == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:
            # Ranks on one node share its cores; oversubscribing them slows every rank.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))

    if env_world is None and not dist.is_initialized():
        return DistContext(0, 1, 0, 1, device, sharded=False, owns_process_group=False)

    owns = False
    if not dist.is_initialized():
        for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise RuntimeError(f"WORLD_SIZE is set but {var} is not: env:// rendezvous needs RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", device_id=device if device.type == "cuda" else None)
        owns = True
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, local_world, device, sharded=True, owns_process_group=owns)


def teardown(ctx: DistContext, *, completed: bool = True) -> None:
    """Leave the process group. After a normal finish every rank first meets the
    others: a gloo rank that tears its group down while a peer is still inside a
    collective or its own teardown makes that peer abort ("terminate called without
    an active exception"). After an error there is no barrier, it could hang."""
    if ctx.owns_process_group and dist.is_initialized():
        if completed:
            dist.barrier()
        dist.destroy_process_group()


def shard_model(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """FSDP2: each block is its own unit (its parameters are gathered just before it
    runs and freed after), the rest of the model forms the root unit."""
    if not ctx.sharded:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    if ctx.device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()  # fp32 on CPU: exact comparisons in tests
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a parameter (the whole tensor when not sharded)."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_of_full(full: torch.Tensor, like: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's piece of a full tensor, split the way FSDP2 splits `like`
    (torch.chunk along dim 0, empty pieces for ranks past the last chunk)."""
    if not isinstance(like, DTensor):
        return full
    chunks = full.chunk(world_size, dim=0)
    return chunks[rank] if rank < len(chunks) else full.new_empty((0, *full.shape[1:]))


def like_param(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Wrap a local shard as a tensor of the same kind (and sharding) as `param`."""
    if isinstance(param, DTensor):
        return DTensor.from_local(local, device_mesh=param.device_mesh, placements=param.placements,
                                  shape=param.shape, stride=param.stride(), run_check=False)
    return local


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.sharded and ctx.world_size > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)  # gloo has no AVG
    return values


def full_value(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def reshard_after_inference(model: torch.nn.Module) -> None:
    """FSDP2 keeps the root module's parameters gathered after a forward pass (the
    backward pass would need them at once). After a forward without backward
    (validation, sampling) free them, so parameters are this rank's shards again."""
    if hasattr(model, "reshard"):
        model.reshard()
