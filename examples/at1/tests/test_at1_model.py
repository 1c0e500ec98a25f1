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
    """FSDP's bf16 policy casts the weights, not the root's inputs: the model casts
    latents and text itself, and fp32 Fourier features must not meet bf16 weights."""
    model = AT1Denoiser(get_config("tiny")).to(torch.bfloat16)
    x = torch.randn(2, 4, 16, 16)
    out = model(x, torch.rand(2), torch.randn(2, 768))
    assert out.dtype == torch.bfloat16 and out.shape == x.shape


def _features_seen(model, sigma, dtype):
    seen = {}
    model.noise_features.register_forward_hook(lambda m, args, out: seen.update(sigma=args[0], features=out))
    with torch.no_grad():
        model(torch.randn(2, 4, 16, 16, dtype=dtype), sigma, torch.randn(2, 768, dtype=dtype))
    return seen


def test_noise_features_of_a_bf16_model_equal_the_fp32_features():
    """Issue 17, item 1: sigma 0.97 rounded to bf16 (0.9688) shifts the highest-frequency
    feature by ~8 rad. A bf16-parameter model given fp32 sigma must compute exactly the
    fp32 model's features (its frequencies stay fp32 through `.to(bfloat16)` too)."""
    sigma = torch.tensor([0.97, 0.3131])
    fp32 = _features_seen(AT1Denoiser(get_config("tiny")), sigma, torch.float32)
    bf16_model = AT1Denoiser(get_config("tiny")).to(torch.bfloat16)
    assert bf16_model.noise_features.angular_speeds.dtype == torch.float32
    bf16 = _features_seen(bf16_model, sigma, torch.bfloat16)
    assert bf16["sigma"].dtype == torch.float32
    torch.testing.assert_close(bf16["features"], fp32["features"], rtol=0, atol=0)
    # What the test guards against: the same features from bf16-rounded sigma.
    rounded = AT1Denoiser(get_config("tiny")).noise_features(sigma.bfloat16())
    assert float((rounded - fp32["features"]).abs().max()) > 0.5
    # The highest frequency is 1000 cycles per unit of sigma: 0.97 vs 0.96875 is 7.85 rad.
    speeds = bf16_model.noise_features.angular_speeds
    assert abs(float(speeds[-1]) * (0.97 - float(torch.tensor(0.97).bfloat16())) - 7.85) < 0.01


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    """Recomputing the blocks in backward must not change what is computed (float64,
    so equal to the last bits of the same kernels)."""
    from parallel import ParallelOptions, apply_options, choose_precision

    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = AT1Denoiser(get_config("tiny")).double()
        apply_options(model, ParallelOptions(choose_precision("cpu"), activation_checkpointing=checkpointing))
        assert all(b.checkpoint_activations == checkpointing for b in model.blocks)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64)
        loss = model(x, torch.rand(2, generator=g, dtype=torch.float64), torch.randn(2, 768, generator=g, dtype=torch.float64)).pow(2).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert torch.equal(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-12, atol=1e-15, msg=name)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit, imported by torch.compile
def test_compile_option_compiles_each_block_without_renaming_parameters():
    """Wiring only (compiling on a 2-core CPU is too slow for the suite): --compile
    wraps every block's call in torch.compile, and checkpoint names stay the same."""
    from parallel import ParallelOptions, apply_options, choose_precision

    model = AT1Denoiser(get_config("tiny"))
    names = [n for n, _ in model.named_parameters()]
    apply_options(model, ParallelOptions(choose_precision("cpu"), compile=True))
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in model.blocks)
    assert [n for n, _ in model.named_parameters()] == names


@pytest.mark.parametrize("gpu_name, precision, tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989),
    ("NVIDIA H100 PCIe", "bf16", 756),
    ("NVIDIA H200", "bf16", 989),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312),
    ("NVIDIA A100 80GB PCIe", "fp16", 312),
    ("Quadro RTX 8000", "fp16", 130),
    ("Quadro RTX 8000", "bf16", None),  # Turing has no bf16
    ("NVIDIA GeForce GTX 1080", "fp16", None),
    ("NVIDIA H100 80GB HBM3", "fp32", None),
])
def test_peak_flops_table_lookup(gpu_name, precision, tflops):
    from flops import peak_flops_for

    assert peak_flops_for(gpu_name, precision) == (tflops * 1e12 if tflops else None)


def test_peak_flops_explicit_value_wins_and_unknown_gpus_ask_for_one():
    from flops import resolve_peak_flops

    assert resolve_peak_flops(123e12, "NVIDIA H100 80GB HBM3", "bf16")[0] == 123e12
    value, line = resolve_peak_flops(None, "NVIDIA A100-SXM4-40GB", "bf16")
    assert value == 312e12 and "312 TFLOPS/s" in line and "A100" in line
    value, line = resolve_peak_flops(None, "Mystery GPU 9000", "bf16")
    assert value is None and "--peak-flops" in line and "Mystery GPU 9000" in line


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
