"""FSDP2 paths the plain 2-rank equivalence test does not reach: clipping that bites,
weight decay that matters, EMA and AdamW moments compared along with the weights,
activation checkpointing and reshard_after_forward=False (same numbers, other
schedule), HSDP (replicate x shard), fp16 loss scaling whose skipped steps all ranks
agree on, and bf16 compute that keeps sigma in fp32."""
import json
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import dist_harness
from parallel import DistContext

ONE_RANK = DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"),
                       sharded=False, owns_process_group=False)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The 1-rank reference runs here are tiny float64 steps: a second OpenMP thread
    does not speed them up and, on a loaded 2-core machine, slows them down many-fold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _spawn(fn, nprocs: int, *args):
    mp.spawn(fn, args=(nprocs, dist_harness.free_port(), *args), nprocs=nprocs, join=True)


def _assert_same_training(got: dict, want: dict) -> None:
    tol = dist_harness.equivalence_tolerance()
    np.testing.assert_allclose(np.asarray(got["losses"], dtype=np.float64), want["losses"], rtol=1e-10, atol=0)
    np.testing.assert_allclose(np.asarray(got["grad_norms"], dtype=np.float64), want["grad_norms"], rtol=1e-10, atol=0)
    assert got["groups"] == want["groups"]
    for kind in ("params", "ema", "moments"):
        assert got[kind].keys() == want[kind].keys(), kind
        for name, value in want[kind].items():
            # Second moments are squares of gradients (~1e-6): relative to their size.
            atol = tol if kind != "moments" else tol * max(1e-12, float(value.abs().max()))
            torch.testing.assert_close(got[kind][name], value, rtol=0 if kind != "moments" else 1e-6, atol=atol,
                                       msg=f"{kind} {name}")


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("variants")
    _spawn(dist_harness.variants_worker, 2, str(out))
    return str(out)


@pytest.fixture(scope="module")
def clipped_reference() -> dict:
    return dist_harness.run_fixed_steps(ONE_RANK, **dist_harness.CLIPPED)


def test_the_clipped_variant_really_clips_and_decays(clipped_reference):
    """Otherwise comparing it would prove nothing about clipping or weight decay."""
    ref = clipped_reference
    assert min(ref["grad_norms"]) > 10 * dist_harness.CLIPPED["grad_clip"]
    unclipped = dist_harness.run_fixed_steps(ONE_RANK, grad_clip=1e9, weight_decay=dist_harness.CLIPPED["weight_decay"])
    no_decay = dist_harness.run_fixed_steps(ONE_RANK, grad_clip=dist_harness.CLIPPED["grad_clip"], weight_decay=0.0)
    for other in (unclipped, no_decay):
        worst = max(float((other["params"][n] - v).abs().max()) for n, v in ref["params"].items())
        assert worst > 100 * dist_harness.equivalence_tolerance(), worst
    decayed, exempt = ref["groups"]
    assert decayed["weight_decay"] == 0.5 and exempt["weight_decay"] == 0.0
    assert "pos_embed" in exempt["params"] and "blocks.0.self_attention.qkv.weight" in decayed["params"]
    assert all(not n.endswith(".bias") for n in decayed["params"])


def test_two_rank_clipped_run_equals_one_rank_in_weights_ema_moments_and_groups(variants, clipped_reference):
    _assert_same_training(dist_harness.load_result(os.path.join(variants, "clipped.pt")), clipped_reference)


def test_activation_checkpointing_and_no_reshard_after_forward_change_nothing_computed(variants, clipped_reference):
    _assert_same_training(dist_harness.load_result(os.path.join(variants, "throughput.pt")), clipped_reference)


def test_fp16_overflow_on_one_rank_skips_the_step_on_every_rank(variants):
    records = []
    for rank in (0, 1):
        with open(os.path.join(variants, f"overflow.rank{rank}.json")) as f:
            records.append(json.load(f))
    for r in records:
        scales, weights, ema = r["scales"], r["weights"], r["ema"]
        # Step 0 steps; step 1 (rank 1's shard poisoned) is skipped: scale halves,
        # weights and EMA stay; step 2 steps again with the halved scale.
        assert scales == [1024.0, 512.0, 512.0]
        assert weights[1] != weights[0] and weights[2] == weights[1] and weights[3] != weights[2]
        assert ema[1] != ema[0] and ema[2] == ema[1] and ema[3] != ema[2]
        assert np.isfinite(r["grad_norms"][0]) and not np.isfinite(r["grad_norms"][1])
        # Unscaled before clipping: the true norm (~1-3 for tiny), not 1024 times it.
        assert 0.1 < r["grad_norms"][0] < 20 and 0.1 < r["grad_norms"][2] < 20
        assert r["state"]["scale"] == 512.0 and r["state"]["_growth_tracker"] == 1
    assert records[0]["weights"] == records[1]["weights"]  # full weights: the ranks agree


def test_bf16_fsdp_model_computes_noise_features_from_fp32_sigma(variants):
    for rank in (0, 1):
        f = torch.load(os.path.join(variants, f"features.rank{rank}.pt"), weights_only=True)
        assert f["sigma_dtype"] == "torch.float32"
        assert f["output_dtype"] == "torch.bfloat16"  # the rest does run in bf16
        torch.testing.assert_close(f["features"], f["reference"], rtol=0, atol=0)


def test_hsdp_two_replicas_of_two_shards_equal_one_rank(tmp_path, clipped_reference):
    _spawn(dist_harness.hsdp_worker, 4, str(tmp_path))
    _assert_same_training(dist_harness.load_result(str(tmp_path / "hsdp.pt")), clipped_reference)

    # Its checkpoint: four ranks' files, of which sample.py reads the first replica's.
    from configs import get_config
    from model import AT1Denoiser
    from sample import load_ema_model

    with open(tmp_path / "ckpt" / "trainer.rank3.json") as f:
        assert json.load(f)["replicas"] == 2
    torch.manual_seed(0)
    initial = AT1Denoiser(get_config("tiny")).state_dict()
    loaded = load_ema_model(str(tmp_path / "ckpt")).state_dict()
    assert loaded.keys() == initial.keys()
    for name, value in initial.items():
        assert torch.equal(loaded[name], value), name


@pytest.mark.skipif(os.environ.get("AT1_COMPILE_TEST") != "1",
                    reason="torch.compile of the blocks takes minutes on a small CPU; set AT1_COMPILE_TEST=1 to run it")
def test_compiled_blocks_under_fsdp_train_like_eager_blocks(tmp_path):
    """float32, so only to float32 rounding of fused kernels: Adam turns that into weight
    differences far below one step (lr 1e-3); broken wiring is a difference of steps."""
    _spawn(dist_harness.compiled_worker, 2, str(tmp_path))
    eager, compiled = (dist_harness.load_result(str(tmp_path / f"{name}.pt")) for name in ("eager", "compiled"))
    np.testing.assert_allclose(compiled["losses"].numpy(), eager["losses"].numpy(), rtol=1e-5)
    np.testing.assert_allclose(compiled["grad_norms"].numpy(), eager["grad_norms"].numpy(), rtol=1e-4)
    for kind in ("params", "ema"):
        for name, value in eager[kind].items():
            torch.testing.assert_close(compiled[kind][name], value, rtol=0, atol=1e-4, msg=f"{kind} {name}")
