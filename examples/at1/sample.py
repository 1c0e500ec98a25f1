"""DDIM-style sampler for the x0-predicting AT-1 model, with classifier-free guidance.

Noise levels go from sigma_max (default 0.99, transformer_latent_diffusion's start:
training draws sigma from Beta(1, 2.5), which has no mass at 1) down to 0 on a linear
grid. At each level the model predicts x0 (guided: x0_uncond + scale * (x0_cond -
x0_uncond), the unconditional prediction using a zero text embedding as in training),
the implied noise is eps = (x_t - (1 - sigma) * x0) / sigma, and the next latent is the
deterministic (DDIM) re-noising sigma_next * eps + (1 - sigma_next) * x0, which is
transformer_latent_diffusion's ((sigma - sigma_next) * x0 + sigma_next * x_t) / sigma.

    python sample.py --ckpt /tmp/at1-ckpt/300 --data /tmp/at1-data/val --count 8 --out latents.npy
generates latents for the text embeddings of the first validation samples with the
EMA weights of a checkpoint (decode them with the SDXL VAE to see images).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from configs import LATENT_CHANNELS, ModelConfig  # noqa: E402
from model import AT1Denoiser  # noqa: E402

DEFAULT_SIGMA_MAX = 0.99


@torch.no_grad()
def sample_latents(model, text: torch.Tensor, steps: int = 30, guidance_scale: float = 4.0,
                   generator: torch.Generator | None = None, sigma_max: float = DEFAULT_SIGMA_MAX,
                   on_step: Callable[[int, float, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Latents [B, 4, S, S] (S: the model config's latent size) for text embeddings
    [B, D_text], on text's device. `on_step(i, sigma_next, x, x0)` sees every
    intermediate latent x at noise level sigma_next and the guided prediction x0."""
    if not 0 < sigma_max <= 1:
        raise ValueError(f"sigma_max {sigma_max} must be in (0, 1]")
    size = model.cfg.latent_size
    b = text.shape[0]
    # Drawn on the CPU: the same seed gives the same latents on any device.
    x = torch.randn((b, LATENT_CHANNELS, size, size), generator=generator, device="cpu").to(text.device)
    sigmas = torch.linspace(sigma_max, 0.0, steps + 1, dtype=torch.float32, device=text.device)
    null_text = torch.zeros_like(text)
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        s = sigma.expand(b)
        if guidance_scale == 1.0:
            x0 = model(x, s, text).float()
        else:
            both = model(torch.cat([x, x]), torch.cat([s, s]), torch.cat([text, null_text])).float()
            cond, uncond = both.chunk(2)
            x0 = uncond + guidance_scale * (cond - uncond)
        eps = (x - (1 - sigma) * x0) / sigma
        x = sigma_next * eps + (1 - sigma_next) * x0
        if on_step is not None:
            on_step(i, float(sigma_next), x, x0)
    return x


def load_ema_model(step_dir: str) -> AT1Denoiser:
    """The EMA weights of a checkpoint written by any number of ranks: FSDP2 splits
    every parameter along dim 0 in rank order, so concatenating the ranks' EMA shards
    gives the full tensors (with HSDP, the shards of the first replica: ranks 0 to
    world_size/replicas - 1)."""
    with open(os.path.join(step_dir, "trainer.rank0.json")) as f:
        state = json.load(f)
    shard_ranks = state["world_size"] // state.get("replicas", 1)
    shards = [torch.load(os.path.join(step_dir, f"ema.rank{r}.pt"), map_location="cpu", weights_only=True)
              for r in range(shard_ranks)]
    weights = {name: torch.cat([shard[name] for shard in shards], dim=0) for name in shards[0]}
    model = AT1Denoiser(ModelConfig(**state["config"]))
    model.load_state_dict(weights)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    from shards import TEXT_POOLING, list_shards, read_all

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a checkpoint <step>/ directory")
    p.add_argument("--data", required=True, help="shard directory whose text embeddings condition the samples")
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.add_argument("--sigma-max", type=float, default=DEFAULT_SIGMA_MAX,
                   help="first noise level (default 0.99, where Beta(1, 2.5) training still has mass)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--pool-text", choices=TEXT_POOLING, default="none",
                   help="'mean' averages [T, D] per-token text arrays (default: refuse them)")
    p.add_argument("--out", required=True, help=".npy file for the float32 latents [count, 4, S, S]")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch sees no CUDA device")
    model = load_ema_model(args.ckpt).to(device)
    samples = read_all(list_shards(args.data), limit=args.count, pool_text=args.pool_text)
    text = torch.from_numpy(np.stack([s.text for s in samples])).to(device)
    latents = sample_latents(model, text, args.steps, args.guidance_scale, torch.Generator().manual_seed(args.seed),
                             sigma_max=args.sigma_max).cpu()
    np.save(args.out, latents.numpy(), allow_pickle=False)
    reference = np.stack([s.latent for s in samples])
    mse = float(((latents.numpy() - reference) ** 2).mean())
    print(f"wrote {tuple(latents.shape)} latents to {args.out} ({device.type}); "
          f"MSE to the dataset latents of the same texts: {mse:.4f}")


if __name__ == "__main__":
    main()
