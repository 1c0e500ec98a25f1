"""GPU-only paths of issue 17 (items 1, 2, 7, 8); skipped on machines without CUDA."""
import argparse

import pytest
import torch

import train
from configs import get_config
from model import AT1Denoiser
from parallel import choose_precision

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _no_agent_env(monkeypatch):
    for var in ("DROVER_AGENT_SOCKET", "DROVER_CKPT_DIR", "DROVER_RESUME_DIR", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)


def test_auto_precision_follows_the_devices_capability():
    p = choose_precision(torch.device("cuda"))
    capability = torch.cuda.get_device_capability()
    assert p.name == ("bf16" if capability >= (8, 0) else "fp16") and p.grad_scaler == (p.name == "fp16")


def test_noise_features_on_a_low_precision_gpu_model_equal_the_fp32_ones():
    dtype = choose_precision(torch.device("cuda")).compute_dtype
    sigma = torch.tensor([0.97, 0.3131, 0.999])
    reference = AT1Denoiser(get_config("tiny")).noise_features(sigma.double()).float()
    model = AT1Denoiser(get_config("tiny")).to("cuda", dtype)
    seen = {}
    model.noise_features.register_forward_hook(lambda m, args, out: seen.update(sigma=args[0], features=out))
    with torch.no_grad():
        model(torch.randn(3, 4, 16, 16, device="cuda"), sigma.cuda(), torch.randn(3, 768, device="cuda"))
    assert seen["sigma"].dtype == torch.float32
    # GPU sin/cos of angles up to ~6300 rad in fp32: ~1e-3 from the float64 value; the
    # bf16-rounded sigma would be off by O(1).
    torch.testing.assert_close(seen["features"].cpu(), reference, rtol=0, atol=5e-3)


def test_adamw_uses_foreach_kernels_on_cuda_and_the_per_tensor_loop_on_cpu():
    args = argparse.Namespace(lr=1e-3, weight_decay=0.01)
    assert train.build_optimizer(AT1Denoiser(get_config("tiny")).cuda(), args).defaults["foreach"] is True
    assert train.build_optimizer(AT1Denoiser(get_config("tiny")), args).defaults["foreach"] is False


@pytest.mark.parametrize("precision", ["auto", "fp16"])
def test_cuda_training_prints_its_precision_and_mfu_peak(synthetic_data, capsys, precision):
    result = train.main(["--config", "tiny", "--data", synthetic_data, "--steps", "3", "--batch-size", "8",
                         "--val-samples", "8", "--device", "cuda", "--precision", precision])
    out = capsys.readouterr().out
    assert sorted(result.losses) == [1, 2, 3]
    assert "precision: " in out and ("MFU peak: " in out or "--peak-flops" in out)
    if precision == "fp16":
        assert " scale " in out
