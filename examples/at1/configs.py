"""Named model configurations of the AT-1 latent transformer.

A config fully determines the network's shapes; nothing else in the trainer changes
the architecture. Parameter counts quoted below come from `flops.count_parameters`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

LATENT_CHANNELS = 4  # SDXL-style VAE latents: 4 x (H/8) x (W/8)


@dataclass(frozen=True)
class ModelConfig:
    name: str
    width: int  # D, the transformer width
    depth: int  # number of transformer blocks
    latent_size: int = 32  # latent side length (H/8); 32 = 256 px images
    patch_size: int = 2
    head_dim: int = 64
    mlp_ratio: int = 4
    # "sepconv": 1x1 conv -> 3x3 depthwise conv -> GELU -> 1x1 conv on the token grid
    # (AT-1 / transformer_latent_diffusion). "linear": the standard transformer MLP,
    # only used to describe DiT-shaped models for FLOPs comparisons.
    mlp_kind: str = "sepconv"
    cross_attention: bool = True
    # AT-1 (after transformer_latent_diffusion) has no output projection after
    # attention; DiT and most transformers have one.
    attention_output_projection: bool = False
    text_dim: int = 768  # D_text, the pooled text embedding fed in
    noise_embed_dim: int = 128  # Fourier features of the noise level (transformer_latent_diffusion: 256)

    @property
    def tokens(self) -> int:
        return (self.latent_size // self.patch_size) ** 2

    @property
    def context_tokens(self) -> int:
        # noise-level embedding + projected pooled text embedding
        return 2

    @property
    def patch_dim(self) -> int:
        return LATENT_CHANNELS * self.patch_size * self.patch_size

    @property
    def heads(self) -> int:
        return self.width // self.head_dim

    def validate(self) -> "ModelConfig":
        if self.width % self.head_dim:
            raise ValueError(f"config {self.name}: width {self.width} is not a multiple of head_dim {self.head_dim}")
        if self.latent_size % self.patch_size:
            raise ValueError(f"config {self.name}: latent_size {self.latent_size} is not a multiple of patch_size {self.patch_size}")
        if self.mlp_kind not in ("sepconv", "linear"):
            raise ValueError(f"config {self.name}: mlp_kind must be 'sepconv' or 'linear', got {self.mlp_kind!r}")
        return self

    def with_overrides(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes).validate()


NAMED_CONFIGS: dict[str, ModelConfig] = {
    # CPU tests and the demo: 16x16 latents (128 px), about 0.5M parameters.
    "tiny": ModelConfig(name="tiny", width=96, depth=3, latent_size=16, head_dim=32, noise_embed_dim=32),
    # The AT-1 run's small model, about 23M parameters.
    "at1-small": ModelConfig(name="at1-small", width=512, depth=6),
    # transformer_latent_diffusion's 100M model: D=768, 12 layers.
    "tld-100m": ModelConfig(name="tld-100m", width=768, depth=12),
    # DiT-XL-sized AT-1 model.
    "xl": ModelConfig(name="xl", width=1152, depth=28, head_dim=72),
}

# Not trainable by this trainer as-is (no adaLN): the shape of DiT-XL/2 at 256 px, used to
# check the FLOPs function against the DiT paper's 118.6 GFLOPs.
DIT_XL_2 = ModelConfig(
    name="dit-xl/2",
    width=1152,
    depth=28,
    latent_size=32,
    head_dim=72,
    mlp_kind="linear",
    cross_attention=False,
    attention_output_projection=True,
)


def get_config(name: str, **overrides) -> ModelConfig:
    try:
        base = NAMED_CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown config {name!r}; known: {', '.join(sorted(NAMED_CONFIGS))}") from None
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return base.with_overrides(**overrides) if overrides else base.validate()
