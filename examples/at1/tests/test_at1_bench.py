"""bench_gpu.py (issue 17, item 10): a clear exit without a GPU; a short real run with one."""
import json
import os
import subprocess
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench_gpu.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit; a CUDA machine runs the real benchmark test")
def test_bench_without_a_gpu_says_so_and_exits_cleanly():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, BENCH], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout and "Traceback" not in done.stderr



@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_bench_require_gpu_fails_without_one(capsys):
    import bench_gpu

    assert bench_gpu.main(["--require-gpu"]) == 1
    assert "no CUDA device" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_measures_every_variant_on_a_gpu(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run([sys.executable, BENCH, "--configs", "tiny", "--latent-size", "16", "--steps", "2",
                           "--warmup-steps", "1", "--batch-size", "8", "--peak-flops", "1e14", "--json", str(out),
                           "--variants", "fsdp,fsdp-foreach-off,fsdp+no-reshard,fsdp+ac,autocast"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in results] == ["fsdp", "fsdp-foreach-off", "fsdp+no-reshard", "fsdp+ac", "autocast"]
    for r in results:
        assert "error" not in r, r
        assert r["images_per_s"] > 0 and 0 < r["mfu"] < 1 and r["precision"] in ("bf16", "fp16")
