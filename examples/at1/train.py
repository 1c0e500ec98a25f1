"""AT-1 trainer: FSDP2 data-parallel training of the latent transformer on tar shards.

    python train.py --config tiny --data /tmp/at1-data --steps 300
    torchrun --nproc-per-node 2 train.py --config tiny --data /tmp/at1-data --steps 300

Follows Drover's trainer contract (ARCHITECTURE.md): env:// rendezvous from the torchrun
variables, checkpoints under $DROVER_CKPT_DIR/<step>/, resume from $DROVER_RESUME_DIR,
metrics and checkpoints reported through drover_agent.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
# drover_agent normally comes from PYTHONPATH (the worker agent sets it); from a repo
# checkout it lives in worker/python.
_REPO_HELPER = os.path.normpath(os.path.join(_HERE, "..", "..", "worker", "python"))
if _REPO_HELPER not in sys.path:
    sys.path.append(_REPO_HELPER)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import drover_agent  # noqa: E402
from checkpointing import CheckpointReader, save_checkpoint  # noqa: E402
from configs import LATENT_CHANNELS, get_config  # noqa: E402
from drover_agent.outer_socket import CODECS as OUTER_CODECS  # noqa: E402
from drover_agent.outer_sync import OuterSync  # noqa: E402
from ema import ShardedEMA  # noqa: E402
from flops import count_parameters, resolve_peak_flops, training_flops_per_image  # noqa: E402
from model import AT1Denoiser  # noqa: E402
from objective import TRAIN_SIGMA_BETA, NoiseSource, add_noise, denoising_loss, validation_noise  # noqa: E402
from parallel import (PRECISIONS, DistContext, ParallelOptions, Precision, all_reduce_sum, choose_precision,  # noqa: E402
                      full_value, make_grad_scaler, reshard_after_inference, setup, shard_model, teardown)
from shards import TEXT_POOLING, ShardStream, list_shards, read_all, uneven_shards_note  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train the AT-1 latent transformer.")
    p.add_argument("--config", default="tiny", help="named model config: tiny, at1-small, tld-100m, xl")
    p.add_argument("--latent-size", type=int, default=None, help="override the config's latent side (image side / 8)")
    p.add_argument("--data", required=True, help="shard directory; if it has train/ (and val/) subdirectories those are used")
    p.add_argument("--val-data", default=None, help="validation shard directory (default: <data>/val when present)")
    p.add_argument("--steps", type=int, default=300, help="total optimizer steps")
    p.add_argument("--batch-size", type=int, default=32, help="GLOBAL batch size, split evenly over ranks")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine schedule ends at lr * this")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--text-drop-prob", type=float, default=0.15, help="fraction of text embeddings zeroed (classifier-free guidance)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shuffle-buffer", type=int, default=512)
    p.add_argument("--ckpt-dir", default=None, help="checkpoint root (default: $DROVER_CKPT_DIR); <step>/ dirs go under it")
    p.add_argument("--ckpt-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--resume-dir", default=None, help="a checkpoint <step>/ dir to resume from (default: $DROVER_RESUME_DIR)")
    p.add_argument("--val-every", type=int, default=0, help="validate every N steps (0: only at the end; needs validation shards)")
    p.add_argument("--val-samples", type=int, default=256, help="validation samples scored (the first N of the validation shards)")
    p.add_argument("--val-seed", type=int, default=12345, help="seed of the fixed validation noise")
    p.add_argument("--early-stop-patience", type=int, default=0,
                   help="stop after this many validations without improvement (0: never stop early)")
    p.add_argument("--early-stop-min-delta", type=float, default=0.0)
    p.add_argument("--peak-flops", type=float, default=float(os.environ.get("AT1_PEAK_FLOPS", "0")) or None,
                   help="per-GPU dense peak FLOPs/s for MFU (default: env AT1_PEAK_FLOPS, else looked up by GPU name "
                        "in flops.PEAK_TFLOPS; an unknown GPU reports no MFU)")
    p.add_argument("--stop-after-step", type=int, default=0,
                   help="simulate a preemption: exit right after this step, without a final checkpoint "
                        "(the schedule still targets --steps)")
    p.add_argument("--outer-every", type=int, default=0,
                   help="DiLoCo: an outer step every H inner steps, syncing the job's groups through the worker agent "
                        "(0: off; with one group it is single-worker DiLoCo)")
    p.add_argument("--outer-lr", type=float, default=0.7, help="outer Nesterov SGD learning rate")
    p.add_argument("--outer-momentum", type=float, default=0.9, help="outer Nesterov SGD momentum")
    p.add_argument("--outer-codec", choices=OUTER_CODECS, default="fp32",
                   help="how the agents send pseudo-gradients to each other")
    p.add_argument("--outer-timeout", type=float, default=600.0, help="seconds an outer step may wait for the other groups")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--log-every", type=int, default=1,
                   help="progress line and metrics every N steps (the loss is read back from the device only then)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="compute precision: auto = bf16 on sm80+ GPUs, fp16 with loss scaling on older GPUs, fp32 on CPU")
    p.add_argument("--sigma-beta", type=float, nargs=2, metavar=("A", "B"), default=list(TRAIN_SIGMA_BETA),
                   help="training noise levels sigma ~ Beta(A, B) (default 1 2.5, transformer_latent_diffusion's); "
                        "validation noise is fixed and does not change with it")
    p.add_argument("--pool-text", choices=TEXT_POOLING, default="none",
                   help="'mean' averages [T, D] per-token text arrays into one vector (default: refuse them; "
                        "the model expects a pooled embedding such as CLIP's)")
    p.add_argument("--reshard-after-forward", choices=["true", "false"], default="true",
                   help="FSDP2: free each block's gathered parameters after forward (false: keep them for "
                        "backward; less communication, more memory)")
    p.add_argument("--hsdp", action="store_true",
                   help="hybrid sharding: replicate across nodes, shard within a node (LOCAL_WORLD_SIZE ranks)")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block's activations in backward (less memory, ~1/3 more compute)")
    args = p.parse_args(argv)
    if args.ckpt_dir is None:
        args.ckpt_dir = os.environ.get("DROVER_CKPT_DIR") or None
    if args.resume_dir is None:
        args.resume_dir = os.environ.get("DROVER_RESUME_DIR") or None
    return args


def parallel_options(args: argparse.Namespace, ctx: DistContext) -> ParallelOptions:
    return ParallelOptions(precision=choose_precision(ctx.device, args.precision),
                           reshard_after_forward=args.reshard_after_forward == "true",
                           compile=args.compile, activation_checkpointing=args.activation_checkpointing)


def build_model(cfg, seed: int, ctx: DistContext, options: ParallelOptions | None = None) -> torch.nn.Module:
    torch.manual_seed(seed)  # same initial weights on every rank before sharding
    return shard_model(AT1Denoiser(cfg).to(ctx.device), ctx, options)


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warmup to --lr, then cosine decay to lr * min_lr_ratio at --steps.
    `step` is the 0-based index of the step being taken."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    span = max(1, args.steps - args.warmup_steps)
    progress = min(1.0, (step - args.warmup_steps) / span)
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    # Weight decay on matrices and conv kernels only: decaying norms, biases and the
    # position embedding towards zero only hurts.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and name != "pos_embed" else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # On CUDA the multi-tensor (foreach) kernels: one launch per group of tensors
    # instead of several per parameter. On CPU the per-tensor loop: the same arithmetic
    # whatever the sharding, so the 1-rank and 2-rank equivalence tests agree to float
    # rounding (and CPU has no launch overhead to save).
    on_cuda = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.99), foreach=on_cuda)


def split_dirs(args: argparse.Namespace) -> tuple[str, str | None]:
    train_dir = os.path.join(args.data, "train") if os.path.isdir(os.path.join(args.data, "train")) else args.data
    val_dir = args.val_data
    default_val = os.path.join(args.data, "val")
    if val_dir is None and os.path.isdir(default_val):
        if any(f.endswith(".tar") for f in os.listdir(default_val)):
            val_dir = default_val
        else:
            print(f"note: {default_val} holds no .tar shards; training without validation", flush=True)
    if val_dir is not None:
        overlap = {os.path.realpath(s) for s in list_shards(train_dir)} & {os.path.realpath(s) for s in list_shards(val_dir)}
        if overlap:
            raise ValueError(f"validation shards are also training shards: {sorted(overlap)[:3]}")
    return train_dir, val_dir


class Validator:
    """Scores the model like a FLock validator scores a submission: mean x0-MSE over a
    fixed held-out set, with noise fixed per sample, on the EMA weights. Every rank
    runs the same number of forward passes (FSDP needs all ranks in each all-gather),
    padding its slice with zero-weight samples."""

    def __init__(self, val_dir: str, args: argparse.Namespace, ctx: DistContext, per_rank_batch: int):
        samples = read_all(list_shards(val_dir), limit=args.val_samples, pool_text=args.pool_text)
        if not samples:
            raise ValueError(f"validation shards in {val_dir} hold no samples")
        self.count = len(samples)
        mine = list(range(ctx.rank, self.count, ctx.world_size))
        per_rank = math.ceil(self.count / ctx.world_size)
        self.batches = []
        shape = samples[0].latent.shape
        for start in range(0, per_rank, per_rank_batch):
            idx = [mine[i] if i < len(mine) else None for i in range(start, min(per_rank, start + per_rank_batch))]
            latents, texts, sigmas, eps, weights = [], [], [], [], []
            for i in idx:
                s = samples[i if i is not None else 0]
                sigma, noise = validation_noise(i if i is not None else 0, args.val_seed, shape)
                latents.append(s.latent), texts.append(s.text), sigmas.append(sigma), eps.append(noise)
                weights.append(0.0 if i is None else 1.0)
            self.batches.append(tuple(torch.from_numpy(np.stack(a).astype(np.float32)) for a in (latents, texts, sigmas, eps, weights)))
        self.ctx = ctx

    @torch.no_grad()
    def score(self, model: torch.nn.Module) -> float:
        model.eval()
        device = self.ctx.device
        total = torch.zeros(2, dtype=torch.float64, device=device)
        for latents, texts, sigmas, eps, weights in self.batches:
            x0, text = latents.to(device), texts.to(device)
            prediction = model(add_noise(x0, sigmas.to(device), eps.to(device)), sigmas.to(device), text).float()
            per_sample = (prediction - x0).pow(2).flatten(1).mean(1)
            w = weights.to(device)
            total += torch.stack([(per_sample * w).sum().double(), w.sum().double()])
        reshard_after_inference(model)
        model.train()
        total = all_reduce_sum(total, self.ctx)
        return float(total[0] / total[1])


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)  # step -> global mean training loss
    val_losses: dict[int, float] = field(default_factory=dict)
    checkpoints: list[str] = field(default_factory=list)
    final_step: int = 0
    stopped_early: bool = False
    outer_checksums: dict[int, str] = field(default_factory=dict)  # inner step -> checksum of the outer parameters


def train_step(model, optimizer, ema, x0, text, draw, lr: float, grad_clip: float, step: int, ctx: DistContext, *,
               precision: Precision | None = None, scaler=None, sync: bool = True):
    """One optimizer step on this rank's slice of the global batch. Returns the global
    mean loss and the global gradient norm (before clipping, after unscaling) as
    floats, or with sync=False as device tensors, so that the caller decides when to
    wait for the device. With a loss scaler (fp16) a step whose gradients overflowed
    on any rank is skipped on every rank, EMA update included."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    precision = precision or choose_precision(ctx.device)
    # FSDP's mixed-precision policy casts the parameters itself; one process autocasts.
    autocast_dtype = None if ctx.sharded else precision.compute_dtype
    with torch.autocast(ctx.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        loss = denoising_loss(model, x0, text, draw)
    # FSDP averages gradients over ranks, so equal per-rank batches give the gradient
    # of the global-batch mean loss.
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)  # before clipping: clip (and report) the true gradient
    grad_norm = full_value(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)).detach()
    stepped = True
    if scaler is not None:
        scale = scaler.get_scale()
        scaler.step(optimizer)  # skipped when found-inf, which ShardedGradScaler agrees across ranks
        scaler.update()
        stepped = scaler.get_scale() >= scale  # the scale backs off exactly when the step was skipped
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if stepped:
        ema.update(model, step)
    global_loss = all_reduce_sum(loss.detach().reshape(1), ctx)[0] / ctx.world_size
    if sync:
        return float(global_loss), float(grad_norm)
    return global_loss, grad_norm


def train(args: argparse.Namespace, ctx: DistContext, agent: drover_agent.Agent) -> TrainResult:
    cfg = get_config(args.config, latent_size=args.latent_size)
    if args.batch_size % ctx.world_size:
        raise ValueError(f"--batch-size {args.batch_size} is the global batch; it must divide evenly over {ctx.world_size} ranks")
    per_rank_batch = args.batch_size // ctx.world_size
    if args.ckpt_every and not args.ckpt_dir and ctx.is_main:
        print("warning: --ckpt-every is set but there is no checkpoint directory (--ckpt-dir or DROVER_CKPT_DIR): "
              "no checkpoints will be written", flush=True)
    latent_shape = (LATENT_CHANNELS, cfg.latent_size, cfg.latent_size)

    options = parallel_options(args, ctx)
    precision = options.precision
    model = build_model(cfg, args.seed, ctx, options)
    optimizer = build_optimizer(model, args)
    scaler = make_grad_scaler(precision, ctx)
    ema = ShardedEMA(model, args.ema_decay)
    train_dir, val_dir = split_dirs(args)
    shards = list_shards(train_dir)
    # Data and noise are split over every rank of the job, not only this group's: groups
    # that sync through outer steps must see different samples, as ranks of one group do.
    # With one group (or plain torchrun) the global rank is the rank.
    job_env = drover_agent.TrainerEnv.from_env()
    data_rank, data_world = (job_env.global_rank, job_env.global_world_size) if job_env.group_count > 1 else (ctx.rank, ctx.world_size)
    # Noise differs per rank (different samples), reproducibly.
    noise = NoiseSource(seed=[args.seed, data_rank], text_drop_prob=args.text_drop_prob, sigma_beta=tuple(args.sigma_beta))
    start_step, best_val, evals_without_improvement = 0, math.inf, 0
    data_state = {"epoch": 0, "position": 0}

    if args.resume_dir:
        reader = CheckpointReader(args.resume_dir, ctx)
        state = reader.restore(model, ema, optimizer)
        if state["config"] != dataclasses.asdict(cfg):
            raise ValueError(f"{args.resume_dir}: checkpoint was trained with config {state['config']}, this run uses {dataclasses.asdict(cfg)}")
        start_step = state["step"]
        best_val = state["best_val"] if state["best_val"] is not None else math.inf
        evals_without_improvement = state["evals_without_improvement"]
        if scaler is not None and state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])  # the loss scale and its growth counter: exact resume
        saved_group = state.get("group")
        if reader.same_layout and saved_group not in (None, job_env.group):
            # The step was committed while this group was not in step: it starts from
            # another group's files (the same model after an outer step). Its data goes
            # on from as many samples into its own part; its noise starts fresh, so the
            # two groups do not draw the same.
            data_state = state["data"]
            noise = NoiseSource(seed=[args.seed, data_rank, start_step], text_drop_prob=args.text_drop_prob,
                                sigma_beta=tuple(state["noise"].get("sigma_beta", args.sigma_beta)))
            if ctx.is_main:
                print(f"group {job_env.group} resumes from group {saved_group}'s checkpoint files (it was not in step "
                      f"when step {start_step} was saved): fresh noise draws", flush=True)
        elif reader.same_layout:
            noise.load_state_dict(state["noise"])
            data_state = state["data"]
            if ctx.is_main and list(noise.sigma_beta) != list(args.sigma_beta):
                print(f"note: the checkpoint draws sigma ~ Beta{tuple(noise.sigma_beta)}; it continues with that, "
                      f"not --sigma-beta {args.sigma_beta[0]} {args.sigma_beta[1]}", flush=True)
        else:
            data_state = {"epoch": state["data"]["epoch"] + 1, "position": 0}
            # Fresh noise that does not repeat the first steps' draws.
            noise = NoiseSource(seed=[args.seed, data_rank, start_step], text_drop_prob=args.text_drop_prob,
                                sigma_beta=tuple(args.sigma_beta))
            if ctx.is_main:
                print(f"resuming {ctx.world_size} ranks from a {reader.saved_world_size}-rank checkpoint: "
                      f"data restarts at epoch {data_state['epoch']}", flush=True)
        if ctx.is_main:
            print(f"resumed from {args.resume_dir} at step {start_step}", flush=True)

    outer = None
    if args.outer_every:
        if args.outer_every < 0:
            raise ValueError(f"--outer-every {args.outer_every}: must be 0 (off) or a number of inner steps")
        # After the restore: without saved outer state the outer parameters start as the model's.
        outer = OuterSync(model, every=args.outer_every, lr=args.outer_lr, momentum=args.outer_momentum, codec=args.outer_codec,
                          timeout_s=args.outer_timeout, inner_step=start_step)
        if args.resume_dir:
            outer_state = reader.outer_state(model)
            if outer_state is not None:
                outer.load_state_dict(outer_state)
            elif ctx.is_main:
                print(f"note: {args.resume_dir} has no outer state (taken without --outer-every): the outer parameters "
                      f"start from the restored model, momentum from zero", flush=True)

    stream = ShardStream(shards, data_rank, data_world, args.seed, args.shuffle_buffer,
                         epoch=data_state["epoch"], position=data_state["position"], pool_text=args.pool_text)
    validator = Validator(val_dir, args, ctx, per_rank_batch) if val_dir else None
    if args.early_stop_patience and not (validator and args.val_every):
        raise ValueError("--early-stop-patience needs validation shards (--val-data or <data>/val) and --val-every")
    flops_per_image = training_flops_per_image(cfg)
    peak_flops = None
    if ctx.device.type == "cuda":
        peak_flops, peak_line = resolve_peak_flops(args.peak_flops, torch.cuda.get_device_name(ctx.device), precision.name)
    if ctx.is_main:
        print(f"AT-1 {cfg.name}: {count_parameters(cfg) / 1e6:.2f}M parameters, {ctx.world_size} rank(s) on {ctx.device.type}, "
              f"global batch {args.batch_size}, {len(shards)} training shards, "
              f"validation {'on ' + str(validator.count) + ' samples' if validator else 'off (no validation shards)'}", flush=True)
        print(f"precision: {precision.describe()}; sigma ~ Beta{tuple(noise.sigma_beta)}; "
              f"reshard after forward {options.reshard_after_forward}, compile {options.compile}, "
              f"activation checkpointing {options.activation_checkpointing}"
              f"{f', HSDP {ctx.replicas}x{ctx.shard_size}' if ctx.replicas > 1 else ''}", flush=True)
        if ctx.device.type == "cuda":
            print(peak_line, flush=True)
        note = uneven_shards_note(len(shards), data_world)
        if note:
            print(note, flush=True)

    result = TrainResult(final_step=start_step)

    def checkpoint(step: int) -> None:
        if not args.ckpt_dir or (result.checkpoints and result.checkpoints[-1] == os.path.join(args.ckpt_dir, str(step))):
            return
        step_dir = os.path.join(args.ckpt_dir, str(step))
        trainer_state = {
            "step": step, "config": dataclasses.asdict(cfg),
            "scheduler": {"kind": "warmup_cosine", "lr": args.lr, "warmup_steps": args.warmup_steps,
                          "total_steps": args.steps, "min_lr_ratio": args.min_lr_ratio},
            "data": stream.state_dict(), "noise": noise.state_dict(),
            "best_val": None if math.isinf(best_val) else best_val,
            "evals_without_improvement": evals_without_improvement,
            "precision": precision.name,
            "grad_scaler": scaler.state_dict() if scaler is not None else None,
            # Which group wrote it: a group a step was committed without resumes from
            # another group's files, and must not repeat that group's noise draws.
            "group": job_env.group,
        }
        files = save_checkpoint(step_dir, ctx, model, ema, optimizer, trainer_state,
                                outer_state=outer.state_dict() if outer is not None else None)
        agent.checkpoint(step, step_dir, files)
        result.checkpoints.append(step_dir)

    def validate(step: int) -> bool:
        """Scores the EMA weights; returns True when early stopping says stop."""
        nonlocal best_val, evals_without_improvement
        with ema.swapped_into(model):
            val_loss = validator.score(model)
        result.val_losses[step] = val_loss
        if val_loss < best_val - args.early_stop_min_delta:
            best_val, evals_without_improvement = val_loss, 0
        else:
            evals_without_improvement += 1
        if ctx.is_main:
            agent.metric(step, val_loss=val_loss, best_val_loss=best_val)
            print(f"step {step} val_loss {val_loss:.4f} (best {best_val:.4f})", flush=True)
        return bool(args.early_stop_patience) and evals_without_improvement >= args.early_stop_patience

    model.train()
    step = start_step
    if outer is not None:
        # A group that (re)starts while another trains on takes that group's live outer
        # state and continues at its step (the data stream goes on where this group's
        # checkpoint left it: no sample is skipped, a few may be seen twice).
        joined = outer.join()
        if joined is not None and joined["mode"] == "state":
            step = joined["inner_step"]
            result.final_step = step
    train_start = time.perf_counter()
    step_seconds = 0.0  # time in training steps only, without validation and checkpoints
    interval_seconds, interval_steps = 0.0, 0  # since the last progress line
    pending: list[tuple[int, torch.Tensor]] = []  # losses of steps not yet read back from the device

    def read_losses() -> None:
        """One device-to-host read for every loss since the last: the host does not wait
        for the device on the steps in between."""
        if pending:
            for (s, _), value in zip(pending, torch.stack([loss for _, loss in pending]).tolist()):
                result.losses[s] = value
            pending.clear()

    while step < args.steps:
        t0 = time.perf_counter()
        latents, texts = stream.next_batch(per_rank_batch)
        x0 = torch.from_numpy(latents).to(ctx.device, non_blocking=True)
        text = torch.from_numpy(texts).to(ctx.device, non_blocking=True)
        draw = noise.draw(per_rank_batch, latent_shape)
        lr = learning_rate(step, args)
        loss_tensor, grad_norm = train_step(model, optimizer, ema, x0, text, draw, lr, args.grad_clip, step, ctx,
                                            precision=precision, scaler=scaler, sync=False)
        step += 1
        pending.append((step, loss_tensor))
        result.final_step = step
        log_now = step % args.log_every == 0 or step == args.steps
        if log_now:
            read_losses()  # waits for the device, so the interval's time includes its compute
        seconds = time.perf_counter() - t0
        step_seconds += seconds
        interval_seconds += seconds
        interval_steps += 1

        if log_now:
            if ctx.is_main:
                global_loss, grad = result.losses[step], float(grad_norm)
                images_per_s = args.batch_size * interval_steps / interval_seconds
                values = {"loss": global_loss, "lr": lr, "grad_norm": grad, "images_per_s": images_per_s}
                line = f"step {step}/{args.steps} loss {global_loss:.4f} lr {lr:.1e} grad {grad:.2f} img/s {images_per_s:.0f}"
                if peak_flops:
                    values["mfu"] = flops_per_image * images_per_s / (peak_flops * ctx.world_size)
                    line += f" mfu {values['mfu']:.1%}"
                if scaler is not None:
                    values["loss_scale"] = scaler.get_scale()
                    line += f" scale {values['loss_scale']:.0f}"
                agent.metric(step, **values)
                print(line, flush=True)
            interval_seconds, interval_steps = 0.0, 0

        if outer is not None:
            # args.batch_size is this group's global batch: the samples behind each inner step.
            report = outer.maybe_step(step, args.batch_size * (step - outer.last_inner_step))
            if report is not None:
                result.outer_checksums[step] = report["checksum"]
                if ctx.is_main:
                    agent.metric(step, outer_step=report["outer_step"], outer_seconds=report["seconds"],
                                 outer_bytes=report["bytes_sent"])
                joined = report.get("joined")
                if joined is not None and joined["mode"] == "state":
                    step = joined["inner_step"]  # this group fell out of step and took the lineage's state
                    result.final_step = step
                    continue

        stop = False
        if validator and args.val_every and step % args.val_every == 0:
            stop = validate(step)
        if args.ckpt_every and step % args.ckpt_every == 0 and step != args.steps:
            checkpoint(step)
        if args.stop_after_step and step >= args.stop_after_step and step < args.steps:
            if ctx.is_main:
                print(f"stopping after step {step} as asked (--stop-after-step)", flush=True)
            read_losses()
            stream.close()
            return result
        if stop:
            result.stopped_early = True
            if ctx.is_main:
                print(f"early stopping at step {step}: validation loss has not improved for {evals_without_improvement} evaluations", flush=True)
            break

    read_losses()
    if validator and step not in result.val_losses:
        # Also when no step ran: `--resume-dir X --steps <X's step>` scores a checkpoint.
        validate(step)
    if step > start_step or not args.resume_dir:
        checkpoint(step)
    stream.close()
    if ctx.is_main:
        losses = list(result.losses.values())
        first = f"{losses[0]:.4f}" if losses else "n/a"
        last = f"{np.mean(losses[-10:]):.4f}" if losses else "n/a"
        val = f", best val_loss {best_val:.4f}" if validator and not math.isinf(best_val) else ""
        print(f"done: {step - start_step} steps ({start_step} -> {step}) in {step_seconds:.1f}s of training steps "
              f"({time.perf_counter() - train_start:.1f}s with validation and checkpoints), "
              f"loss {first} -> {last} (mean of last 10){val}{', stopped early' if result.stopped_early else ''}", flush=True)
    return result


def main(argv: list[str] | None = None) -> TrainResult:
    args = parse_args(argv)
    # Other ranks wait in a broadcast while rank 0 waits out the other groups (3 tries).
    collective_timeout = max(1800.0, 3 * args.outer_timeout + 300) if args.outer_every else None
    ctx = setup(args.device, hsdp=args.hsdp, collective_timeout_s=collective_timeout)
    agent = drover_agent.Agent.from_env()
    completed = False
    try:
        result = train(args, ctx, agent)
        completed = True
        return result
    finally:
        agent.close()
        teardown(ctx, completed=completed)


if __name__ == "__main__":
    main()
