"""Tar shards of (latent, text embedding) samples and a streaming, resumable reader.

Format (webdataset-style, see README.md): an uncompressed tar whose members are
`<key>.latent.npy` (float16 [4, S, S]) and `<key>.text.npy` (float16 [D], the pooled
text embedding; [T, D] per-token embeddings only with pool_text="mean"), written by
numpy.save. Members with other suffixes are ignored. Nothing is unpickled:
every array is read with numpy.load(allow_pickle=False).

Reader semantics, per rank and per epoch:
  1. the sorted shard list is permuted with rng(seed, epoch); rank r takes every
     world_size-th shard starting at r;
  2. samples stream in tar order through a shuffle buffer driven by rng(seed, epoch, rank);
  3. at the end of an epoch the buffer drains, and the next epoch starts.
The stream is infinite. Its position is (epoch, samples yielded in that epoch); to
resume, the reader replays the same decisions from tar headers only (no array decoding)
and continues from the exact next sample.
"""
from __future__ import annotations

import io
import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

import numpy as np

LATENT_SUFFIX = ".latent.npy"
TEXT_SUFFIX = ".text.npy"


class ShardFormatError(ValueError):
    pass


@dataclass(frozen=True)
class SampleRef:
    """Where one sample's two arrays live inside a tar file (byte offsets), so the
    shuffle buffer holds references, not arrays, and replay needs no decoding."""

    shard: str
    key: str
    latent_offset: int
    latent_size: int
    text_offset: int
    text_size: int


@dataclass
class Sample:
    key: str
    latent: np.ndarray  # float32 [4, S, S]
    text: np.ndarray  # float32 [D] (pooled)


TEXT_POOLING = ("none", "mean")


def list_shards(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"shard directory {directory} does not exist")
    shards = sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".tar"))
    if not shards:
        raise FileNotFoundError(f"no .tar shards in {directory}")
    return shards


def index_shard(path: str) -> list[SampleRef]:
    """Sample references of one shard in tar order, from the tar headers alone."""
    pending: dict[str, dict[str, tarfile.TarInfo]] = {}
    order: list[str] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                for suffix, field in ((LATENT_SUFFIX, "latent"), (TEXT_SUFFIX, "text")):
                    if member.name.endswith(suffix):
                        key = member.name[: -len(suffix)]
                        if key not in pending:
                            pending[key] = {}
                            order.append(key)
                        if field in pending[key]:
                            raise ShardFormatError(f"{path}: member {member.name} appears twice")
                        pending[key][field] = member
    except tarfile.TarError as e:
        raise ShardFormatError(f"{path}: not a readable uncompressed tar file ({e})") from e
    refs = []
    for key in order:
        fields = pending[key]
        for field, suffix in (("latent", LATENT_SUFFIX), ("text", TEXT_SUFFIX)):
            if field not in fields:
                raise ShardFormatError(f"{path}: sample {key!r} has no {key}{suffix} member")
        lat, txt = fields["latent"], fields["text"]
        refs.append(SampleRef(path, key, lat.offset_data, lat.size, txt.offset_data, txt.size))
    return refs


def _load_npy(data: bytes, shard: str, member: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # numpy raises ValueError/OSError/EOFError for malformed files
        raise ShardFormatError(f"{shard}: member {member} is not a valid .npy array ({e})") from e


class _OpenFiles:
    """A few open shard files, so decoding a sample does not reopen its tar each time."""

    def __init__(self, capacity: int = 8):
        self.capacity = capacity
        self.files: OrderedDict[str, io.BufferedReader] = OrderedDict()

    def read(self, path: str, offset: int, size: int) -> bytes:
        f = self.files.pop(path, None) or open(path, "rb")
        self.files[path] = f
        while len(self.files) > self.capacity:
            self.files.popitem(last=False)[1].close()
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise ShardFormatError(f"{path}: truncated member at byte {offset}")
        return data

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()


def decode_sample(ref: SampleRef, files: _OpenFiles, pool_text: str = "none") -> Sample:
    """One sample's arrays. A [T, D] text array is refused unless pool_text="mean": the
    model conditions on one pooled vector such as CLIP's projected pooled output, and
    the mean of per-token states is a different vector (it would train silently on
    the wrong conditioning)."""
    latent_member, text_member = ref.key + LATENT_SUFFIX, ref.key + TEXT_SUFFIX
    latent = _load_npy(files.read(ref.shard, ref.latent_offset, ref.latent_size), ref.shard, latent_member)
    text = _load_npy(files.read(ref.shard, ref.text_offset, ref.text_size), ref.shard, text_member)
    if latent.ndim != 3 or latent.shape[0] != 4 or not np.issubdtype(latent.dtype, np.floating):
        raise ShardFormatError(
            f"{ref.shard}: member {latent_member} must be a float16 array [4, H/8, W/8], got {latent.dtype} {latent.shape}"
        )
    if text.ndim not in (1, 2) or not np.issubdtype(text.dtype, np.floating):
        raise ShardFormatError(f"{ref.shard}: member {text_member} must be a float16 array [D] or [T, D], got {text.dtype} {text.shape}")
    if text.ndim == 2:
        if pool_text != "mean":
            raise ShardFormatError(
                f"{ref.shard}: sample {ref.key!r}: member {text_member} is a per-token array {text.shape}; the model "
                f"conditions on one pooled embedding [D] (e.g. CLIP's projected pooled output). Write pooled "
                f"embeddings, or pass --pool-text mean to average the tokens"
            )
        text = text.astype(np.float32).mean(axis=0)
    return Sample(ref.key, latent.astype(np.float32), text.astype(np.float32))


class ShardStream:
    """Infinite, deterministic, resumable stream of one rank's samples."""

    def __init__(self, shards: list[str], rank: int, world_size: int, seed: int,
                 shuffle_buffer: int = 1000, epoch: int = 0, position: int = 0, pool_text: str = "none"):
        if len(shards) < world_size:
            raise ValueError(
                f"{len(shards)} shards cannot feed {world_size} ranks: every rank needs at least one shard "
                f"(first shard: {shards[0] if shards else 'none'})"
            )
        self.shards = sorted(shards)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.pool_text = pool_text
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.epoch, self.position = epoch, position
        self._index_cache: dict[str, list[SampleRef]] = {}
        self._files = _OpenFiles()
        self._refs = self._epoch_refs(self.epoch)
        for _ in range(position):  # replay from headers only: exact resume
            next(self._refs)

    def shards_of_epoch(self, epoch: int) -> list[str]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return [self.shards[i] for i in order[self.rank :: self.world_size]]

    def _index(self, shard: str) -> list[SampleRef]:
        if shard not in self._index_cache:
            self._index_cache[shard] = index_shard(shard)
        return self._index_cache[shard]

    def _epoch_refs(self, epoch: int) -> Iterator[SampleRef]:
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        buffer: list[SampleRef] = []
        for shard in self.shards_of_epoch(epoch):
            for ref in self._index(shard):
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(ref)
                    continue
                i = int(rng.integers(len(buffer)))
                buffer[i], ref = ref, buffer[i]
                yield ref
        for i in rng.permutation(len(buffer)):
            yield buffer[i]

    def next_ref(self) -> SampleRef:
        while True:
            try:
                ref = next(self._refs)
                self.position += 1
                return ref
            except StopIteration:
                if self.position == 0:
                    raise ShardFormatError(f"rank {self.rank}: its shards hold no samples: {self.shards_of_epoch(self.epoch)}")
                self.epoch += 1
                self.position = 0
                self._refs = self._epoch_refs(self.epoch)

    def __iter__(self) -> Iterator[Sample]:
        return self

    def __next__(self) -> Sample:
        return decode_sample(self.next_ref(), self._files, self.pool_text)

    def next_batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        samples = [next(self) for _ in range(batch_size)]
        shapes = {s.latent.shape for s in samples}
        if len(shapes) > 1:
            raise ShardFormatError(f"rank {self.rank}: latents of different shapes {sorted(shapes)} in one batch")
        return np.stack([s.latent for s in samples]), np.stack([s.text for s in samples])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size, "shuffle_buffer": self.shuffle_buffer}

    def close(self) -> None:
        self._files.close()


def uneven_shards_note(num_shards: int, world_size: int) -> str | None:
    """Rank 0's warning when shards do not divide evenly over the ranks: each rank
    streams its own shards, so ranks with one shard fewer finish their epochs sooner
    and see their samples more often (an epoch is per rank)."""
    if world_size <= 1 or num_shards % world_size == 0:
        return None
    fewer = num_shards // world_size
    return (f"warning: {num_shards} training shards over {world_size} ranks: {num_shards % world_size} rank(s) read "
            f"{fewer + 1} shards per epoch, the others {fewer}, so ranks' epochs differ in length and samples of the "
            f"smaller groups are seen more often; use a multiple of {world_size} shards of equal size for equal epochs")


def read_all(shards: list[str], limit: int | None = None, pool_text: str = "none") -> list[Sample]:
    """The samples of the given shards in order, the first `limit` of them if given
    (the validation set)."""
    files = _OpenFiles()
    samples: list[Sample] = []
    try:
        for shard in sorted(shards):
            for ref in index_shard(shard):
                if limit is not None and len(samples) >= limit:
                    return samples
                samples.append(decode_sample(ref, files, pool_text))
        return samples
    finally:
        files.close()


def write_shard(path: str, samples: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
    """Write (key, latent, text) samples as one tar shard, atomically."""
    tmp = path + ".partial"
    with tarfile.open(tmp, mode="w:") as tar:
        for key, latent, text in samples:
            for suffix, array in ((LATENT_SUFFIX, latent), (TEXT_SUFFIX, text)):
                buf = io.BytesIO()
                np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
                info = tarfile.TarInfo(key + suffix)
                info.size = buf.tell()
                info.mtime = 0  # reproducible bytes
                buf.seek(0)
                tar.addfile(info, buf)
    os.replace(tmp, path)
