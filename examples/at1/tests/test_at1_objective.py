"""The noise-level distribution (issue 17, item 3), the sampler against its closed form
(item 11), sample.py's options (item 5) and the EMA (item 12)."""
import json

import numpy as np
import pytest
import torch

import train
from configs import get_config
from ema import ShardedEMA
from model import AT1Denoiser
from objective import TRAIN_SIGMA_BETA, VALIDATION_SIGMA_BETA, NoiseSource, validation_noise
from sample import sample_latents


@pytest.fixture(autouse=True)
def _no_agent_env(monkeypatch):
    for var in ("DROVER_AGENT_SOCKET", "DROVER_CKPT_DIR", "DROVER_RESUME_DIR", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)


# --- noise levels -------------------------------------------------------------------

def test_training_sigma_defaults_to_transformer_latent_diffusions_beta_1_2_5():
    assert TRAIN_SIGMA_BETA == (1.0, 2.5)
    sigma = NoiseSource(seed=0, text_drop_prob=0.0).draw(20000, (1,)).sigma.numpy()
    assert abs(sigma.mean() - 1 / 3.5) < 0.01  # mean a / (a + b)
    # Beta(1, b) has P(sigma > x) = (1 - x)^b: 0.18 above 0.5, 0.3% above 0.9.
    for x in (0.5, 0.9):
        assert abs((sigma > x).mean() - (1 - x) ** 2.5) < 0.01
    other = NoiseSource(seed=0, text_drop_prob=0.0, sigma_beta=(4.0, 1.0)).draw(20000, (1,)).sigma.numpy()
    assert abs(other.mean() - 0.8) < 0.01
    with pytest.raises(ValueError, match="must be positive"):
        NoiseSource(seed=0, text_drop_prob=0.0, sigma_beta=(0.0, 1.0))


def test_validation_noise_is_fixed_whatever_the_training_distribution(synthetic_data, tmp_path):
    sigma, eps = validation_noise(7, 12345, (4, 2, 2))
    rng = np.random.default_rng([12345, 7])
    assert sigma == float(rng.beta(*VALIDATION_SIGMA_BETA)) and np.array_equal(eps, rng.standard_normal((4, 2, 2), dtype=np.float32))
    # Two runs that differ only in --sigma-beta score the same (untrained, lr 0) weights
    # identically, and each checkpoint records its own training distribution.
    common = ["--config", "tiny", "--data", synthetic_data, "--steps", "1", "--batch-size", "4", "--lr", "0",
              "--val-samples", "8", "--log-every", "100"]
    default = train.main(common + ["--ckpt-dir", str(tmp_path / "a")])
    shifted = train.main(common + ["--ckpt-dir", str(tmp_path / "b"), "--sigma-beta", "4", "1"])
    assert default.val_losses[1] == shifted.val_losses[1]
    assert default.losses[1] != shifted.losses[1]  # the training draws did change
    for run, beta in (("a", [1.0, 2.5]), ("b", [4.0, 1.0])):
        with open(tmp_path / run / "1" / "trainer.rank0.json") as f:
            assert json.load(f)["noise"]["sigma_beta"] == beta


# --- sampler --------------------------------------------------------------------------

class _FixedPrediction(torch.nn.Module):
    """Predicts `cond` when given text and `uncond` for the zero embedding, whatever
    the latent, and records the noise levels it is called with."""

    def __init__(self, cond: torch.Tensor, uncond: torch.Tensor):
        super().__init__()
        self.cond, self.uncond, self.cfg = cond, uncond, get_config("tiny")
        self.sigmas = []

    def forward(self, x, sigma, text):
        self.sigmas.append(sigma.clone())
        conditioned = (text.abs().sum(dim=1) > 0).view(-1, 1, 1, 1)
        return torch.where(conditioned, self.cond.expand_as(x), self.uncond.expand_as(x))


def test_sampler_intermediate_states_follow_the_ddim_closed_form():
    """With a constant guided prediction x0* the DDIM update
    x_next = ((s - s_next) * x0* + s_next * x) / s telescopes to
    x_k = (s_k / s_0) * x_T + (1 - s_k / s_0) * x0*: a straight line from the initial
    noise to x0*. Every intermediate latent must lie on it, at every grid level, which
    a wrong update rule (or grid) does not satisfy even when it ends on x0*."""
    g = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    text = torch.randn(2, 768, generator=g)
    scale, steps = 3.0, 6
    guided = uncond + scale * (cond - uncond)
    x_init = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(11))
    states = []
    model = _FixedPrediction(cond, uncond)
    latents = sample_latents(model, text, steps=steps, guidance_scale=scale, generator=torch.Generator().manual_seed(11),
                             on_step=lambda i, s_next, x, x0: states.append((i, s_next, x.clone(), x0.clone())))
    grid = np.linspace(0.99, 0.0, steps + 1)
    assert [i for i, *_ in states] == list(range(steps))
    for i, s_next, x, x0 in states:
        assert abs(s_next - grid[i + 1]) < 1e-6
        torch.testing.assert_close(x0, guided.expand_as(x0))
        t = s_next / 0.99
        torch.testing.assert_close(x, t * x_init + (1 - t) * guided, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(latents, guided.expand(2, -1, -1, -1), rtol=1e-5, atol=1e-5)
    # Every call saw the grid level, for the conditional and the unconditional half.
    called = torch.stack([s for s in model.sigmas])
    np.testing.assert_allclose(called.numpy(), np.repeat(grid[:-1, None], 4, axis=1), atol=1e-6)


def test_sampler_starts_at_sigma_max_and_can_start_at_one():
    model = _FixedPrediction(torch.zeros(1, 4, 16, 16), torch.zeros(1, 4, 16, 16))
    sample_latents(model, torch.randn(1, 768), steps=4, guidance_scale=1.0)
    assert float(model.sigmas[0][0]) == pytest.approx(0.99)
    model.sigmas.clear()
    sample_latents(model, torch.randn(1, 768), steps=4, guidance_scale=1.0, sigma_max=1.0)
    assert [round(float(s[0]), 6) for s in model.sigmas] == [1.0, 0.75, 0.5, 0.25]
    with pytest.raises(ValueError, match="sigma_max"):
        sample_latents(model, torch.randn(1, 768), sigma_max=0.0)


def test_sample_cli_runs_on_the_chosen_device_at_the_configs_latent_size(synthetic_data, tmp_path):
    from sample import main as sample_main

    train.main(["--config", "tiny", "--data", synthetic_data, "--steps", "1", "--batch-size", "4", "--val-samples", "4",
                "--ckpt-dir", str(tmp_path / "ckpt")])
    out = tmp_path / "latents.npy"
    sample_main(["--ckpt", str(tmp_path / "ckpt" / "1"), "--data", f"{synthetic_data}/val", "--count", "2", "--steps", "2",
                 "--device", "cpu", "--out", str(out)])
    latents = np.load(out)
    assert latents.shape == (2, 4, 16, 16) and np.isfinite(latents).all()


# --- EMA ------------------------------------------------------------------------------

def test_ema_shadow_follows_the_recursion_with_the_warmup_decay():
    """shadow_t = d_t * shadow_{t-1} + (1 - d_t) * w_t, d_t = min(decay, (1 + t) / (10 + t)),
    checked against an independent float64 recurrence over weights that jump around."""
    torch.manual_seed(0)
    model = AT1Denoiser(get_config("tiny"))
    decay = 0.9
    ema = ShardedEMA(model, decay)
    expected = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    for step in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model, step)
        d = min(decay, (1 + step) / (10 + step))
        for n, p in model.named_parameters():
            expected[n] = d * expected[n] + (1 - d) * p.detach().double()
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(100) == decay
    for n, shadow in ema.shadow.items():
        torch.testing.assert_close(shadow.double(), expected[n], rtol=1e-5, atol=1e-5, msg=n)


def test_evaluating_with_ema_weights_restores_the_live_weights():
    torch.manual_seed(0)
    model = AT1Denoiser(get_config("tiny"))
    ema = ShardedEMA(model, 0.999)
    for t in ema.shadow.values():
        t.mul_(0.5).add_(1.0)  # EMA weights that differ from the live ones everywhere
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, sigma, text = torch.randn(2, 4, 16, 16), torch.rand(2), torch.randn(2, 768)
    with torch.no_grad():
        before = model(x, sigma, text)
        with ema.swapped_into(model):
            for n, p in model.named_parameters():
                assert torch.equal(p, ema.shadow[n]), n
            inside = model(x, sigma, text)
        after = model(x, sigma, text)
    assert not torch.equal(inside, before)
    assert torch.equal(after, before)
    for n, p in model.named_parameters():
        assert torch.equal(p, live[n]), n
    # Also when the evaluation fails half-way.
    with pytest.raises(RuntimeError, match="boom"), ema.swapped_into(model):
        raise RuntimeError("boom")
    for n, p in model.named_parameters():
        assert torch.equal(p, live[n]), n
