"""Parameter and FLOPs accounting for any ModelConfig.

Convention (same as the DiT paper, Peebles & Xie 2023, Table 1 "Gflops"): one
multiply-add counts as ONE op. `forward_macs` returns that number for one image.
Only matrix products are counted (linear layers, convolutions, the two attention
matmuls); norms, activations, softmax and adds are ignored, as in DiT.

For MFU we need real hardware FLOPs, where a multiply-add is TWO floating-point
operations, and training costs forward + backward ~= 3x forward:
    training_flops_per_image = 2 * 3 * forward_macs
"""
from __future__ import annotations

import torch

from configs import LATENT_CHANNELS, ModelConfig
from model import AT1Denoiser

# Dense bf16 peak of one H100 SXM, FLOPs/s, without sparsity.
H100_BF16_PEAK_FLOPS = 989e12


def count_parameters(cfg: ModelConfig) -> int:
    """Exact parameter count, building the model on the meta device (no memory)."""
    with torch.device("meta"):
        model = AT1Denoiser(cfg)
    return sum(p.numel() for p in model.parameters())


def forward_macs(cfg: ModelConfig) -> int:
    """Multiply-adds of one forward pass for one image (DiT convention)."""
    d, t, c = cfg.width, cfg.tokens, cfg.context_tokens
    p = cfg.patch_size
    hidden = cfg.mlp_ratio * d

    embed = t * cfg.patch_dim * (LATENT_CHANNELS * p * p)  # stride-p patch conv
    embed += t * cfg.patch_dim * d  # patch projection to width D
    conditioning = cfg.noise_embed_dim * d + d * d + cfg.text_dim * d if cfg.cross_attention else 0

    self_attention = 3 * t * d * d + 2 * t * t * d  # qkv projection; QK^T and AV
    if cfg.attention_output_projection:
        self_attention += t * d * d
    cross_attention = 0
    if cfg.cross_attention:
        cross_attention = t * d * d + 2 * c * d * d + 2 * t * c * d  # q; kv of context; QK^T, AV
        if cfg.attention_output_projection:
            cross_attention += t * d * d
    mlp = 2 * t * d * hidden
    if cfg.mlp_kind == "sepconv":
        mlp += t * hidden * 9  # 3x3 depthwise
    block = self_attention + cross_attention + mlp

    output = t * d * cfg.patch_dim
    return embed + conditioning + cfg.depth * block + output


def training_flops_per_image(cfg: ModelConfig) -> int:
    """Hardware FLOPs (2 per multiply-add) of forward + backward for one image."""
    return 2 * 3 * forward_macs(cfg)


def model_report(cfg: ModelConfig) -> dict:
    return {
        "config": cfg.name,
        "parameters": count_parameters(cfg),
        "forward_gmacs_per_image": forward_macs(cfg) / 1e9,
        "training_tflops_per_image": training_flops_per_image(cfg) / 1e12,
    }


if __name__ == "__main__":
    from configs import DIT_XL_2, NAMED_CONFIGS

    for config in [*NAMED_CONFIGS.values(), DIT_XL_2]:
        r = model_report(config)
        print(
            f"{r['config']:>10}: {r['parameters'] / 1e6:8.2f}M params, "
            f"{r['forward_gmacs_per_image']:8.2f} GMACs forward/image, "
            f"{r['training_tflops_per_image'] * 1e3:8.2f} GFLOPs training/image"
        )
