"""Code run inside processes spawned by the tests: a real gloo process group on
127.0.0.1 with env:// rendezvous, as torchrun would set it up."""
from __future__ import annotations

import json
import os
import socket

import numpy as np
import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world_size: int, port: int, local_world_size: int | None = None) -> None:
    local = local_world_size or world_size
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank % local), LOCAL_WORLD_SIZE=str(local),
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
                    order: list[int] | None = None, grad_clip: float = 1.0, weight_decay: float = 0.01,
                    options=None, scaler=None) -> dict:
    """Train `tiny` for a few steps on fixed global batches, this rank taking its slice.
    Returns per-step losses and grad norms, the full parameters, the full EMA, the full
    AdamW moments and the parameter names of each optimizer group afterwards. `order`
    permutes the samples of each global batch (the same samples, summed in another
    order), to check that the tolerance absorbs reduction order."""
    import argparse

    from configs import get_config
    from ema import ShardedEMA
    from objective import NoiseDraw
    from parallel import full_value, like_param
    from train import build_model, build_optimizer, train_step

    cfg = get_config("tiny")
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = build_model(cfg, seed=0, ctx=ctx, options=options)
    finally:
        torch.set_default_dtype(previous_dtype)
    optimizer = build_optimizer(model, argparse.Namespace(lr=EQUIVALENCE_LR, weight_decay=weight_decay))
    ema = ShardedEMA(model, 0.999)
    per_rank = global_batch // ctx.world_size
    mine = slice(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)
    losses, grad_norms = [], []
    precision = options.precision if options is not None else None
    for step, (x0, text, draw) in enumerate(global_batches(steps, global_batch, cfg.latent_size, cfg.text_dim, dtype=dtype)):
        if order is not None:
            x0, text = x0[order], text[order]
            draw = NoiseDraw(draw.sigma[order], draw.eps[order], draw.keep_text[order])
        local_draw = NoiseDraw(draw.sigma[mine], draw.eps[mine], draw.keep_text[mine])
        loss, grad_norm = train_step(model, optimizer, ema, x0[mine], text[mine], local_draw, EQUIVALENCE_LR, grad_clip, step, ctx,
                                     precision=precision, scaler=scaler)
        losses.append(loss)
        grad_norms.append(grad_norm)
    named = dict(model.named_parameters())
    names = {p: name for name, p in named.items()}
    params = {name: full_value(p).detach().clone() for name, p in named.items()}
    ema_full = {name: full_value(like_param(named[name], shadow)).clone() for name, shadow in ema.shadow.items()}
    moments = {f"{names[p]}.{k}": full_value(v).detach().clone() for p, state in optimizer.state.items()
               for k, v in state.items() if k in ("exp_avg", "exp_avg_sq")}
    groups = [{"weight_decay": g["weight_decay"], "params": sorted(names[p] for p in g["params"])} for g in optimizer.param_groups]
    return {"losses": losses, "grad_norms": grad_norms, "params": params, "ema": ema_full, "moments": moments, "groups": groups}


def _save_result(result: dict, out_path: str) -> None:
    torch.save({"losses": torch.tensor(result["losses"], dtype=torch.float64),
                "grad_norms": torch.tensor(result["grad_norms"], dtype=torch.float64),
                **{k: result[k] for k in ("params", "ema", "moments")}}, out_path)
    with open(out_path + ".groups.json", "w") as f:
        json.dump(result["groups"], f)


def load_result(out_path: str) -> dict:
    result = torch.load(out_path, weights_only=True)
    with open(out_path + ".groups.json") as f:
        result["groups"] = json.load(f)
    return result


def fixed_steps_worker(rank: int, world_size: int, port: int, out_path: str) -> None:
    _join(rank, world_size, port)
    from parallel import setup, teardown

    ctx = setup("cpu")
    completed = False
    try:
        result = run_fixed_steps(ctx)
        if rank == 0:
            _save_result(result, out_path)
        completed = True
    finally:
        teardown(ctx, completed=completed)


# The harness variant that the plain equivalence run does not exercise: gradients far
# above the clipping threshold (tiny's first gradients have norm ~1-3), a weight decay
# large enough to move the weights visibly in two steps, and the EMA and AdamW moments
# compared along with the weights.
CLIPPED = {"grad_clip": 0.05, "weight_decay": 0.5}


def variants_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Several runs in one 2-rank process group (one spawn, to keep the suite fast):
    clipped + weight decay with the default FSDP options, the same with activation
    checkpointing and reshard_after_forward=False, an fp16 run whose loss scaler must
    skip a step on every rank when only one rank's gradient shard overflowed, and the
    noise features of a bf16-compute FSDP model."""
    _join(rank, world_size, port)
    from parallel import ParallelOptions, choose_precision, setup, teardown

    ctx = setup("cpu")
    fp32 = choose_precision("cpu")
    completed = False
    try:
        clipped = run_fixed_steps(ctx, **CLIPPED)
        throughput = run_fixed_steps(ctx, **CLIPPED, options=ParallelOptions(fp32, reshard_after_forward=False,
                                                                              activation_checkpointing=True))
        overflow = _overflow_run(ctx)
        features = _bf16_noise_features(ctx)
        if rank == 0:
            _save_result(clipped, os.path.join(out_dir, "clipped.pt"))
            _save_result(throughput, os.path.join(out_dir, "throughput.pt"))
        with open(os.path.join(out_dir, f"overflow.rank{rank}.json"), "w") as f:
            json.dump(overflow, f)
        torch.save(features, os.path.join(out_dir, f"features.rank{rank}.pt"))
        completed = True
    finally:
        teardown(ctx, completed=completed)


def compiled_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """The clipped variant with every block under torch.compile, and the same eager, in
    float32 (inductor's CPU attention backward fails in float64 in torch 2.11). Slow on
    a CPU: an opt-in test."""
    _join(rank, world_size, port)
    from parallel import ParallelOptions, choose_precision, setup, teardown

    ctx = setup("cpu")
    completed = False
    try:
        fp32 = choose_precision("cpu")
        for name, compile_blocks in (("eager", False), ("compiled", True)):
            result = run_fixed_steps(ctx, dtype=torch.float32, **CLIPPED, options=ParallelOptions(fp32, compile=compile_blocks))
            if rank == 0:
                _save_result(result, os.path.join(out_dir, f"{name}.pt"))
        completed = True
    finally:
        teardown(ctx, completed=completed)


def _overflow_run(ctx) -> dict:
    """fp16 compute with ShardedGradScaler for 3 steps; before unscaling in step 2 one
    element of rank 1's gradient shard becomes inf. Every rank must skip that step
    (weights and EMA unchanged, scale halved) and step normally before and after."""
    import argparse

    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    from configs import get_config
    from ema import ShardedEMA
    from objective import NoiseDraw
    from parallel import ParallelOptions, choose_precision, full_value, local_tensor
    from train import build_model, build_optimizer, train_step

    precision = choose_precision("cpu", "fp16")
    cfg = get_config("tiny")
    model = build_model(cfg, seed=0, ctx=ctx, options=ParallelOptions(precision))
    optimizer = build_optimizer(model, argparse.Namespace(lr=1e-3, weight_decay=0.01))
    ema = ShardedEMA(model, 0.999)
    poison_at = {1}

    class PoisonedScaler(ShardedGradScaler):
        step_index = 0

        def unscale_(self, opt):
            if self.step_index in poison_at and ctx.rank == 1:
                local_tensor(model.patchify.weight.grad).view(-1)[0] = float("inf")
            super().unscale_(opt)

    scaler = PoisonedScaler(device="cpu", init_scale=2.0**10)
    per_rank = 8 // ctx.world_size
    mine = slice(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)

    def snapshot() -> tuple[float, float]:
        weights = sum(float(full_value(p).double().abs().sum()) for p in model.parameters())
        return weights, sum(float(t.double().abs().sum()) for t in ema.shadow.values())

    record = {"scales": [], "weights": [snapshot()[0]], "ema": [snapshot()[1]], "grad_norms": []}
    for step, (x0, text, draw) in enumerate(global_batches(3, 8, cfg.latent_size, cfg.text_dim)):
        scaler.step_index = step
        local_draw = NoiseDraw(draw.sigma[mine], draw.eps[mine], draw.keep_text[mine])
        _, grad_norm = train_step(model, optimizer, ema, x0[mine], text[mine], local_draw, 1e-3, 1.0, step, ctx,
                                  precision=precision, scaler=scaler)
        weights, ema_sum = snapshot()
        record["scales"].append(scaler.get_scale())
        record["weights"].append(weights)
        record["ema"].append(ema_sum)
        record["grad_norms"].append(grad_norm)
    record["state"] = scaler.state_dict()
    return record


def _bf16_noise_features(ctx) -> dict:
    """A model sharded with bf16 compute: the dtype of sigma when it reaches the
    Fourier features, the features themselves, and the same features of an fp32
    unsharded model (FSDP's root must not cast sigma to bf16)."""
    from configs import get_config
    from model import AT1Denoiser
    from parallel import ParallelOptions, choose_precision
    from train import build_model

    cfg = get_config("tiny")
    seen = {}

    def capture(module, args, output):
        seen["sigma_dtype"] = str(args[0].dtype)
        seen["features"] = output.detach().clone()

    model = build_model(cfg, seed=0, ctx=ctx, options=ParallelOptions(choose_precision("cpu", "bf16")))
    model.noise_features.register_forward_hook(capture)
    sigma = torch.tensor([0.97, 0.3131])
    with torch.no_grad():
        out = model(torch.randn(2, 4, 16, 16), sigma, torch.randn(2, cfg.text_dim))
    reference = AT1Denoiser(cfg).noise_features(sigma)
    return {"sigma_dtype": seen["sigma_dtype"], "features": seen["features"], "reference": reference,
            "output_dtype": str(out.dtype)}


def hsdp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """4 ranks as 2 nodes x 2 (LOCAL_WORLD_SIZE=2) with --hsdp: the clipped variant,
    and a checkpoint of it that sample.py must read back as the full EMA weights."""
    _join(rank, world_size, port, local_world_size=2)
    from checkpointing import save_checkpoint
    from parallel import setup, teardown

    ctx = setup("cpu", hsdp=True)
    completed = False
    try:
        assert (ctx.replicas, ctx.shard_size) == (2, 2), (ctx.replicas, ctx.shard_size)
        result = _hsdp_run(ctx)
        if rank == 0:
            _save_result(result["result"], os.path.join(out_dir, "hsdp.pt"))
        save_checkpoint(os.path.join(out_dir, "ckpt"), ctx, result["model"], result["ema"], result["optimizer"],
                        {"config": result["config"]})
        completed = True
    finally:
        teardown(ctx, completed=completed)


def _hsdp_run(ctx) -> dict:
    import argparse
    import dataclasses

    from configs import get_config
    from ema import ShardedEMA
    from train import build_model, build_optimizer

    result = run_fixed_steps(ctx, **CLIPPED)
    # A small model and EMA to checkpoint (float32, as a real run would save).
    cfg = get_config("tiny")
    model = build_model(cfg, seed=0, ctx=ctx)
    ema = ShardedEMA(model, 0.999)
    return {"result": result, "model": model, "ema": ema, "config": dataclasses.asdict(cfg),
            "optimizer": build_optimizer(model, argparse.Namespace(lr=1e-3, weight_decay=0.01))}


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
