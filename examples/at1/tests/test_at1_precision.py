"""Issue 17, item 2: the precision decision table, and fp16 loss scaling that resumes
exactly (the scaler's state is in the checkpoint)."""
import json

import pytest
import torch

import train
from parallel import choose_precision


@pytest.fixture(autouse=True)
def _no_agent_env(monkeypatch):
    for var in ("DROVER_AGENT_SOCKET", "DROVER_CKPT_DIR", "DROVER_RESUME_DIR", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("device, requested, capability, name, dtype, scaler", [
    ("cpu", "auto", None, "fp32", None, False),
    ("cpu", "fp32", None, "fp32", None, False),
    ("cpu", "bf16", None, "bf16", torch.bfloat16, False),  # runs, slowly: for tests
    ("cuda", "auto", (9, 0), "bf16", torch.bfloat16, False),  # H100 / H200
    ("cuda", "auto", (8, 0), "bf16", torch.bfloat16, False),  # A100
    ("cuda", "auto", (8, 6), "bf16", torch.bfloat16, False),  # A10, RTX 30xx
    ("cuda", "auto", (7, 5), "fp16", torch.float16, True),  # T4, RTX 8000
    ("cuda", "auto", (7, 0), "fp16", torch.float16, True),  # V100
    ("cuda", "fp16", (9, 0), "fp16", torch.float16, True),
    ("cuda", "fp32", (7, 5), "fp32", None, False),
])
def test_precision_decision_table(device, requested, capability, name, dtype, scaler):
    p = choose_precision(device, requested, capability=capability, gpu_name="Test GPU")
    assert (p.name, p.compute_dtype, p.grad_scaler) == (name, dtype, scaler)
    assert p.describe().startswith(name)


def test_bf16_on_a_gpu_without_bf16_tensor_cores_is_refused():
    with pytest.raises(ValueError, match=r"Quadro RTX 8000, sm_75 has no bf16 tensor cores"):
        choose_precision("cuda", "bf16", capability=(7, 5), gpu_name="Quadro RTX 8000")
    with pytest.raises(ValueError, match="expected one of"):
        choose_precision("cpu", "fp8")


def test_trainer_prints_its_precision_choice(synthetic_data, capsys):
    train.main(["--config", "tiny", "--data", synthetic_data, "--steps", "1", "--batch-size", "4", "--val-samples", "4",
                "--device", "cpu"])
    assert "precision: fp32 (cpu)" in capsys.readouterr().out


def _scaler_state(step_dir) -> dict:
    with open(step_dir / "trainer.rank0.json") as f:
        state = json.load(f)
    assert state["precision"] == "fp16"
    return state["grad_scaler"]


def test_fp16_resume_restores_the_loss_scaler_exactly(synthetic_data, tmp_path):
    """fp16 with a loss scaler (autocast + torch.amp.GradScaler in one CPU process):
    the resumed run repeats the uninterrupted losses, and its scaler state (scale and
    growth counter, which counts steps since the last overflow) is the same at the
    end; a scaler started fresh on resume would count 2 instead of 5."""
    common = ["--config", "tiny", "--data", synthetic_data, "--steps", "5", "--batch-size", "4", "--warmup-steps", "2",
              "--val-samples", "4", "--log-every", "100", "--precision", "fp16", "--device", "cpu"]
    full = train.main(common + ["--ckpt-dir", str(tmp_path / "full")])
    train.main(common + ["--ckpt-dir", str(tmp_path / "cut"), "--ckpt-every", "3", "--stop-after-step", "4"])
    resumed = train.main(common + ["--ckpt-dir", str(tmp_path / "resumed"), "--resume-dir", str(tmp_path / "cut" / "3")])
    assert sorted(resumed.losses) == [4, 5]
    for step, loss in resumed.losses.items():
        assert abs(loss - full.losses[step]) <= 1e-6, step
    want = _scaler_state(tmp_path / "full" / "5")
    assert want["_growth_tracker"] == 5 and want["scale"] == 65536.0
    assert _scaler_state(tmp_path / "cut" / "3")["_growth_tracker"] == 3
    assert _scaler_state(tmp_path / "resumed" / "5") == want
