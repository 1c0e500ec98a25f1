"""DDIM-style sampler for the x0-predicting AT-1 model, with classifier-free guidance.

Noise levels go from sigma=1 (pure noise) down to 0 on a linear grid. At each level the
model predicts x0 (guided: x0_uncond + scale * (x0_cond - x0_uncond), the unconditional
prediction using a zero text embedding as in training), the implied noise is
eps = (x_t - (1 - sigma) * x0) / sigma, and the next latent is the deterministic (DDIM)
re-noising sigma_next * eps + (1 - sigma_next) * x0.

    python sample.py --ckpt /tmp/at1-ckpt/300 --data /tmp/at1-data/val --count 8 --out latents.npy
generates latents for the text embeddings of the first validation samples with the
EMA weights of a checkpoint (decode them with the SDXL VAE to see images).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from configs import LATENT_CHANNELS, ModelConfig  # noqa: E402
from model import AT1Denoiser  # noqa: E402


@torch.no_grad()
def sample_latents(model, text: torch.Tensor, steps: int = 30, guidance_scale: float = 4.0,
                   generator: torch.Generator | None = None, latent_size: int | None = None) -> torch.Tensor:
    """Latents [B, 4, S, S] for text embeddings [B, D_text]."""
    size = latent_size or model.cfg.latent_size
    b = text.shape[0]
    x = torch.randn((b, LATENT_CHANNELS, size, size), generator=generator, device="cpu").to(text.device)
    sigmas = torch.linspace(1.0, 0.0, steps + 1, device=text.device)
    null_text = torch.zeros_like(text)
    x0 = x
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        s = sigma.expand(b)
        if guidance_scale == 1.0:
            x0 = model(x, s, text).float()
        else:
            both = model(torch.cat([x, x]), torch.cat([s, s]), torch.cat([text, null_text])).float()
            cond, uncond = both.chunk(2)
            x0 = uncond + guidance_scale * (cond - uncond)
        eps = (x - (1 - sigma) * x0) / sigma
        x = sigma_next * eps + (1 - sigma_next) * x0
    return x


def load_ema_model(step_dir: str) -> AT1Denoiser:
    """The EMA weights of a checkpoint written by any number of ranks: FSDP2 splits
    every parameter along dim 0 in rank order, so concatenating the ranks' EMA shards
    gives the full tensors."""
    with open(os.path.join(step_dir, "trainer.rank0.json")) as f:
        state = json.load(f)
    shards = [torch.load(os.path.join(step_dir, f"ema.rank{r}.pt"), map_location="cpu", weights_only=True)
              for r in range(state["world_size"])]
    weights = {name: torch.cat([shard[name] for shard in shards], dim=0) for name in shards[0]}
    model = AT1Denoiser(ModelConfig(**state["config"]))
    model.load_state_dict(weights)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    from shards import list_shards, read_all

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a checkpoint <step>/ directory")
    p.add_argument("--data", required=True, help="shard directory whose text embeddings condition the samples")
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help=".npy file for the float32 latents [count, 4, S, S]")
    args = p.parse_args(argv)
    model = load_ema_model(args.ckpt)
    samples = read_all(list_shards(args.data), limit=args.count)
    text = torch.from_numpy(np.stack([s.text for s in samples]))
    latents = sample_latents(model, text, args.steps, args.guidance_scale, torch.Generator().manual_seed(args.seed))
    np.save(args.out, latents.numpy(), allow_pickle=False)
    reference = np.stack([s.latent for s in samples])
    mse = float(((latents.numpy() - reference) ** 2).mean())
    print(f"wrote {tuple(latents.shape)} latents to {args.out}; MSE to the dataset latents of the same texts: {mse:.4f}")


if __name__ == "__main__":
    main()
