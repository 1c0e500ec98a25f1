import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from configs import DIT_XL_2, NAMED_CONFIGS, get_config
from flops import count_parameters, forward_macs, training_flops_per_image
from model import AT1Denoiser, unpatchify

# (low, high) parameter counts the issue asks for.
EXPECTED_PARAMS = {
    "tiny": (1e5, 1e6),
    "at1-small": (22e6, 24e6),
    "tld-100m": (99e6, 103e6),
    "xl": (4.5e8, 6.5e8),
}


@pytest.mark.parametrize("name", sorted(NAMED_CONFIGS))
def test_named_config_parameter_counts(name):
    low, high = EXPECTED_PARAMS[name]
    assert low <= count_parameters(NAMED_CONFIGS[name]) <= high


@pytest.mark.parametrize("name", sorted(NAMED_CONFIGS))
def test_forward_shape_of_every_config_on_meta_device(name):
    cfg = NAMED_CONFIGS[name]
    with torch.device("meta"):
        model = AT1Denoiser(cfg)
        x = torch.empty(2, 4, cfg.latent_size, cfg.latent_size)
        out = model(x, torch.empty(2), torch.empty(2, cfg.text_dim))
    assert out.shape == x.shape


def test_tiny_forward_backward_on_cpu():
    cfg = get_config("tiny")
    model = AT1Denoiser(cfg)
    x = torch.randn(3, 4, 16, 16)
    out = model(x, torch.rand(3), torch.randn(3, 768))
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bf16_forward_as_under_fsdp_mixed_precision():
    """FSDP's bf16 policy casts weights and inputs to bf16; fp32 Fourier features must
    not meet bf16 weights."""
    model = AT1Denoiser(get_config("tiny")).to(torch.bfloat16)
    x = torch.randn(2, 4, 16, 16, dtype=torch.bfloat16)
    out = model(x, torch.rand(2, dtype=torch.bfloat16), torch.randn(2, 768, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == x.shape


def test_count_parameters_matches_a_real_model():
    cfg = get_config("tiny")
    assert count_parameters(cfg) == sum(p.numel() for p in AT1Denoiser(cfg).parameters())


def test_wrong_latent_shape_is_a_clear_error():
    model = AT1Denoiser(get_config("tiny"))
    with pytest.raises(ValueError, match="do not fit config tiny"):
        model(torch.randn(1, 4, 32, 32), torch.rand(1), torch.randn(1, 768))


def test_unpatchify_inverts_the_patch_conv_layout():
    """With the patch conv set to copy each input pixel to its own channel,
    unpatchify must give back the input: the two agree on channel order."""
    cfg = get_config("tiny")
    model = AT1Denoiser(cfg)
    p = cfg.patch_size
    with torch.no_grad():
        model.patchify.weight.zero_()
        model.patchify.bias.zero_()
        for c in range(4):
            for i in range(p):
                for j in range(p):
                    model.patchify.weight[c * p * p + i * p + j, c, i, j] = 1.0
    x = torch.randn(2, 4, 16, 16)
    tokens = model.patchify(x).flatten(2).transpose(1, 2)
    assert torch.equal(unpatchify(tokens, p, 16 // p), x)


def test_dit_xl2_flops_match_the_dit_paper():
    # DiT paper, Table 4: DiT-XL/2 at 256x256 is 118.6 Gflops (multiply-add = 1 op).
    gflops = forward_macs(DIT_XL_2) / 1e9
    assert abs(gflops - 118.6) / 118.6 < 0.02, gflops
    assert training_flops_per_image(DIT_XL_2) == 6 * forward_macs(DIT_XL_2)


@pytest.mark.parametrize("config", [get_config("tiny"), get_config("tiny", mlp_kind="linear", attention_output_projection=True)],
                         ids=["tiny", "tiny-dit-shaped"])
def test_analytic_macs_agree_with_torch_flop_counter(config):
    """torch's FlopCounterMode counts 2 FLOPs per multiply-add of matmuls, convs and
    attention; our analytic count must agree with what the model actually runs."""
    model = AT1Denoiser(config)
    batch = 2
    counter = FlopCounterMode(display=False)
    # The math backend decomposes attention into matmuls the counter sees (it does not
    # count the fused CPU kernel).
    with sdpa_kernel(SDPBackend.MATH), counter, torch.no_grad():
        model(torch.randn(batch, 4, config.latent_size, config.latent_size), torch.rand(batch), torch.randn(batch, 768))
    measured_macs_per_image = counter.get_total_flops() / 2 / batch
    assert abs(measured_macs_per_image - forward_macs(config)) / forward_macs(config) < 0.01
