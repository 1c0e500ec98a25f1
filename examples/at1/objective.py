"""The training objective: x0-prediction MSE on x_noisy = sigma*eps + (1-sigma)*x,
sigma ~ Beta(a, b) (default Beta(1, 2.5), transformer_latent_diffusion's: most weight
on low noise levels), with a fraction of text embeddings zeroed so the same model also
learns the unconditional prediction used by classifier-free guidance."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# transformer_latent_diffusion (commit 2352f00, "change defaults for betas to have the
# model see less noisy data during training"): mean 0.29, density 0 at sigma = 1.
TRAIN_SIGMA_BETA = (1.0, 2.5)
# The validation noise levels stay what they were, whatever --sigma-beta says: scores
# must stay comparable across runs. U-shaped, so both ends of the range are scored.
VALIDATION_SIGMA_BETA = (0.75, 0.75)


@dataclass
class NoiseDraw:
    sigma: torch.Tensor  # [B] float32
    eps: torch.Tensor  # [B, 4, S, S] float32
    keep_text: torch.Tensor  # [B] float32, 0 where the text embedding is dropped


class NoiseSource:
    """All randomness of the objective, from one numpy Generator whose state is plain
    JSON (so checkpoints need no pickle) and which makes resumed runs bit-identical.
    Drawing eps on the CPU costs a little at large batch but keeps CPU and CUDA runs
    and any world size reproducible from the same seed."""

    def __init__(self, seed: int | list[int], text_drop_prob: float, sigma_beta: tuple[float, float] = TRAIN_SIGMA_BETA):
        a, b = sigma_beta
        if not (a > 0 and b > 0):
            raise ValueError(f"--sigma-beta {a} {b}: both Beta parameters must be positive")
        self.rng = np.random.default_rng(seed)
        self.text_drop_prob = text_drop_prob
        self.sigma_beta = (float(a), float(b))

    def draw(self, batch: int, latent_shape: tuple[int, ...]) -> NoiseDraw:
        sigma = self.rng.beta(*self.sigma_beta, size=batch).astype(np.float32)
        eps = self.rng.standard_normal((batch, *latent_shape), dtype=np.float32)
        keep = (self.rng.random(batch) >= self.text_drop_prob).astype(np.float32)
        return NoiseDraw(torch.from_numpy(sigma), torch.from_numpy(eps), torch.from_numpy(keep))

    def state_dict(self) -> dict:
        return {"bit_generator": self.rng.bit_generator.state, "text_drop_prob": self.text_drop_prob,
                "sigma_beta": list(self.sigma_beta)}

    def load_state_dict(self, state: dict) -> None:
        """The RNG position and the distribution it draws from (a checkpoint written
        before --sigma-beta existed keeps this run's)."""
        self.rng.bit_generator.state = state["bit_generator"]
        self.text_drop_prob = state["text_drop_prob"]
        self.sigma_beta = tuple(state.get("sigma_beta", self.sigma_beta))


def add_noise(x0: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    return s * eps + (1 - s) * x0


def denoising_loss(model, x0: torch.Tensor, text: torch.Tensor, noise: NoiseDraw) -> torch.Tensor:
    """Mean squared error of the x0 prediction, averaged over the local batch."""
    device = x0.device
    sigma, eps, keep = noise.sigma.to(device), noise.eps.to(device), noise.keep_text.to(device)
    x_noisy = add_noise(x0, sigma, eps)
    prediction = model(x_noisy, sigma, text * keep[:, None])
    # At least fp32 (a bf16 prediction is promoted), never less than the model computes
    # in: a float64 model keeps a float64 loss and gradient.
    loss_dtype = torch.promote_types(prediction.dtype, torch.float32)
    return torch.nn.functional.mse_loss(prediction.to(loss_dtype), x0.to(loss_dtype))


def validation_noise(sample_index: int, seed: int, latent_shape: tuple[int, ...]) -> tuple[float, np.ndarray]:
    """The fixed noise a validator uses for one held-out sample: a function of the
    sample's index only, so the score does not depend on world size or batch size."""
    rng = np.random.default_rng([seed, sample_index])
    sigma = float(rng.beta(*VALIDATION_SIGMA_BETA))
    eps = rng.standard_normal(latent_shape, dtype=np.float32)
    return sigma, eps
