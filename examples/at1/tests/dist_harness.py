"""Code run inside processes spawned by the tests: a real gloo process group on
127.0.0.1 with env:// rendezvous, as torchrun would set it up."""
from __future__ import annotations

import os
import socket

import numpy as np
import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world_size: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    os.environ.pop("DROVER_AGENT_SOCKET", None)
    torch.set_num_threads(1)


def global_batches(steps: int, global_batch: int, latent_size: int, text_dim: int, seed: int = 7,
                   dtype: torch.dtype = torch.float32):
    """The same global batches and noise for every world size."""
    from objective import NoiseDraw, NoiseSource

    rng = np.random.default_rng(seed)
    noise = NoiseSource(seed=seed, text_drop_prob=0.15)
    batches = []
    for _ in range(steps):
        x0 = torch.from_numpy(rng.standard_normal((global_batch, 4, latent_size, latent_size), dtype=np.float32))
        text = torch.from_numpy(rng.standard_normal((global_batch, text_dim), dtype=np.float32))
        draw = noise.draw(global_batch, (4, latent_size, latent_size))
        batches.append((x0.to(dtype), text.to(dtype), NoiseDraw(draw.sigma.to(dtype), draw.eps.to(dtype), draw.keep_text.to(dtype))))
    return batches


# Equivalence runs are in float64. Different world sizes sum gradients in a different
# order; in float32 that rounding is ~1e-7 relative, and Adam, which divides each update
# by the gradient's own magnitude, turns it into weight differences of up to ~1e-5 after
# two steps, how much depending on the CPU's kernels. In float64 the same rounding is
# ~1e-16 relative, so the two paths agree to ~1e-12 and a tight tolerance is meaningful.
EQUIVALENCE_DTYPE = torch.float64
EQUIVALENCE_LR = 1e-3


def equivalence_tolerance(lr: float = EQUIVALENCE_LR) -> float:
    """Absolute tolerance on weights after a few Adam steps: a millionth of one step's
    largest update (Adam moves each weight by at most about lr per step). Float64
    rounding stays four orders of magnitude below it; a real difference in what the
    two paths compute (a missing average, a wrong batch slice, a skipped shard) is a
    sizeable fraction of lr."""
    return 1e-6 * lr


def run_fixed_steps(ctx, steps: int = 2, global_batch: int = 8, dtype: torch.dtype = EQUIVALENCE_DTYPE,
                    order: list[int] | None = None) -> dict:
    """Train `tiny` for a few steps on fixed global batches, this rank taking its slice.
    Returns per-step losses and grad norms and the full parameters afterwards. `order`
    permutes the samples of each global batch (the same samples, summed in another
    order), to check that the tolerance absorbs reduction order."""
    import argparse

    from configs import get_config
    from ema import ShardedEMA
    from objective import NoiseDraw
    from parallel import full_value
    from train import build_model, build_optimizer, train_step

    cfg = get_config("tiny")
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = build_model(cfg, seed=0, ctx=ctx)
    finally:
        torch.set_default_dtype(previous_dtype)
    optimizer = build_optimizer(model, argparse.Namespace(lr=EQUIVALENCE_LR, weight_decay=0.01))
    ema = ShardedEMA(model, 0.999)
    per_rank = global_batch // ctx.world_size
    mine = slice(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)
    losses, grad_norms = [], []
    for step, (x0, text, draw) in enumerate(global_batches(steps, global_batch, cfg.latent_size, cfg.text_dim, dtype=dtype)):
        if order is not None:
            x0, text = x0[order], text[order]
            draw = NoiseDraw(draw.sigma[order], draw.eps[order], draw.keep_text[order])
        local_draw = NoiseDraw(draw.sigma[mine], draw.eps[mine], draw.keep_text[mine])
        loss, grad_norm = train_step(model, optimizer, ema, x0[mine], text[mine], local_draw, EQUIVALENCE_LR, 1.0, step, ctx)
        losses.append(loss)
        grad_norms.append(grad_norm)
    params = {name: full_value(p).detach().clone() for name, p in model.named_parameters()}
    assert all(p.dtype == dtype for p in params.values()), "the equivalence run must train in its own dtype"
    return {"losses": losses, "grad_norms": grad_norms, "params": params}


def fixed_steps_worker(rank: int, world_size: int, port: int, out_path: str) -> None:
    _join(rank, world_size, port)
    from parallel import setup, teardown

    ctx = setup("cpu")
    completed = False
    try:
        result = run_fixed_steps(ctx)
        if rank == 0:
            torch.save({"losses": torch.tensor(result["losses"], dtype=torch.float64),
                        "grad_norms": torch.tensor(result["grad_norms"], dtype=torch.float64),
                        "params": result["params"]}, out_path)
        completed = True
    finally:
        teardown(ctx, completed=completed)


def resume_worker(rank: int, world_size: int, port: int, data_dir: str, ckpt_dir: str, out_path: str) -> None:
    """Uninterrupted run, a run 'preempted' after a checkpoint, and its resumption,
    all in one process group."""
    _join(rank, world_size, port)
    import drover_agent
    from parallel import setup, teardown
    from train import parse_args, train

    ctx = setup("cpu")
    agent = drover_agent.Agent(None, rank=rank, log=open(os.devnull, "w"))
    completed = False
    common = ["--config", "tiny", "--data", data_dir, "--steps", "8", "--batch-size", "8", "--warmup-steps", "2",
              "--val-every", "3", "--val-samples", "16"]
    try:
        full = train(parse_args(common), ctx, agent)
        train(parse_args(common + ["--ckpt-dir", ckpt_dir, "--ckpt-every", "3", "--stop-after-step", "5"]), ctx, agent)
        resumed = train(parse_args(common + ["--resume-dir", os.path.join(ckpt_dir, "3")]), ctx, agent)
        if rank == 0:
            torch.save({"full": torch.tensor([full.losses[s] for s in range(1, 9)], dtype=torch.float64),
                        "resumed": torch.tensor([resumed.losses[s] for s in range(4, 9)], dtype=torch.float64),
                        "full_val": torch.tensor([full.val_losses[s] for s in (3, 6, 8)], dtype=torch.float64),
                        "resumed_val": torch.tensor([resumed.val_losses[s] for s in (6, 8)], dtype=torch.float64)},
                       out_path)
        completed = True
    finally:
        teardown(ctx, completed=completed)
