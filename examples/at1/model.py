"""AT-1 denoiser: a PixArt-alpha-inspired latent transformer with a convolutional MLP,
after apapiu/transformer_latent_diffusion.

Input: noisy latents [B, 4, S, S], noise level sigma [B] in [0, 1] (fp32: it is never
cast to the compute dtype), pooled text embedding [B, D_text]. Output: the predicted
clean latents x0, same shape as the input. README.md lists where this model differs
from transformer_latent_diffusion.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from configs import LATENT_CHANNELS, ModelConfig


class FourierNoiseEmbedding(nn.Module):
    """sin/cos features of sigma at log-spaced frequencies between 1 and 1000.

    Always computed in fp32 from an fp32 sigma: at the highest frequency (2*pi*1000
    rad per unit of sigma) the bf16 rounding of sigma (0.97 -> 0.9688) is a phase error
    of ~8 rad, i.e. a random feature. The frequencies stay fp32 even when the module is
    cast (`model.to(torch.bfloat16)`): `_apply` recomputes them."""

    def __init__(self, dims: int, min_freq: float = 1.0, max_freq: float = 1000.0):
        super().__init__()
        self.dims, self.min_freq, self.max_freq = dims, min_freq, max_freq
        # A buffer, not a parameter: fixed, and persistent=False keeps it out of checkpoints.
        self.register_buffer("angular_speeds", self._angular_speeds(), persistent=False)

    def _angular_speeds(self, device: torch.device | None = None) -> torch.Tensor:
        freqs = torch.exp(torch.linspace(math.log(self.min_freq), math.log(self.max_freq), self.dims // 2,
                                         dtype=torch.float32, device=device))
        return 2.0 * math.pi * freqs

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # Recomputed (on the CPU, so every device gets the same bits), not converted:
        # a dtype cast would round the frequencies, and `to_empty` would leave garbage.
        device = self.angular_speeds.device
        self.angular_speeds = self._angular_speeds(torch.device("cpu") if device.type != "meta" else device).to(device)
        return self

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        angles = sigma.float()[:, None] * self.angular_speeds[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Attention(nn.Module):
    """Multi-head attention on torch's scaled_dot_product_attention. Self-attention when
    called with one argument, cross-attention to `context` otherwise."""

    def __init__(self, width: int, heads: int, cross: bool, output_projection: bool):
        super().__init__()
        self.heads = heads
        self.cross = cross
        if cross:
            self.q = nn.Linear(width, width, bias=False)
            self.kv = nn.Linear(width, 2 * width, bias=False)
        else:
            self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width) if output_projection else nn.Identity()

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, d = t.shape
        return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.cross:
            q = self.q(x)
            k, v = self.kv(context).chunk(2, dim=-1)
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(self._split_heads(q), self._split_heads(k), self._split_heads(v))
        b, _, n, _ = out.shape
        return self.out(out.transpose(1, 2).reshape(b, n, -1))


class SepConvMLP(nn.Module):
    """1x1 conv -> 3x3 depthwise conv -> GELU -> 1x1 conv on the token grid: the
    depthwise conv lets every token see its spatial neighbours (LocalViT), which the
    AT-1 run found fixed the patchy outputs of the plain PixArt MLP."""

    def __init__(self, width: int, ratio: int, grid: int):
        super().__init__()
        hidden = ratio * width
        self.grid = grid
        self.expand = nn.Conv2d(width, hidden, kernel_size=1)
        self.depthwise = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.contract = nn.Conv2d(hidden, width, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        grid = x.transpose(1, 2).reshape(b, d, self.grid, self.grid)
        grid = self.contract(F.gelu(self.depthwise(self.expand(grid))))
        return grid.reshape(b, d, n).transpose(1, 2)


class LinearMLP(nn.Module):
    def __init__(self, width: int, ratio: int):
        super().__init__()
        self.fc1 = nn.Linear(width, ratio * width)
        self.fc2 = nn.Linear(ratio * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm block: self-attention, cross-attention to the context, MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.width
        self.norm_self = nn.LayerNorm(d)
        self.self_attention = Attention(d, cfg.heads, cross=False, output_projection=cfg.attention_output_projection)
        if cfg.cross_attention:
            self.norm_cross = nn.LayerNorm(d)
            self.cross_attention = Attention(d, cfg.heads, cross=True, output_projection=cfg.attention_output_projection)
        else:
            self.cross_attention = None
        self.norm_mlp = nn.LayerNorm(d)
        grid = cfg.latent_size // cfg.patch_size
        self.mlp = SepConvMLP(d, cfg.mlp_ratio, grid) if cfg.mlp_kind == "sepconv" else LinearMLP(d, cfg.mlp_ratio)
        self.checkpoint_activations = False  # recompute activations in backward (parallel.ParallelOptions)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_activations and torch.is_grad_enabled():
            # Inside forward, so FSDP2's hooks on this module stay outside the
            # checkpointed region (its parameters are gathered again before the
            # recomputation) and parameter names do not change.
            return checkpoint(self._forward, x, context, use_reentrant=False)
        return self._forward(x, context)

    def _forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attention(self.norm_self(x))
        if self.cross_attention is not None:
            x = x + self.cross_attention(self.norm_cross(x), context)
        return x + self.mlp(self.norm_mlp(x))


class AT1Denoiser(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d, p = cfg.width, cfg.patch_size
        # Patchify: a stride-p conv to 4*p*p channels is exactly a per-patch linear map.
        self.patchify = nn.Conv2d(LATENT_CHANNELS, cfg.patch_dim, kernel_size=p, stride=p)
        self.patch_norm = nn.LayerNorm(cfg.patch_dim)
        self.patch_proj = nn.Linear(cfg.patch_dim, d)
        self.embed_norm = nn.LayerNorm(d)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.tokens, d) * 0.02)

        self.noise_features = FourierNoiseEmbedding(cfg.noise_embed_dim)
        self.noise_mlp = nn.Sequential(nn.Linear(cfg.noise_embed_dim, d), nn.GELU(), nn.Linear(d, d))
        self.text_proj = nn.Linear(cfg.text_dim, d)
        self.context_norm = nn.LayerNorm(d)

        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(d)
        self.unpatch_proj = nn.Linear(d, cfg.patch_dim)

    def context(self, sigma: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        # Fourier features are computed in fp32 (sin of large angles needs it), then fed
        # to the MLP in whatever dtype its weights have (bf16 under FSDP mixed precision).
        features = self.noise_features(sigma).to(self.noise_mlp[0].weight.dtype)
        noise = self.noise_mlp(features)
        text = self.text_proj(text.to(self.text_proj.weight.dtype))
        return self.context_norm(torch.stack([noise, text], dim=1))  # [B, 2, D]

    def forward(self, x_noisy: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        b, c, h, w = x_noisy.shape
        if (c, h, w) != (LATENT_CHANNELS, cfg.latent_size, cfg.latent_size):
            raise ValueError(
                f"latents of shape {tuple(x_noisy.shape[1:])} do not fit config {cfg.name} "
                f"(expects {(LATENT_CHANNELS, cfg.latent_size, cfg.latent_size)})"
            )
        # Inputs arrive uncast (FSDP's root does not cast them, so that sigma stays
        # fp32): latents and text take the parameters' compute dtype here.
        x_noisy = x_noisy.to(self.patchify.weight.dtype)
        tokens = self.patchify(x_noisy).flatten(2).transpose(1, 2)  # [B, T, 4*p*p]
        tokens = self.embed_norm(self.patch_proj(self.patch_norm(tokens))) + self.pos_embed
        context = self.context(sigma, text)
        for block in self.blocks:
            tokens = block(tokens, context)
        patches = self.unpatch_proj(self.final_norm(tokens))  # [B, T, 4*p*p]
        return unpatchify(patches, cfg.patch_size, h // cfg.patch_size)


def unpatchify(patches: torch.Tensor, patch: int, grid: int) -> torch.Tensor:
    """[B, T, C*p*p] -> [B, C, grid*p, grid*p]; the inverse of the stride-p patch conv's
    channel order (channel-major, then row, then column within the patch)."""
    b = patches.shape[0]
    x = patches.reshape(b, grid, grid, LATENT_CHANNELS, patch, patch)
    x = x.permute(0, 3, 1, 4, 2, 5)  # B, C, gh, p, gw, p
    return x.reshape(b, LATENT_CHANNELS, grid * patch, grid * patch)
