"""Token datasets as WebDataset-compatible tar shards (what `pyratok tokenize` writes).

A dataset is a folder:

    tokenize.json         what made it: model id, K, levels, clip options, the manifest's hash
    shard-000000.tar      samples (plain POSIX tar, one file per field, see below)
    shard-000000.json     the shard's record: file, sha256, bytes, clips, tokens, pixels, skipped
    ...                   videos; written after its tar is complete (a tar without a record
                          is unfinished and is redone)
    index.json            every record plus dataset totals (written when all shards exist)
    errors.jsonl          one line per skipped video: {"path", "video_index", "reason"}

A sample (one clip) is the files ``KEY.<field>`` that share a key ``VVVVVVVV-CCCCCC`` (the video's
position in the manifest, the clip's number in the video), the WebDataset convention:

    KEY.level0.npy ...    the ids of each pyramid level, a (t, h, w) array of the smallest
                          unsigned type that holds K bits (uint16 for K = 16), MSB-first ids
    KEY.txt               the caption (empty when the manifest has none)
    KEY.json              num_bits, grids, latent_grid, model_id, the source video, its first
                          and last frame, frame indices' fps, the clip's size

Why tar + .npy: every trainer can read it without pyratok (``webdataset.WebDataset(urls)
.decode()``, Hugging Face ``datasets.load_dataset("webdataset", ...)``, or ``tarfile`` +
``numpy.load``), samples stream sequentially from object stores, and shards concatenate across
ranks.  The tar headers are fixed (mtime 0, uid/gid 0, no user names, mode 0644, USTAR) and the
samples sorted by key, so the same input gives the same bytes.  Every file is written to
``.<name>.partial``, fsynced and renamed; a shard is recorded after its tar is in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import tarfile
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from pyratok.utils import default_file_mode

FORMAT = "pyratok-token-shards"
FORMAT_VERSION = 1
CONFIG_FILE = "tokenize.json"
INDEX_FILE = "index.json"
ERRORS_FILE = "errors.jsonl"


class ShardError(ValueError):
    """A token shard folder, shard or record that is missing, foreign or corrupted."""


def shard_file(shard: int) -> str:
    return f"shard-{shard:06d}.tar"


def record_file(shard: int) -> str:
    return f"shard-{shard:06d}.json"


def sample_key(video_index: int, clip: int) -> str:
    return f"{video_index:08d}-{clip:06d}"


def ids_dtype(num_bits: int) -> np.dtype:
    """The smallest unsigned numpy type that holds K-bit ids."""
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if num_bits <= np.iinfo(dtype).bits:
            return np.dtype(dtype)
    raise ValueError(f"num_bits={num_bits}: token ids have at most 64 bits")


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def sample_files(key: str, ids: Sequence[np.ndarray], caption: str, meta: dict) -> list[tuple[str, bytes]]:
    """The (name, bytes) files of one sample, in the order they are stored."""
    files = [(f"{key}.json", canonical_json(meta)), (f"{key}.txt", caption.encode())]
    files += [(f"{key}.level{l}.npy", _npy(a)) for l, a in enumerate(ids)]
    return files


class _HashingFile:
    """A write-only file that hashes and counts what goes through it."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)


def partial_path(path: str, tag: str = "") -> str:
    """Where ``path`` is written before it is renamed into place: ``.<name><tag>.partial`` beside it.
    Names are fixed (not random) so that a writer killed mid-file leaves a leftover its next run
    knows and removes; ``tag`` tells apart writers of the same file (ranks)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}{tag}.partial")


@contextlib.contextmanager
def atomic_file(path: str, tag: str = ""):
    """A binary file at ``partial_path(path, tag)``, fsynced and renamed to ``path`` on success,
    removed on failure."""
    partial = partial_path(path, tag)
    try:
        with open(partial, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(partial, default_file_mode())
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.unlink(partial)
        raise


def write_shard(path: str, samples: Sequence[list[tuple[str, bytes]]]) -> tuple[str, int]:
    """Writes the samples (each a list of (name, bytes)) as a deterministic tar at ``path``
    (atomically, see atomic_file).  Returns (sha256, bytes)."""
    with atomic_file(path) as raw:
        hashed = _HashingFile(raw)
        with tarfile.open(fileobj=hashed, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for files in samples:
                for member, data in files:
                    info = tarfile.TarInfo(member)
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    tar.addfile(info, io.BytesIO(data))
    return hashed.sha.hexdigest(), hashed.size


def write_json(path: str, obj, tag: str = "") -> None:
    with atomic_file(path, tag) as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True).encode() + b"\n")


def read_json(path: str, what: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read())
    except FileNotFoundError:
        raise ShardError(f"{path}: no such {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardError(f"{path}: not a {what} ({err})") from None
    if not isinstance(obj, dict):
        raise ShardError(f"{path}: not a {what} (a JSON {type(obj).__name__}, expected an object)")
    return obj


def read_index(path: str) -> tuple[str, dict]:
    """(folder, index) of a token shard folder (or its index.json), checked for format."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    index_path = os.path.join(folder, INDEX_FILE) if os.path.isdir(path) else path
    if os.path.isdir(path) and not os.path.isfile(index_path) and os.path.isfile(os.path.join(folder, CONFIG_FILE)):
        raise ShardError(f"{folder}: the tokenize run is not finished (no {INDEX_FILE}); run the same command "
                         "again to complete it")
    index = read_json(index_path, "token shard index")
    if index.get("format") != FORMAT:
        raise ShardError(f"{index_path}: not a pyratok token shard index (format={index.get('format')!r})")
    if index.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"{index_path}: token shard format version {index.get('format_version')!r}; this pyratok "
                         f"reads version {FORMAT_VERSION}")
    if not isinstance(index.get("shards"), list):
        raise ShardError(f"{index_path}: 'shards' is missing or not a list")
    return folder, index


def read_samples(path: str, sha256: Optional[str] = None) -> Iterator[dict]:
    """The samples of one shard, in order: dicts of key, ``ids`` (list of numpy arrays per level),
    caption and meta.  With ``sha256`` the shard is verified before anything is returned."""
    with open(path, "rb") as f:
        blob = f.read()
    if sha256 is not None and hashlib.sha256(blob).hexdigest() != sha256:
        raise ShardError(f"{path}: checksum mismatch: the shard is corrupted or was replaced")
    sample: Optional[dict] = None
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
            for member in tar:
                key, _, field = member.name.partition(".")
                data = tar.extractfile(member).read()
                if sample is not None and sample["key"] != key:
                    yield _finish(sample, path)
                    sample = None
                if sample is None:
                    sample = {"key": key, "levels": {}}
                if field == "json":
                    sample["meta"] = json.loads(data)
                elif field == "txt":
                    sample["caption"] = data.decode()
                elif field.startswith("level") and field.endswith(".npy"):
                    sample["levels"][int(field[5:-4])] = np.load(io.BytesIO(data), allow_pickle=False)
    except ShardError:
        raise
    except (tarfile.TarError, ValueError, OSError) as err:
        raise ShardError(f"{path}: damaged shard ({type(err).__name__}: {err})") from None
    if sample is not None:
        yield _finish(sample, path)


def _finish(sample: dict, path: str) -> dict:
    levels = sample.pop("levels")
    if "meta" not in sample or sorted(levels) != list(range(len(levels))) or not levels:
        raise ShardError(f"{path}: sample {sample['key']!r} is incomplete (no json or a missing level)")
    sample["ids"] = [levels[l] for l in range(len(levels))]
    sample.setdefault("caption", "")
    return sample


def _worker_split() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class TokenDataset(torch.utils.data.IterableDataset):
    """Streams the clips of a token shard folder (PyTorch IterableDataset).

    Each item: ``{"key", "ids": [per level (t, h, w) int64 tensors], "caption", "meta"}``.
    Shards are split between ranks (``torch.distributed`` when initialised, else the env
    ``RANK``/``WORLD_SIZE`` of torchrun) and DataLoader workers: shard i goes to the reader
    i mod (world * workers), so every clip is read once per epoch when the shards outnumber
    the readers.  ``shuffle=N`` shuffles the shard order and passes clips through an N-clip
    buffer; the order depends on ``seed``, ``set_epoch`` and the reader only.  Every shard is
    checked against the index's sha256 before use.  Batch with ``collate_tokens``.
    """

    def __init__(self, path: str, shuffle: int = 0, seed: int = 0, split_by_rank: bool = True,
                 split_by_worker: bool = True, verify: bool = True):
        if shuffle < 0:
            raise ValueError(f"shuffle={shuffle}: expected a buffer size >= 0 (0: no shuffling)")
        self.root, self.index = read_index(path)
        self.shards = [s for s in self.index["shards"] if s.get("clips")]
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.split_by_rank, self.split_by_worker, self.verify = split_by_rank, split_by_worker, verify

    def __len__(self) -> int:
        """Clips in the whole dataset (all ranks and workers together)."""
        return sum(s["clips"] for s in self.shards)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _my_shards(self) -> tuple[list[dict], str]:
        rank, world = rank_and_world() if self.split_by_rank else (0, 1)
        worker, workers = _worker_split() if self.split_by_worker else (0, 1)
        reader, readers = rank * workers + worker, world * workers
        shards = list(self.shards)
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}:shards").shuffle(shards)
        return shards[reader::readers], f"{self.seed}:{self.epoch}:{reader}"

    def __iter__(self) -> Iterator[dict]:
        shards, stream = self._my_shards()
        rng = random.Random(stream)
        buffer: list[dict] = []
        for shard in shards:
            for sample in read_samples(os.path.join(self.root, shard["file"]), shard["sha256"] if self.verify else None):
                sample["ids"] = [torch.from_numpy(a.astype(np.int64)) for a in sample["ids"]]
                if not self.shuffle:
                    yield sample
                    continue
                if len(buffer) < self.shuffle:
                    buffer.append(sample)
                    continue
                i = rng.randrange(len(buffer))
                buffer[i], sample = sample, buffer[i]
                yield sample
        rng.shuffle(buffer)
        yield from buffer


def collate_tokens(batch: list[dict]) -> dict:
    """TokenDataset items -> ``{"ids": [per level (B, t, h, w) int64], "caption": [...], "key": [...],
    "meta": [...]}``.  The clips of a batch must share their level grids (one --size per dataset,
    or batches grouped by grid)."""
    if not batch:
        raise ValueError("batch: expected at least one sample")
    grids = [tuple(tuple(a.shape) for a in b["ids"]) for b in batch]
    if len(set(grids)) != 1:
        raise ValueError(f"batch: clips with different level grids cannot be stacked ({sorted(set(grids))[:2]}); "
                         "tokenize at one --size or group batches by grid")
    levels = len(batch[0]["ids"])
    return {"ids": [torch.stack([b["ids"][l] for b in batch]) for l in range(levels)],
            "caption": [b["caption"] for b in batch], "key": [b["key"] for b in batch],
            "meta": [b["meta"] for b in batch]}


def to_tokens(batch: dict):
    """A ``collate_tokens`` batch -> pyratok Tokens (for ``PyraTok.decode``).  Tokens hold one source
    (frames, size, fps) for the batch: the first clip's."""
    from pyratok.tokens import Tokens

    meta = batch["meta"][0]
    K = meta["num_bits"]
    dtype = torch.int32 if K <= 31 else torch.int64
    source = {"frames": meta["frames"], "height": meta["height"], "width": meta["width"], "fps": meta["fps"]}
    return Tokens([i.to(dtype) for i in batch["ids"]], K, meta["grids"], meta["latent_grid"], source,
                  meta["model_id"], list(batch["caption"]))


@dataclass
class ShardSummary:
    """Dataset totals of an index (what `pyratok info` prints)."""

    shards: int
    clips: int
    tokens: int
    pixels: int
    bytes: int
    videos: int
    videos_skipped: int
    num_bits: int

    @property
    def bits_per_pixel(self) -> float:
        return self.num_bits * self.tokens / self.pixels if self.pixels else 0.0


def summarize(index: dict) -> ShardSummary:
    shards = index["shards"]
    return ShardSummary(len(shards), sum(s["clips"] for s in shards), sum(s["tokens"] for s in shards),
                        sum(s["pixels"] for s in shards), sum(s["bytes"] for s in shards),
                        sum(s["videos"] for s in shards), sum(len(s["skipped"]) for s in shards), index["num_bits"])
