import json
import os
import socket
import threading

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import dist_harness
import train
from configs import get_config
from model import AT1Denoiser
from parallel import DistContext
from sample import sample_latents

ONE_RANK = DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"),
                       sharded=False, owns_process_group=False)


@pytest.fixture(autouse=True)
def _no_agent_env(monkeypatch):
    for var in ("DROVER_AGENT_SOCKET", "DROVER_CKPT_DIR", "DROVER_RESUME_DIR", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)


def test_loss_decreases_on_synthetic_data(synthetic_data):
    result = train.main(["--config", "tiny", "--data", synthetic_data, "--steps", "40", "--batch-size", "8",
                         "--lr", "1e-3", "--warmup-steps", "5", "--val-every", "20", "--val-samples", "48", "--log-every", "10"])
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5])
    assert result.val_losses[40] < result.val_losses[20]


def test_one_rank_resume_reproduces_the_uninterrupted_run(synthetic_data, tmp_path):
    common = ["--config", "tiny", "--data", synthetic_data, "--steps", "10", "--batch-size", "8", "--warmup-steps", "3",
              "--val-every", "5", "--val-samples", "16", "--log-every", "100"]
    full = train.main(common)
    train.main(common + ["--ckpt-dir", str(tmp_path), "--ckpt-every", "4", "--stop-after-step", "6"])
    resumed = train.main(common + ["--resume-dir", str(tmp_path / "4")])
    assert sorted(resumed.losses) == list(range(5, 11))
    # The same process, kernels and reduction order on both sides: the runs agree to the
    # bit on any machine, and 1e-6 only allows for the float round trip of the metric.
    for step, loss in resumed.losses.items():
        assert abs(loss - full.losses[step]) <= 1e-6, step
    assert abs(resumed.val_losses[10] - full.val_losses[10]) <= 1e-6


def test_one_rank_outer_sync_resume_reproduces_the_uninterrupted_run(synthetic_data, tmp_path, capsys):
    """Single-worker DiLoCo (one group): a checkpoint between two outer steps (step 4,
    H = 3) carries the outer parameters, momentum and step, so the resumed run takes the
    same outer steps with the same bits."""
    common = ["--config", "tiny", "--data", synthetic_data, "--steps", "10", "--batch-size", "8", "--warmup-steps", "3",
              "--val-samples", "16", "--log-every", "100", "--outer-every", "3"]
    full = train.main(common)
    assert sorted(full.outer_checksums) == [3, 6, 9] and len(set(full.outer_checksums.values())) == 3
    printed = capsys.readouterr().out
    assert "outer step 1: groups local, 0.0 MiB sent, " in printed and f"checksum {full.outer_checksums[3][:16]}" in printed
    assert '"outer_step":3' in printed  # the metric (printed: no agent socket here)

    train.main(common + ["--ckpt-dir", str(tmp_path), "--ckpt-every", "4", "--stop-after-step", "6"])
    assert "outer.rank0.pt" in os.listdir(tmp_path / "4")
    resumed = train.main(common + ["--resume-dir", str(tmp_path / "4")])
    assert sorted(resumed.losses) == list(range(5, 11))
    for step, loss in resumed.losses.items():
        assert abs(loss - full.losses[step]) <= 1e-6, step
    assert resumed.outer_checksums == {6: full.outer_checksums[6], 9: full.outer_checksums[9]}

    # A checkpoint without outer state: the outer parameters start from the restored model.
    os.remove(tmp_path / "4" / "outer.rank0.pt")
    capsys.readouterr()
    late = train.main(common + ["--resume-dir", str(tmp_path / "4"), "--steps", "6"])
    assert "has no outer state" in capsys.readouterr().out
    assert sorted(late.outer_checksums) == [6]


def test_a_group_resuming_from_another_groups_files_takes_the_model_and_draws_fresh_noise(synthetic_data, tmp_path, monkeypatch, capsys):
    """A step committed while group beta was not in step holds only alpha's files; beta
    resumes from them: the same weights and data position, but noise of its own (reusing
    alpha's noise state would make the two groups draw the same)."""
    common = ["--config", "tiny", "--data", synthetic_data, "--steps", "8", "--batch-size", "8", "--warmup-steps", "3",
              "--val-samples", "16", "--log-every", "100", "--outer-every", "2"]
    monkeypatch.setenv("DROVER_GROUP", "alpha")
    train.main(common + ["--ckpt-dir", str(tmp_path), "--ckpt-every", "4", "--stop-after-step", "4"])
    with open(tmp_path / "4" / "trainer.rank0.json") as f:
        assert json.load(f)["group"] == "alpha"
    alpha = train.main(common + ["--resume-dir", str(tmp_path / "4")])
    capsys.readouterr()
    monkeypatch.setenv("DROVER_GROUP", "beta")
    beta = train.main(common + ["--resume-dir", str(tmp_path / "4")])
    assert "group beta resumes from group alpha's checkpoint files (it was not in step when step 4 was saved): fresh noise draws" in capsys.readouterr().out
    assert sorted(beta.losses) == sorted(alpha.losses) == [5, 6, 7, 8]
    # Same weights and batch, other noise: the first losses differ (alpha's own resume
    # repeats its uninterrupted run to the bit, test_one_rank_outer_sync_resume_...).
    assert abs(beta.losses[5] - alpha.losses[5]) > 1e-4
    # Resuming as the group that wrote it keeps its noise: the same losses to the bit.
    monkeypatch.setenv("DROVER_GROUP", "alpha")
    again = train.main(common + ["--resume-dir", str(tmp_path / "4")])
    assert again.losses == alpha.losses


def test_outer_state_of_a_two_rank_checkpoint_is_joined_for_one_rank(tmp_path):
    """Resuming with another world size: every rank's outer shards are concatenated
    (FSDP2 splits dim 0 in rank order) like the model's."""
    import checkpointing

    full = {"params": {"w": torch.arange(15.0).reshape(5, 3), "b": torch.arange(2.0)},
            "momentum": {"w": -torch.arange(15.0).reshape(5, 3), "b": -torch.arange(2.0)}}
    for rank in (0, 1):
        with open(tmp_path / f"trainer.rank{rank}.json", "w") as f:
            json.dump({"format": checkpointing.FORMAT, "world_size": 2}, f)
        torch.save({"format": "drover-outer-sync-v1", "outer_step": 4, "last_inner_step": 12,
                    **{kind: {name: t.chunk(2)[rank].clone() for name, t in tensors.items()} for kind, tensors in full.items()}},
                   tmp_path / f"outer.rank{rank}.pt")
    model = torch.nn.Module()
    model.w, model.b = torch.nn.Parameter(torch.zeros(5, 3)), torch.nn.Parameter(torch.zeros(2))
    reader = checkpointing.CheckpointReader(str(tmp_path), ONE_RANK)
    assert not reader.same_layout
    state = reader.outer_state(model)
    assert (state["outer_step"], state["last_inner_step"]) == (4, 12)
    for kind in ("params", "momentum"):
        for name, t in full[kind].items():
            assert torch.equal(state[kind][name], t), (kind, name)


def _spawn(fn, *args):
    mp.spawn(fn, args=(2, dist_harness.free_port(), *args), nprocs=2, join=True)


def _assert_same_training(got: dict, want: dict) -> None:
    tol = dist_harness.equivalence_tolerance()
    # Loss and gradient norm are O(1) sums: float64 rounding leaves them equal to ~1e-14.
    np.testing.assert_allclose(np.asarray(got["losses"], dtype=np.float64), want["losses"], rtol=1e-10, atol=0)
    np.testing.assert_allclose(np.asarray(got["grad_norms"], dtype=np.float64), want["grad_norms"], rtol=1e-10, atol=0)
    assert got["params"].keys() == want["params"].keys()
    for name, value in want["params"].items():
        torch.testing.assert_close(got["params"][name], value, rtol=0, atol=tol, msg=name)


def test_two_rank_fsdp_step_equals_one_rank_with_the_same_global_batch(tmp_path):
    out = str(tmp_path / "two_rank.pt")
    _spawn(dist_harness.fixed_steps_worker, out)
    two = torch.load(out, weights_only=True)
    one = dist_harness.run_fixed_steps(ONE_RANK)
    _assert_same_training(two, one)


def test_equivalence_tolerance_absorbs_reduction_order_but_not_a_different_step():
    """The same samples in another order are summed in another order: the tolerance
    must hold for that (as it must for another CPU's kernels), and must not hold for a
    run that really computes something else (here: a different global batch)."""
    reference = dist_harness.run_fixed_steps(ONE_RANK)
    reordered = dist_harness.run_fixed_steps(ONE_RANK, order=[5, 2, 7, 0, 3, 6, 1, 4])
    _assert_same_training(reordered, reference)
    half_batch = dist_harness.run_fixed_steps(ONE_RANK, global_batch=4)
    worst = max(float((half_batch["params"][n] - v).abs().max()) for n, v in reference["params"].items())
    assert worst > 100 * dist_harness.equivalence_tolerance(), worst


def test_two_rank_resume_reproduces_the_uninterrupted_run(synthetic_data, tmp_path):
    out = str(tmp_path / "resume.pt")
    ckpt = tmp_path / "ckpt"
    _spawn(dist_harness.resume_worker, synthetic_data, str(ckpt), out)
    r = torch.load(out, weights_only=True)
    assert sorted(os.listdir(ckpt / "3")) == sorted(
        [f"{kind}.rank{rank}.pt" for kind in ("model", "ema", "optimizer") for rank in (0, 1)] +
        [f"trainer.rank{rank}.json" for rank in (0, 1)])
    np.testing.assert_allclose(r["resumed"].numpy(), r["full"][3:].numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(r["resumed_val"].numpy(), r["full_val"][1:].numpy(), rtol=0, atol=1e-6)

    # The same 2-rank checkpoint, resharded into one process, scores the same EMA
    # weights on the same validation set (only the reduction order differs).
    one = train.main(["--config", "tiny", "--data", synthetic_data, "--steps", "3", "--batch-size", "8", "--val-samples", "16",
                      "--resume-dir", str(ckpt / "3")])
    assert one.final_step == 3 and not one.losses
    # Forward passes only (no optimizer step amplifies the rounding), in float32: the
    # two reduction orders agree to a few hundred ulps of the loss on any CPU.
    assert abs(one.val_losses[3] - float(r["full_val"][0])) <= 256 * torch.finfo(torch.float32).eps * abs(float(r["full_val"][0]))

    # sample.py reassembles full EMA weights from the rank shards.
    from sample import load_ema_model
    model = load_ema_model(str(ckpt / "3"))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in AT1Denoiser(get_config("tiny")).parameters())


def test_early_stopping_stops_when_validation_stalls(synthetic_data):
    # lr 0: the weights never change, so the second validation cannot improve.
    result = train.main(["--config", "tiny", "--data", synthetic_data, "--steps", "50", "--batch-size", "4", "--lr", "0",
                         "--val-every", "2", "--val-samples", "8", "--early-stop-patience", "1", "--log-every", "100"])
    assert result.stopped_early and result.final_step == 4


class _AgentServer:
    def __init__(self, path: str):
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(1)
        self.data = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.server.accept()
        with conn:
            while chunk := conn.recv(65536):
                self.data += chunk

    def messages(self) -> list[dict]:
        self.thread.join(timeout=10)
        self.server.close()
        return [json.loads(line) for line in self.data.decode().splitlines()]


def test_trainer_reports_metrics_and_checkpoints_to_the_agent(synthetic_data, tmp_path, monkeypatch):
    sock = str(tmp_path / "agent.sock")
    server = _AgentServer(sock)
    monkeypatch.setenv("DROVER_AGENT_SOCKET", sock)
    monkeypatch.setenv("DROVER_CKPT_DIR", str(tmp_path / "ckpt"))
    train.main(["--config", "tiny", "--data", synthetic_data, "--steps", "4", "--batch-size", "4", "--ckpt-every", "2",
                "--val-samples", "8"])
    messages = server.messages()
    metrics = [m for m in messages if m["kind"] == "metric" and "loss" in m["values"]]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert {"loss", "lr", "grad_norm", "images_per_s"} <= set(metrics[0]["values"])
    checkpoints = [m for m in messages if m["kind"] == "checkpoint"]
    assert [c["step"] for c in checkpoints] == [2, 4]
    for c in checkpoints:
        assert c["dir"] == str(tmp_path / "ckpt" / str(c["step"])) and c["rank"] == 0
        assert all(os.path.isfile(os.path.join(c["dir"], f)) for f in c["files"]) and len(c["files"]) == 4


class _OracleDenoiser(torch.nn.Module):
    """Predicts a fixed x0 when conditioned on text, zeros without: the sampler must
    land exactly on the guided prediction."""

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.target = target
        self.cfg = get_config("tiny")

    def forward(self, x, sigma, text):
        conditioned = (text.abs().sum(dim=1) > 0).float().view(-1, 1, 1, 1)
        return self.target.expand_as(x) * conditioned


def test_sampler_reaches_the_guided_x0_prediction():
    target = torch.randn(1, 4, 16, 16)
    text = torch.randn(2, 768)
    latents = sample_latents(_OracleDenoiser(target), text, steps=5, guidance_scale=3.0)
    torch.testing.assert_close(latents, (3.0 * target).expand(2, -1, -1, -1))


def test_sampler_runs_a_real_model():
    model = AT1Denoiser(get_config("tiny")).eval()
    latents = sample_latents(model, torch.randn(2, 768), steps=3, generator=torch.Generator().manual_seed(0))
    assert latents.shape == (2, 4, 16, 16) and torch.isfinite(latents).all()
