"""Trainer flags of issue 17 that need a run to check: --pool-text (item 4) and reading
the loss back from the device only on log steps (item 9)."""
import json

import numpy as np
import pytest
import torch

import train
from shards import ShardFormatError, write_shard


@pytest.fixture(autouse=True)
def _no_agent_env(monkeypatch):
    for var in ("DROVER_AGENT_SOCKET", "DROVER_CKPT_DIR", "DROVER_RESUME_DIR", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)


def test_per_token_text_stops_the_trainer_unless_pool_text_mean(tmp_path):
    rng = np.random.default_rng(0)
    samples = [(f"s{i}", rng.standard_normal((4, 16, 16)).astype(np.float16),
                rng.standard_normal((7, 768)).astype(np.float16)) for i in range(8)]
    write_shard(str(tmp_path / "tokens.tar"), samples)
    args = ["--config", "tiny", "--data", str(tmp_path), "--steps", "1", "--batch-size", "4", "--log-every", "100"]
    with pytest.raises(ShardFormatError, match=r"tokens\.tar: sample 's\d': member s\d\.text\.npy is a per-token array \(7, 768\)"):
        train.main(args)
    assert sorted(train.main(args + ["--pool-text", "mean"]).losses) == [1]


def test_losses_are_read_from_the_device_only_on_log_steps(synthetic_data, monkeypatch, capsys):
    reads = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(self.numel()) or original(self))
    result = train.main(["--config", "tiny", "--data", synthetic_data, "--steps", "6", "--batch-size", "4",
                         "--log-every", "3", "--val-samples", "4"])
    assert reads == [3, 3]  # one read per progress line, of the three losses since the last
    assert sorted(result.losses) == [1, 2, 3, 4, 5, 6] and all(np.isfinite(list(result.losses.values())))
    metrics = [json.loads(line[len("drover: "):]) for line in capsys.readouterr().out.splitlines() if line.startswith("drover: ")]
    steps = [m["step"] for m in metrics if "loss" in m["values"]]
    assert steps == [3, 6]
    assert [m["values"]["loss"] for m in metrics if "loss" in m["values"]] == [result.losses[3], result.losses[6]]


def test_adamw_on_cpu_keeps_the_exact_per_tensor_loop():
    """CUDA gets foreach kernels (test_at1_cuda.py); CPU keeps the loop the equivalence
    tests rely on."""
    import argparse

    from configs import get_config
    from model import AT1Denoiser

    optimizer = train.build_optimizer(AT1Denoiser(get_config("tiny")), argparse.Namespace(lr=1e-3, weight_decay=0.01))
    assert optimizer.defaults["foreach"] is False
