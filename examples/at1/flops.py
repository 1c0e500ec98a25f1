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

# Dense (no sparsity) tensor-core peak TFLOPS/s per GPU by compute precision, from the
# vendor data sheets. Matched against torch.cuda.get_device_name() in order, first
# match wins (so "H100 PCIe" before "H100"). fp16 here means fp16 inputs with fp32
# accumulation, what autocast/FSDP mixed precision runs.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bf16": 989, "fp16": 989}),
    ("H100 PCIe", {"bf16": 756, "fp16": 756}),
    ("H100", {"bf16": 989, "fp16": 989}),  # SXM / HBM3
    ("A100", {"bf16": 312, "fp16": 312}),
    ("RTX 8000", {"fp16": 130}),  # Quadro RTX 8000 (Turing, sm_75): no bf16
    ("V100", {"fp16": 125}),
)
# Kept for callers of the old constant: dense bf16 peak of one H100 SXM, FLOPs/s.
H100_BF16_PEAK_FLOPS = 989e12


def peak_flops_for(gpu_name: str, precision: str) -> float | None:
    """Dense peak FLOPs/s of `gpu_name` at `precision` ("bf16", "fp16", "fp32"), or
    None when the table does not know the GPU or that precision on it."""
    for pattern, peaks in PEAK_TFLOPS:
        if pattern.lower() in gpu_name.lower():
            tflops = peaks.get(precision)
            return tflops * 1e12 if tflops is not None else None
    return None


def resolve_peak_flops(explicit: float | None, gpu_name: str, precision: str) -> tuple[float | None, str]:
    """(peak FLOPs/s for MFU or None, a line saying where it came from). An explicit
    value (--peak-flops, AT1_PEAK_FLOPS) wins; otherwise the table; an unknown GPU
    gets no MFU and a note asking for --peak-flops."""
    if explicit:
        return explicit, f"MFU peak: {explicit / 1e12:.0f} TFLOPS/s per GPU (--peak-flops / AT1_PEAK_FLOPS; {gpu_name}, {precision})"
    found = peak_flops_for(gpu_name, precision)
    if found is None:
        return None, (f"note: no {precision} peak known for {gpu_name!r} (flops.PEAK_TFLOPS); MFU is not reported. "
                      f"Pass --peak-flops <dense FLOPs/s per GPU> or set AT1_PEAK_FLOPS")
    return found, f"MFU peak: {found / 1e12:.0f} TFLOPS/s per GPU ({gpu_name}, dense {precision}, flops.PEAK_TFLOPS)"


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
