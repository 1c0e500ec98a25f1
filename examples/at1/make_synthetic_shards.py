"""Write synthetic, learnable AT-1 shards for tests and the demo.

Each sample has a hidden "concept" z ~ N(0, I_8). Its text embedding is a fixed random
linear image of z in R^D (D=768 by default) plus a little noise, like real text
embeddings, which occupy a low-dimensional part of their space. Its latent is a fixed
function of z: K fixed smooth spatial patterns weighted by tanh of a fixed random
linear map of z, plus a little noise:

    text   = A z + 0.1 * noise
    latent = sum_k tanh((B z)_k) * pattern_k + 0.05 * noise

so a model can only lower its loss at high noise levels by learning the text -> latent
map, like a real text-conditioned model. Latents have roughly unit variance, like
SDXL VAE latents after the usual scaling.

    python make_synthetic_shards.py --out /tmp/at1-data --train-samples 4096 --val-samples 256
writes /tmp/at1-data/train/shard-00000.tar ... and /tmp/at1-data/val/shard-00000.tar ...
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from shards import write_shard  # noqa: E402


class SyntheticLatentMap:
    """The fixed random concept -> (text, latent) maps, determined by `map_seed` alone."""

    def __init__(self, latent_size: int, text_dim: int, components: int = 16, concept_dim: int = 8, map_seed: int = 1234):
        rng = np.random.default_rng(map_seed)
        self.text_dim, self.concept_dim = text_dim, concept_dim
        self.to_text = rng.standard_normal((text_dim, concept_dim)) / np.sqrt(concept_dim)
        self.to_coefficients = rng.standard_normal((components, concept_dim)) / np.sqrt(concept_dim)
        ys, xs = np.meshgrid(np.linspace(0, 1, latent_size), np.linspace(0, 1, latent_size), indexing="ij")
        patterns = []
        for _ in range(components):
            fy, fx = rng.integers(0, 3, size=2)
            phase = rng.uniform(0, 2 * np.pi, size=4)
            channel_mix = rng.standard_normal(4)
            base = np.cos(np.pi * (fy * ys + fx * xs) + phase[:, None, None])  # [4, S, S]
            patterns.append(base * channel_mix[:, None, None])
        patterns = np.stack(patterns)  # [K, 4, S, S]
        # E[tanh(N(0,1))^2] ~= 0.39: scaled so latents have about unit variance.
        self.patterns = patterns / patterns.std() / np.sqrt(0.39 * components)

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(latent [4, S, S], text [D]) of one random concept."""
        concept = rng.standard_normal(self.concept_dim)
        text = self.to_text @ concept + 0.1 * rng.standard_normal(self.text_dim)
        coefficients = np.tanh(self.to_coefficients @ concept)
        latent = np.tensordot(coefficients, self.patterns, axes=1)
        return latent + 0.05 * rng.standard_normal(latent.shape), text


def write_split(out_dir: str, count: int, per_shard: int, latent_map: SyntheticLatentMap, seed: int, prefix: str) -> int:
    if count <= 0:
        return 0  # no directory either: an empty val/ would read as "validation shards missing"
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards = 0
    for start in range(0, count, per_shard):
        samples = []
        for i in range(start, min(count, start + per_shard)):
            latent, text = latent_map.sample(rng)
            samples.append((f"{prefix}{i:08d}", latent.astype(np.float16), text.astype(np.float16)))
        write_shard(os.path.join(out_dir, f"shard-{shards:05d}.tar"), samples)
        shards += 1
    return shards


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (train/ and val/ are created in it)")
    parser.add_argument("--train-samples", type=int, default=4096)
    parser.add_argument("--val-samples", type=int, default=256)
    parser.add_argument("--samples-per-shard", type=int, default=256)
    parser.add_argument("--latent-size", type=int, default=16, help="latent side S (image side / 8); tiny uses 16")
    parser.add_argument("--text-dim", type=int, default=768)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    latent_map = SyntheticLatentMap(args.latent_size, args.text_dim)
    train = write_split(os.path.join(args.out, "train"), args.train_samples, args.samples_per_shard, latent_map, args.seed, "train")
    # A different seed: validation samples are never training samples.
    val = write_split(os.path.join(args.out, "val"), args.val_samples, args.samples_per_shard, latent_map, args.seed + 1_000_003, "val")
    print(f"wrote {train} train shards ({args.train_samples} samples) and {val} val shards ({args.val_samples} samples) under {args.out}")


if __name__ == "__main__":
    main()
