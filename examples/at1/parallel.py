"""Process group setup, precision choice and FSDP2 sharding.

The same code path runs on CUDA (NCCL) and on CPU (gloo): torch 2.11's `fully_shard`
works on CPU device meshes, so no DDP fallback is needed. The precision comes from
`choose_precision`: bf16 compute on sm80+ GPUs, fp16 with a gradient scaler on older
ones, fp32 on CPU; master weights, optimizer state and gradient reduction stay fp32.

Without WORLD_SIZE in the environment (plain `python train.py`) there is no process
group and the model is not wrapped: parameters are ordinary tensors, and everything
below treats them as a one-rank shard (mixed precision is then torch.autocast).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    sharded: bool  # True when the model is wrapped with fully_shard
    owns_process_group: bool  # we created it, so we destroy it
    # HSDP: parameters are replicated over `replicas` groups of world_size/replicas
    # ranks (one group per node) and sharded within a group. 1: plain FSDP.
    replicas: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard_size(self) -> int:
        return self.world_size // self.replicas


@dataclass(frozen=True)
class Precision:
    """What the forward and backward passes compute in. Parameters (the master copy),
    optimizer state and gradient reduction are fp32 in every case."""

    name: str  # "bf16", "fp16" or "fp32"
    compute_dtype: torch.dtype | None  # None: fp32, no mixed precision
    grad_scaler: bool  # fp16 gradients underflow without loss scaling
    reason: str

    def describe(self) -> str:
        extra = ", fp32 master weights and gradient reduction" if self.compute_dtype is not None else ""
        scaler = ", loss scaling" if self.grad_scaler else ""
        return f"{self.name} ({self.reason}{extra}{scaler})"


def choose_precision(device: torch.device | str, requested: str = "auto",
                     capability: tuple[int, int] | None = None, gpu_name: str | None = None) -> Precision:
    """The decision table. `capability` and `gpu_name` default to the CUDA device's;
    tests pass them in."""
    device = torch.device(device)
    if requested not in PRECISIONS:
        raise ValueError(f"--precision {requested!r}: expected one of {', '.join(PRECISIONS)}")
    if device.type != "cuda":
        if requested in ("auto", "fp32"):
            return Precision("fp32", None, False, f"{device.type}" if requested == "auto" else f"{device.type}, asked for")
        # Runs (FSDP2 and autocast support both on CPU), slowly: for tests.
        return Precision(requested, _DTYPES[requested], requested == "fp16", f"asked for on {device.type}")
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    if gpu_name is None:
        gpu_name = torch.cuda.get_device_name(device)
    where = f"{gpu_name}, sm_{capability[0]}{capability[1]}"
    bf16_capable = capability >= (8, 0)
    if requested == "auto":
        if bf16_capable:
            return Precision("bf16", torch.bfloat16, False, f"{where}: bf16 tensor cores")
        return Precision("fp16", torch.float16, True, f"{where}: no bf16 tensor cores before sm_80")
    if requested == "bf16" and not bf16_capable:
        raise ValueError(f"--precision bf16: {where} has no bf16 tensor cores (sm_80 or newer needed); "
                         f"use --precision fp16 or auto")
    return Precision(requested, _DTYPES[requested], requested == "fp16", f"{where}: asked for")


@dataclass(frozen=True)
class ParallelOptions:
    """How the model is sharded and run; none of it changes the parameters' names or
    what is computed (only speed and memory)."""

    precision: Precision
    # Free each block's gathered parameters after its forward pass (and gather again
    # for backward); False keeps them until backward: less communication, more memory.
    reshard_after_forward: bool = True
    compile: bool = False  # torch.compile each transformer block
    activation_checkpointing: bool = False  # recompute each block's activations in backward


def setup(device_choice: str = "auto", hsdp: bool = False, collective_timeout_s: float | None = None) -> DistContext:
    """`collective_timeout_s`: how long a collective may wait (torch's default: 10 min on
    NCCL, 30 on gloo); an outer step holds the group's other ranks in a broadcast while
    rank 0 waits for the other groups, which may take longer."""
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
        extra = {"timeout": datetime.timedelta(seconds=collective_timeout_s)} if collective_timeout_s else {}
        dist.init_process_group(backend=backend, init_method="env://", device_id=device if device.type == "cuda" else None, **extra)
        owns = True
    rank, world = dist.get_rank(), dist.get_world_size()
    replicas = hsdp_replicas(world, local_world, rank == 0) if hsdp else 1
    return DistContext(rank, world, local_rank, local_world, device, sharded=True, owns_process_group=owns, replicas=replicas)


def hsdp_replicas(world_size: int, local_world_size: int, announce: bool) -> int:
    """HSDP replicates across nodes and shards within one: world_size/LOCAL_WORLD_SIZE
    replicas. Falls back to plain FSDP (1) when that does not make a 2-D mesh."""
    if local_world_size <= 0 or world_size % local_world_size or world_size == local_world_size:
        if announce:
            print(f"note: --hsdp needs several nodes of LOCAL_WORLD_SIZE ranks each; {world_size} rank(s) with "
                  f"LOCAL_WORLD_SIZE {local_world_size}: plain FSDP over all ranks", flush=True)
        return 1
    if announce:
        print(f"HSDP: {world_size // local_world_size} replicas x {local_world_size} shards "
              f"(gradients reduce-scattered within a node, all-reduced across nodes)", flush=True)
    return world_size // local_world_size


def teardown(ctx: DistContext, *, completed: bool = True) -> None:
    """Leave the process group. After a normal finish every rank first meets the
    others: a gloo rank that tears its group down while a peer is still inside a
    collective or its own teardown makes that peer abort ("terminate called without
    an active exception"). After an error there is no barrier, it could hang."""
    if ctx.owns_process_group and dist.is_initialized():
        if completed:
            dist.barrier()
        dist.destroy_process_group()


def apply_options(model: torch.nn.Module, options: ParallelOptions) -> None:
    """The per-block options that do not depend on sharding."""
    for block in model.blocks:
        block.checkpoint_activations = options.activation_checkpointing
        if options.compile:
            # Per block (FSDP2's hooks stay outside the compiled region); the blocks are
            # identical in shape, so they share one compiled graph.
            block.compile()


def shard_model(model: torch.nn.Module, ctx: DistContext, options: ParallelOptions | None = None) -> torch.nn.Module:
    """FSDP2: each block is its own unit (its parameters are gathered just before it
    runs and freed after), the rest of the model forms the root unit."""
    options = options or ParallelOptions(choose_precision(ctx.device))
    apply_options(model, options)
    if not ctx.sharded:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if ctx.replicas > 1:
        mesh = init_device_mesh(ctx.device.type, (ctx.replicas, ctx.shard_size), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    compute = options.precision.compute_dtype
    block_policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32 if compute else None)
    # The root's inputs are not cast: sigma must reach the Fourier features in fp32
    # (in bf16 0.97 becomes 0.9688, a phase error of ~8 rad at the highest frequency).
    # The model casts latents and text to its parameter dtype itself.
    root_policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32 if compute else None,
                                       cast_forward_inputs=False)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=block_policy, reshard_after_forward=options.reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=root_policy)
    return model


def make_grad_scaler(precision: Precision, ctx: DistContext):
    """A loss scaler for fp16, None otherwise. Sharded: ShardedGradScaler, whose
    unscale_ all-reduces found-inf so every rank skips the same steps."""
    if not precision.grad_scaler:
        return None
    if ctx.sharded:
        import warnings

        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        # Its found-inf flag meets DTensor gradients as an implicitly replicated tensor;
        # torch warns about that on every step, and it is what we want.
        warnings.filterwarnings("ignore", message="Found a non-scalar tensor with numel=1")
        return ShardedGradScaler(device=ctx.device.type)
    return torch.amp.GradScaler(ctx.device.type)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a parameter (the whole tensor when not sharded)."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_of_full(full: torch.Tensor, like: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's piece of a full tensor, split the way FSDP2 splits `like`
    (torch.chunk along the sharded dim over each sharded mesh dimension, empty pieces
    for ranks past the last chunk; replicated mesh dimensions keep the whole). `rank`
    and `world_size` are kept for callers; the mesh coordinate of `like` decides."""
    if not isinstance(like, DTensor):
        return full
    mesh = like.device_mesh
    coordinate = mesh.get_coordinate()
    piece = full
    for mesh_dim, placement in enumerate(like.placements):
        if isinstance(placement, Shard):
            dim, count, index = placement.dim, mesh.size(mesh_dim), coordinate[mesh_dim]
            chunks = piece.chunk(count, dim=dim)
            if index < len(chunks):
                piece = chunks[index]
            else:
                shape = list(piece.shape)
                shape[dim] = 0
                piece = piece.new_empty(shape)
    return piece


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
    from torch.distributed.fsdp import FSDPModule

    # Every unit: with reshard_after_forward=False the blocks stay gathered too.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
