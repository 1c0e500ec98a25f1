import io
import os
import tarfile

import numpy as np
import pytest

from shards import ShardFormatError, ShardStream, list_shards, read_all, uneven_shards_note, write_shard


def keys(stream: ShardStream, n: int) -> list[str]:
    return [next(stream).key for _ in range(n)]


def test_same_seed_same_order_other_seed_other_order(synthetic_data):
    shards = list_shards(os.path.join(synthetic_data, "train"))
    a = keys(ShardStream(shards, 0, 1, seed=3, shuffle_buffer=64), 100)
    b = keys(ShardStream(shards, 0, 1, seed=3, shuffle_buffer=64), 100)
    c = keys(ShardStream(shards, 0, 1, seed=4, shuffle_buffer=64), 100)
    assert a == b
    assert a != c


def test_ranks_read_disjoint_shards_that_cover_the_epoch(synthetic_data):
    shards = list_shards(os.path.join(synthetic_data, "train"))  # 8 shards x 48 samples
    per_rank = [set(keys(ShardStream(shards, r, 2, seed=0, shuffle_buffer=32), 192)) for r in range(2)]
    assert not per_rank[0] & per_rank[1]
    assert len(per_rank[0] | per_rank[1]) == 384


def test_one_epoch_yields_every_sample_once_then_the_next_epoch_reshuffles(synthetic_data):
    shards = list_shards(os.path.join(synthetic_data, "train"))
    stream = ShardStream(shards, 0, 1, seed=0, shuffle_buffer=100)
    first, second = keys(stream, 384), keys(stream, 384)
    assert len(set(first)) == 384 and set(first) == set(second)
    assert first != second
    assert stream.state_dict()["epoch"] == 1


@pytest.mark.parametrize("consumed", [0, 1, 50, 383, 384, 500])
def test_resume_continues_at_the_exact_sample(synthetic_data, consumed):
    shards = list_shards(os.path.join(synthetic_data, "train"))
    reference = ShardStream(shards, 1, 2, seed=5, shuffle_buffer=40)
    keys(reference, consumed)
    state = reference.state_dict()
    expected = [next(reference) for _ in range(30)]
    resumed = ShardStream(shards, 1, 2, seed=5, shuffle_buffer=40, epoch=state["epoch"], position=state["position"])
    got = [next(resumed) for _ in range(30)]
    assert [s.key for s in got] == [s.key for s in expected]
    assert all(np.array_equal(g.latent, e.latent) and np.array_equal(g.text, e.text) for g, e in zip(got, expected))


def test_samples_decode_to_the_written_arrays(tmp_path):
    latent = np.arange(4 * 8 * 8, dtype=np.float16).reshape(4, 8, 8)
    text = np.linspace(-1, 1, 768).astype(np.float16)
    write_shard(str(tmp_path / "a.tar"), [("k0", latent, text), ("k1", latent, -text)])
    samples = read_all([str(tmp_path / "a.tar")])
    assert [s.key for s in samples] == ["k0", "k1"]
    assert np.array_equal(samples[0].latent, latent.astype(np.float32))
    assert np.array_equal(samples[0].text, text.astype(np.float32))
    assert np.array_equal(samples[1].text, -text.astype(np.float32))


def test_per_token_text_is_refused_unless_mean_pooling_is_asked_for(tmp_path):
    """[T, D] per-token states are not the pooled embedding the model conditions on:
    an error naming the shard and the sample, unless --pool-text mean."""
    latent = np.zeros((4, 8, 8), dtype=np.float16)
    tokens = np.arange(5 * 768, dtype=np.float16).reshape(5, 768) / 1000
    path = str(tmp_path / "tokens.tar")
    write_shard(path, [("k0", latent, tokens[0]), ("k1", latent, tokens)])
    with pytest.raises(ShardFormatError, match=r"tokens\.tar: sample 'k1': member k1\.text\.npy is a per-token array \(5, 768\)"):
        read_all([path])
    stream = ShardStream([path], 0, 1, seed=0, shuffle_buffer=1)
    with pytest.raises(ShardFormatError, match="--pool-text mean"):
        [next(stream) for _ in range(2)]
    pooled = read_all([path], pool_text="mean")
    np.testing.assert_allclose(pooled[1].text, tokens.astype(np.float32).mean(axis=0))
    streamed = ShardStream([path], 0, 1, seed=0, pool_text="mean")
    assert sorted(next(streamed).text.shape for _ in range(2)) == [(768,), (768,)]


def test_uneven_shards_over_ranks_are_named_in_a_warning():
    assert uneven_shards_note(8, 4) is None and uneven_shards_note(3, 1) is None
    note = uneven_shards_note(10, 4)
    assert note.startswith("warning: 10 training shards over 4 ranks: 2 rank(s) read 3 shards per epoch, the others 2")


def _tar_with(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def test_missing_member_names_the_tar_and_key(tmp_path):
    path = str(tmp_path / "bad.tar")
    _tar_with(path, {"s1.latent.npy": _npy(np.zeros((4, 8, 8), np.float16))})
    with pytest.raises(ShardFormatError, match=r"bad\.tar.*s1\.text\.npy"):
        read_all([path])


def test_pickled_array_is_refused_naming_the_member(tmp_path):
    path = str(tmp_path / "pickled.tar")
    _tar_with(path, {"s1.latent.npy": _npy(np.array([{"evil": 1}], dtype=object)),
                     "s1.text.npy": _npy(np.zeros(768, np.float16))})
    with pytest.raises(ShardFormatError, match=r"pickled\.tar: member s1\.latent\.npy"):
        read_all([path])


def test_wrong_latent_shape_names_the_member(tmp_path):
    path = str(tmp_path / "shape.tar")
    _tar_with(path, {"s1.latent.npy": _npy(np.zeros((3, 8, 8), np.float16)), "s1.text.npy": _npy(np.zeros(768, np.float16))})
    with pytest.raises(ShardFormatError, match=r"shape\.tar: member s1\.latent\.npy must be"):
        read_all([path])


def test_fewer_shards_than_ranks_is_refused(synthetic_data):
    shards = list_shards(os.path.join(synthetic_data, "val"))  # one shard
    with pytest.raises(ValueError, match="1 shards cannot feed 2 ranks"):
        ShardStream(shards, 0, 2, seed=0)
