"""Throughput of the AT-1 trainer on one GPU: images/s and MFU per config and option.

    python bench_gpu.py                                   # at1-small and xl, 256 px, every variant
    python bench_gpu.py --configs xl --steps 30 --budget-s 600 --json bench.json
    python bench_gpu.py --variants fsdp,fsdp+compile --batch-size 128

Self-contained: synthetic latents and text embeddings in GPU memory, one process (a
one-rank NCCL process group, so the trainer's FSDP2 path with its mixed-precision
policy runs as in a real job; the `autocast` variant runs the unsharded path). Every
step is the trainer's own `train.train_step` (AdamW, clipping, EMA, the noise drawn
on the CPU as train.py does). The precision is `parallel.choose_precision` (bf16 on
sm80+), the MFU peak `flops.resolve_peak_flops` (--peak-flops for GPUs not in its
table). A variant that fails (out of memory, a compile error) is reported and the
others still run; variants that would start after --budget-s are skipped. Without a
CUDA device it prints why and exits with status 0 (--require-gpu: status 1).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import time
import traceback

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
_REPO_HELPER = os.path.normpath(os.path.join(_HERE, "..", "..", "worker", "python"))
if _REPO_HELPER not in sys.path:
    sys.path.append(_REPO_HELPER)

import torch  # noqa: E402

# name -> (sharded with FSDP2, ParallelOptions fields, AdamW foreach)
VARIANTS: dict[str, tuple[bool, dict, bool]] = {
    "fsdp": (True, {}, True),  # what train.py runs by default on CUDA
    "fsdp-foreach-off": (True, {}, False),  # the per-tensor AdamW loop train.py used before
    "fsdp+no-reshard": (True, {"reshard_after_forward": False}, True),
    "fsdp+ac": (True, {"activation_checkpointing": True}, True),
    "fsdp+compile": (True, {"compile": True}, True),
    "fsdp+compile+no-reshard": (True, {"compile": True, "reshard_after_forward": False}, True),
    "autocast": (False, {}, True),  # one process without FSDP: torch.autocast
}
DEFAULT_BATCH = {"tiny": 256, "at1-small": 256, "tld-100m": 128, "xl": 64}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="at1-small,xl", help="comma-separated named configs (configs.py)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup-steps", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"per-step batch for every config (default per config: {DEFAULT_BATCH})")
    p.add_argument("--latent-size", type=int, default=32, help="latent side; 32 = 256 px images")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    p.add_argument("--peak-flops", type=float, default=float(os.environ.get("AT1_PEAK_FLOPS", "0")) or None,
                   help="dense peak FLOPs/s of this GPU (default: flops.PEAK_TFLOPS by name, env AT1_PEAK_FLOPS)")
    p.add_argument("--budget-s", type=float, default=1200.0, help="start no variant after this many seconds")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--require-gpu", action="store_true", help="exit with status 1 (not 0) when there is no CUDA device")
    return p.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_rank_group():
    """A one-rank NCCL group (unless launched under torchrun), so FSDP2 wraps the model."""
    for var, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
        os.environ.setdefault(var, value)
    from parallel import setup

    ctx = setup("cuda")
    if ctx.world_size != 1:
        raise SystemExit("bench_gpu.py measures one GPU: run it as a single process, not under a multi-rank torchrun")
    return ctx


def run_variant(cfg, variant: str, batch: int, args, ctx_sharded, ctx_single, peak_flops: float | None) -> dict:
    import argparse as _argparse

    from ema import ShardedEMA
    from flops import training_flops_per_image
    from objective import NoiseSource
    from parallel import ParallelOptions, choose_precision, make_grad_scaler
    from train import build_model, learning_rate, train_step

    sharded, option_fields, foreach = VARIANTS[variant]
    ctx = ctx_sharded if sharded else ctx_single
    precision = choose_precision(ctx.device, args.precision)
    options = ParallelOptions(precision, **option_fields)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(ctx.device)
    model = build_model(cfg, seed=0, ctx=ctx, options=options)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n != "pos_embed"]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and n != "pos_embed")]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}],
                                  lr=3e-4, betas=(0.9, 0.99), foreach=foreach)
    scaler = make_grad_scaler(precision, ctx)
    ema = ShardedEMA(model, 0.999)
    noise = NoiseSource(seed=0, text_drop_prob=0.15)
    shape = (4, cfg.latent_size, cfg.latent_size)
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    x0 = torch.randn((batch, *shape), device=ctx.device, generator=gen)
    text = torch.randn((batch, cfg.text_dim), device=ctx.device, generator=gen)
    schedule = _argparse.Namespace(lr=3e-4, warmup_steps=10, steps=args.warmup_steps + args.steps, min_lr_ratio=0.1)
    model.train()

    def step(i: int):
        return train_step(model, optimizer, ema, x0, text, noise.draw(batch, shape), learning_rate(i, schedule), 1.0, i, ctx,
                          precision=precision, scaler=scaler, sync=False)

    t0 = time.perf_counter()
    for i in range(args.warmup_steps):
        loss, _ = step(i)
    torch.cuda.synchronize(ctx.device)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(args.warmup_steps, args.warmup_steps + args.steps):
        loss, _ = step(i)
    final_loss = float(loss)  # waits for the device
    seconds = time.perf_counter() - t0
    images_per_s = batch * args.steps / seconds
    result = {"config": cfg.name, "variant": variant, "batch": batch, "precision": precision.name,
              "images_per_s": images_per_s, "step_ms": 1000 * seconds / args.steps, "warmup_s": warmup_s,
              "peak_memory_gib": torch.cuda.max_memory_allocated(ctx.device) / 2**30, "final_loss": final_loss}
    if peak_flops:
        result["mfu"] = training_flops_per_image(cfg) * images_per_s / peak_flops
    del model, optimizer, ema, scaler, x0, text
    return result


def _print_table(results: list[dict]) -> None:
    print(f"\n{'config':<10} {'variant':<24} {'batch':>5} {'prec':>5} {'img/s':>9} {'MFU':>7} {'step ms':>8} "
          f"{'mem GiB':>8} {'warmup s':>8}  note")
    for r in results:
        if "error" in r or "skipped" in r:
            print(f"{r['config']:<10} {r['variant']:<24} {r.get('batch', ''):>5} {'':>5} {'':>9} {'':>7} {'':>8} {'':>8} {'':>8}  "
                  f"{r.get('error') or r.get('skipped')}")
            continue
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "n/a"
        print(f"{r['config']:<10} {r['variant']:<24} {r['batch']:>5} {r['precision']:>5} {r['images_per_s']:>9.1f} {mfu:>7} "
              f"{r['step_ms']:>8.1f} {r['peak_memory_gib']:>8.2f} {r['warmup_s']:>8.1f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA device (torch.cuda.is_available() is False): nothing to measure. "
              "Run it on a machine with an NVIDIA GPU.", flush=True)
        return 1 if args.require_gpu else 0
    from configs import get_config
    from flops import resolve_peak_flops, training_flops_per_image
    from parallel import DistContext, choose_precision, teardown

    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    configs = [get_config(name, latent_size=args.latent_size) for name in args.configs.split(",")]
    ctx = _one_rank_group()
    single = DistContext(0, 1, 0, 1, ctx.device, sharded=False, owns_process_group=False)
    gpu = torch.cuda.get_device_name(ctx.device)
    precision = choose_precision(ctx.device, args.precision)
    peak_flops, peak_line = resolve_peak_flops(args.peak_flops, gpu, precision.name)
    print(f"GPU: {gpu}, {torch.cuda.get_device_properties(ctx.device).total_memory / 2**30:.0f} GiB, "
          f"torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    print(f"precision: {precision.describe()}", flush=True)
    print(peak_line, flush=True)
    start = time.perf_counter()
    results: list[dict] = []
    completed = False
    try:
        for cfg in configs:
            batch = args.batch_size or DEFAULT_BATCH.get(cfg.name, 64)
            print(f"\n{cfg.name}: {training_flops_per_image(cfg) / 1e9:.1f} training GFLOPs/image, batch {batch}, "
                  f"{cfg.latent_size * 8} px", flush=True)
            for variant in args.variants.split(","):
                elapsed = time.perf_counter() - start
                if elapsed > args.budget_s:
                    results.append({"config": cfg.name, "variant": variant, "batch": batch,
                                    "skipped": f"skipped: budget of {args.budget_s:.0f}s spent"})
                    continue
                try:
                    r = run_variant(cfg, variant, batch, args, ctx, single, peak_flops)
                    mfu = f", MFU {r['mfu']:.1%}" if "mfu" in r else ""
                    print(f"  {variant:<24} {r['images_per_s']:9.1f} img/s{mfu}, {r['step_ms']:.1f} ms/step, "
                          f"{r['peak_memory_gib']:.1f} GiB peak, warmup {r['warmup_s']:.1f}s", flush=True)
                except Exception as e:  # noqa: BLE001 - report and go on with the next variant
                    message = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
                    print(f"  {variant:<24} failed: {message}", flush=True)
                    traceback.print_exc(limit=3)
                    r = {"config": cfg.name, "variant": variant, "batch": batch, "error": message}
                finally:
                    gc.collect()  # FSDP state and modules reference each other
                    torch.cuda.empty_cache()
                results.append(r)
        completed = True
    finally:
        _print_table(results)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"gpu": gpu, "torch": torch.__version__, "precision": precision.name, "peak_flops": peak_flops,
                           "steps": args.steps, "warmup_steps": args.warmup_steps, "results": results}, f, indent=1)
            print(f"wrote {args.json}", flush=True)
        teardown(ctx, completed=completed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
