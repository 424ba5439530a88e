"""Tokenize a whole video dataset into token shards (`pyratok tokenize`, pyratok.io.shards).

Pipeline, per process:

    manifest (folder | JSONL | CSV: path, caption, start, end)
      -> shards of ``videos_per_shard`` consecutive videos; rank r of W takes shards r, r+W, ...
      -> plan (main process, a thread per worker): open each video's header, cut it into clips of
         ``frames`` frames every ``stride`` sampled frames at ``fps``; group a shard's clips by
         shape (and caption or not) into batches of ``batch_size``
      -> decode (DataLoader worker processes, decord): the frames a batch needs from each video, in
         increasing order, read and resized + centre-cropped to ``size`` a few at a time
      -> encode (main process): PyraTok.encode on the batch, with the clips' captions when the
         model has a text encoder
      -> write (main process): when a shard's last batch is encoded, its clips sorted by key go
         to ``shard-NNNNNN.tar`` (atomic), then its record ``shard-NNNNNN.json``.

A shard depends only on its videos and the options, never on the rank, worker count or what
ran before, so re-running skips recorded shards and gives the same bytes, a killed run loses only
the shards in flight, and the shards of W ranks are those of one process.  Whichever rank finds
every record present writes ``index.json`` and ``errors.jsonl``.  A video that cannot be opened,
decoded or encoded is skipped with its reason; it never stops the run.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import hashlib
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Optional, Union

import numpy as np
import torch

from pyratok.io import shards as fmt

log = logging.getLogger(__name__)

MAX_BATCH_BYTES = 4 * 2**30   # float32 pixels of one batch; more is refused before anything is read


@dataclass(frozen=True)
class ClipOptions:
    """How videos are cut into clips: ``frames`` (1 + 4k) sampled frames per clip, a new clip every
    ``stride`` sampled frames (default: ``frames``, back to back), sampled at ``fps`` (default: the
    file's rate), resized to cover and centre-cropped to ``size`` = (height, width) (default: the
    video's own size cropped to multiples of 8).  A tail shorter than a clip is dropped."""

    frames: int = 17
    stride: Optional[int] = None
    size: Optional[tuple[int, int]] = None
    fps: Optional[float] = None

    def __post_init__(self):
        if self.frames < 1 or (self.frames - 1) % 4:
            raise ValueError(f"frames={self.frames}: clips have 1 + 4k frames (1, 5, 9, 17, 33, ...)")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"stride={self.stride}: expected a positive number of sampled frames")
        if self.size is not None:
            if len(self.size) != 2 or min(self.size) <= 0 or self.size[0] % 8 or self.size[1] % 8:
                raise ValueError(f"size={self.size}: expected (height, width), positive multiples of 8")
            object.__setattr__(self, "size", (int(self.size[0]), int(self.size[1])))
        if self.fps is not None and not (self.fps > 0 and math.isfinite(self.fps)):
            raise ValueError(f"fps={self.fps}: expected a positive frame rate or None")

    @property
    def step(self) -> int:
        return self.stride or self.frames

    def to_dict(self) -> dict:
        return {"frames": self.frames, "stride": self.step, "size": list(self.size) if self.size else None,
                "fps": self.fps}


@dataclass(frozen=True)
class _Clip:
    video: int                    # position in the manifest
    clip: int                     # number within the video
    path: str
    frames: tuple[int, ...]       # source frame indices
    size: tuple[int, int]         # (height, width) after resize + crop
    caption: str
    fps: float                    # rate of the sampled frames


@dataclass
class _Batch:
    shard: int
    clips: list[_Clip]
    last: bool                    # the shard's last batch
    skipped: dict = field(default_factory=dict)   # video -> (path, reason) found while planning


@dataclass
class TokenizeResult:
    """What one call did (this process only) and, when it completed the dataset, the index."""

    clips: int = 0
    tokens: int = 0
    pixels: int = 0
    videos_skipped: int = 0
    shards_written: int = 0
    shards_done_before: int = 0
    seconds: float = 0.0
    num_bits: int = 0
    index: Optional[str] = None   # path of index.json when this process wrote it

    @property
    def clips_per_second(self) -> float:
        return self.clips / self.seconds if self.seconds > 0 else 0.0

    @property
    def bits_per_pixel(self) -> float:
        return self.num_bits * self.tokens / self.pixels if self.pixels else 0.0


def _header(item: dict, options: ClipOptions) -> Union[tuple[list[tuple[int, ...]], tuple[int, int], float], str]:
    """(clips' frame indices, size, sampled fps) of one manifest entry, or why it has none."""
    from pyratok.data.video import open_video

    try:
        reader = open_video(item["path"])
        total = len(reader)
        src_fps = float(reader.get_avg_fps()) or 25.0
        if options.size is None:
            h, w = reader[0].shape[:2] if total else (0, 0)
            size = (h - h % 8, w - w % 8)
            if min(size) < 8:
                return f"frames of {h}x{w} are smaller than 8x8"
        else:
            size = options.size
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as err:
        return str(err)
    step = src_fps / options.fps if options.fps else 1.0
    first = int(round(item.get("start", 0.0) * src_fps))
    last = min(total - 1, int(round(item["end"] * src_fps)) - 1) if "end" in item else total - 1
    clips = []
    while True:
        k = len(clips) * options.step
        frames = tuple(first + int(round((k + j) * step)) for j in range(options.frames))
        if frames[-1] > last:
            break
        clips.append(frames)
    if not clips:
        return (f"{max(0, last - first + 1)} frames in range, a clip of {options.frames} frames at "
                f"{options.fps or src_fps:g} fps needs {int(round((options.frames - 1) * step)) + 1}")
    return clips, size, options.fps or src_fps


class _Plan:
    """The batches of the pending shards, planned one shard at a time as the DataLoader asks."""

    def __init__(self, items: list[dict], shards: list[int], options: ClipOptions, videos_per_shard: int,
                 batch_size: int, text: bool, threads: int):
        self.items, self.shards, self.options = items, shards, options
        self.videos_per_shard, self.batch_size, self.text, self.threads = videos_per_shard, batch_size, text, threads

    def __iter__(self) -> Iterator[_Batch]:
        with ThreadPoolExecutor(self.threads) as pool:
            for shard in self.shards:
                first = shard * self.videos_per_shard
                videos = range(first, min(len(self.items), first + self.videos_per_shard))
                headers = pool.map(lambda v: _header(self.items[v], self.options), videos)
                groups: dict[tuple, list[_Clip]] = {}
                skipped = {}
                for v, head in zip(videos, headers):
                    path = self.items[v]["path"]
                    if isinstance(head, str):
                        skipped[v] = (path, head)
                        continue
                    clips, size, fps = head
                    if self.batch_size * 3 * self.options.frames * size[0] * size[1] * 4 > MAX_BATCH_BYTES:
                        skipped[v] = (path, f"a batch of {self.batch_size} clips of {size[0]}x{size[1]} needs more "
                                            f"than {MAX_BATCH_BYTES >> 30} GiB; pass a smaller --size or --batch-size")
                        continue
                    caption = self.items[v].get("caption", "")
                    key = (size, bool(caption) and self.text)
                    groups.setdefault(key, []).extend(_Clip(v, c, path, f, size, caption, fps)
                                                      for c, f in enumerate(clips))
                batches = [clips[s:s + self.batch_size] for clips in groups.values()
                           for s in range(0, len(clips), self.batch_size)]
                batches.sort(key=lambda b: (b[0].video, b[0].clip))
                if not batches:
                    yield _Batch(shard, [], True, skipped)
                for n, clips in enumerate(batches):
                    yield _Batch(shard, clips, n == len(batches) - 1, skipped if n == 0 else {})


@functools.lru_cache(maxsize=None)
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:   # not glibc: nothing to trim
        return None


def _trim_heap() -> None:
    """Returns freed heap pages to the OS (glibc malloc_trim).  Without it (and _map_large_buffers in
    the workers) glibc keeps the pages of freed frame and activation buffers and the resident set
    creeps up over the first hundreds of batches (100-145 MB more at the peak in
    benchmarks/bench_tokenize.py)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


_M_MMAP_THRESHOLD = -3


def _map_large_buffers() -> None:
    """In a decoding worker: frame buffers of 256 KiB and more are mapped and unmapped one by one
    (a fixed mmap threshold also stops glibc from raising it after each free), so the worker's
    resident set stays at the size of one batch's frames."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 256 * 1024)


_RESIZE_BYTES = 8 * 2**20


def _decode_resized(reader, wanted: list[int], path: str, height: int, width: int) -> torch.Tensor:
    """read_frames + resize_and_crop (centred) of the ``wanted`` frames (increasing indices) of one
    video -> (3, N, height, width), a few frames at a time: each chunk is read and resized before the
    next one is read, so the frames at the source size (uint8, and their float32 copy, 4x: the largest
    buffer of decoding) never hold more than one chunk, about _RESIZE_BYTES as float32, however many
    frames a batch wants from one video.  The first chunk is one frame, which gives the source size.
    Frames are resized independently, so the result is the same bytes as one read_frames of every
    wanted frame followed by one resize_and_crop.

    Reading in chunks adds no seeks (decord 0.6.0, VideoReader::GetBatch / SeekAccurate): the reader
    keeps its position between get_batch calls, and for each index that is not the next frame it
    either skips forward (decodes without converting) within the current group of pictures, or seeks
    to the index's keyframe when the index lies in another group or behind.  That depends only on the
    position and the index, so increasing chunks decode and seek exactly as one call does; with gdb
    on av_seek_frame, 155 frames of bikes.mp4 read in 1, 39 or 155 get_batch calls make the same two
    seeks.  (read_frames' PyAV fallback, for the few sizes decord cannot copy out such as 8x8 or 48x48,
    decodes from the start on every call; at those sizes a chunk is hundreds of frames.)"""
    from pyratok.data import resize_and_crop
    from pyratok.data.video import read_frames

    out: Optional[torch.Tensor] = None
    start, step = 0, 1
    while start < len(wanted):
        frames = read_frames(reader, wanted[start:start + step], path)                 # (n, H, W, 3) uint8
        part = resize_and_crop(frames, height, width, None)                           # (3, n, height, width)
        if out is None:
            out = part.new_empty((3, len(wanted), height, width))
        out[:, start:start + len(frames)] = part
        start += len(frames)
        step = max(1, _RESIZE_BYTES // (3 * frames.shape[1] * frames.shape[2] * 4))
        frames = part = None   # this chunk goes before the next one is decoded
    return out


class _ClipDecoder(torch.utils.data.Dataset):
    """Runs in the DataLoader workers: _Batch -> its clips as one (B, 3, T, H, W) tensor in [-1, 1]."""

    def __init__(self):
        self._reader: Optional[tuple[str, object]] = None   # the last video opened, kept per worker
        self._mapped = False

    def _open(self, path: str):
        from pyratok.data.video import open_video

        if self._reader is None or self._reader[0] != path:
            self._reader = None
            self._reader = (path, open_video(path))
        return self._reader[1]

    def __getitem__(self, batch: _Batch) -> dict:
        in_worker = torch.utils.data.get_worker_info() is not None
        if in_worker and not self._mapped:
            _map_large_buffers()
            self._mapped = True
        by_video: dict[int, list[_Clip]] = {}
        for c in batch.clips:
            by_video.setdefault(c.video, []).append(c)
        # every clip of a batch has one shape: the batch tensor is allocated once (in a worker, in shared
        # memory, so sending it to the main process copies nothing) and each clip is written into its
        # row, never held as a clip of its own and then stacked (two batch-sized copies fewer per batch)
        video = None
        if batch.clips:
            first = batch.clips[0]
            video = torch.empty((len(batch.clips), 3, len(first.frames), *first.size), dtype=torch.float32)
            if in_worker:
                video.share_memory_()
        done, failed = [], {}
        for v, group in by_video.items():
            try:
                wanted = sorted({f for c in group for f in c.frames})   # increasing: decoding runs forward
                frames = _decode_resized(self._open(group[0].path), wanted, group[0].path, *group[0].size)
            except (FileNotFoundError, ValueError, OSError, RuntimeError) as err:
                self._reader = None
                failed[v] = (group[0].path, str(err))
                continue
            row = {f: i for i, f in enumerate(wanted)}
            for c in group:
                torch.index_select(frames, 1, torch.tensor([row[f] for f in c.frames]), out=video[len(done)])
                done.append(c)
            frames = None   # this video's frames go before the next one is decoded
        video = video[:len(done)] if done else None                                       # (B, 3, T, h, w)
        if self._reader is not None:
            # decord keeps the frames it decoded ahead of the last get_batch until the next seek
            # (dmlc/decord#197, #208): rewinding frees them.  Without it a long run's workers
            # held ~30 MB more than a short run's (benchmarks/bench_tokenize.py, memory rows).
            try:
                self._reader[1].seek(0)
            except Exception:   # decord's own error type: then the reader goes (reopened when needed)
                self._reader = None
        if in_worker:
            _trim_heap()
        return {"batch": batch, "video": video, "clips": done, "failed": failed}


def _identity(x):
    return x


@contextlib.contextmanager
def _frozen_objects(active: bool):
    """Around forking DataLoader workers: every Python object alive now goes to the collector's
    permanent generation (gc.freeze) until the loop ends.  A worker inherits the parent's objects
    (the model, torch's modules) in pages shared copy-on-write; without this, each full collection
    in a worker walks all of them, writing their GC headers, so page after page gets copied
    (about 35 MB per worker over the first few hundred batches, then flat: the memory a run of 100
    clips ends with was below that of 1,000 in benchmarks/bench_tokenize.py)."""
    if not active:
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class _ShardState:
    def __init__(self):
        self.samples: dict[tuple[int, int], tuple[list[np.ndarray], _Clip, dict]] = {}
        self.skipped: dict[int, tuple[str, str]] = {}


def _manifest_hash(items: list[dict]) -> str:
    return hashlib.sha256(fmt.canonical_json(items)).hexdigest()


def _dataset_config(model, items: list[dict], options: ClipOptions, videos_per_shard: int) -> dict:
    return {"format": fmt.FORMAT, "format_version": fmt.FORMAT_VERSION, "model_id": model.model_id,
            "num_bits": model.num_bits, "levels": model.config.lapq.levels, "clip": options.to_dict(),
            "videos_per_shard": videos_per_shard, "videos": len(items),
            "num_shards": math.ceil(len(items) / videos_per_shard), "manifest_sha256": _manifest_hash(items)}


def _fingerprint(config: dict) -> str:
    return hashlib.sha256(fmt.canonical_json(config)).hexdigest()[:16]


def _ours(name: str) -> bool:
    return (name in (fmt.CONFIG_FILE, fmt.INDEX_FILE, fmt.ERRORS_FILE) or
            (name.startswith("shard-") and name.endswith((".tar", ".json"))) or
            (name.startswith(".") and name.endswith(".partial")))


def _prepare(out_dir: str, config: dict, overwrite: bool, rank: int) -> None:
    """Checks out_dir holds nothing or this same dataset (or clears it with ``overwrite``)."""
    import torch.distributed as dist

    os.makedirs(out_dir, exist_ok=True)
    config_path = os.path.join(out_dir, fmt.CONFIG_FILE)
    existing = fmt.read_json(config_path, "tokenize config") if os.path.isfile(config_path) else None
    others = [n for n in os.listdir(out_dir) if not _ours(n)]
    if existing is not None and existing != config:
        if not overwrite:
            changed = sorted(k for k in set(existing) | set(config) if existing.get(k) != config.get(k))
            raise ValueError(f"out_dir: {out_dir} holds a token dataset made with other settings "
                             f"({', '.join(changed)} differ); pass --overwrite to replace it, or choose another folder")
    elif existing is None and others and not overwrite:
        raise ValueError(f"out_dir: {out_dir} is not empty and not a pyratok token dataset "
                         f"(holds {others[0]!r}); choose an empty folder or pass --overwrite")
    if overwrite and existing != config and rank == 0:
        for name in os.listdir(out_dir):
            if _ours(name):
                os.unlink(os.path.join(out_dir, name))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()   # no rank writes before rank 0 has cleared the folder
    fmt.write_json(config_path, config, tag=f".rank{rank}")


def _finished(out_dir: str, shard: int, fingerprint: str) -> Optional[dict]:
    """The shard's record when the shard is complete and intact, else None."""
    path = os.path.join(out_dir, fmt.record_file(shard))
    if not os.path.isfile(path):
        return None
    try:
        record = fmt.read_json(path, "shard record")
    except fmt.ShardError:
        return None
    if record.get("fingerprint") != fingerprint:
        return None
    if record.get("file") is None:
        return record
    tar = os.path.join(out_dir, record["file"])
    if not os.path.isfile(tar) or os.path.getsize(tar) != record.get("bytes"):
        return None
    with open(tar, "rb") as f:
        if hashlib.sha256(f.read()).hexdigest() != record.get("sha256"):
            return None
    return record


def _write_shard(out_dir: str, shard: int, state: _ShardState, config: dict, fingerprint: str,
                 first_video: int, videos: int) -> dict:
    keep = sorted(k for k in state.samples if k[0] not in state.skipped)
    samples, tokens, pixels = [], 0, 0
    for key in keep:
        ids, clip, meta = state.samples[key]
        samples.append(fmt.sample_files(fmt.sample_key(*key), ids, clip.caption, meta))
        tokens += sum(a.size for a in ids)
        pixels += len(clip.frames) * clip.size[0] * clip.size[1]
    record = {"shard": shard, "file": None, "sha256": None, "bytes": 0, "clips": len(keep), "tokens": tokens,
              "pixels": pixels, "first_video": first_video, "videos": videos, "fingerprint": fingerprint,
              "skipped": [{"video_index": v, "path": p, "reason": r} for v, (p, r) in sorted(state.skipped.items())]}
    if samples:
        name = fmt.shard_file(shard)
        record["file"] = name
        record["sha256"], record["bytes"] = fmt.write_shard(os.path.join(out_dir, name), samples)
    fmt.write_json(os.path.join(out_dir, fmt.record_file(shard)), record)
    return record


def _write_index(out_dir: str, config: dict, fingerprint: str, rank: int) -> Optional[str]:
    """Writes index.json and errors.jsonl when every shard is recorded; their path, else None."""
    records = []
    for shard in range(config["num_shards"]):
        path = os.path.join(out_dir, fmt.record_file(shard))
        if not os.path.isfile(path):
            return None
        record = fmt.read_json(path, "shard record")
        if record.get("fingerprint") != fingerprint:
            return None
        records.append({k: v for k, v in record.items() if k != "fingerprint"})
    index = dict(config, shards=records)
    totals = fmt.summarize(index)
    index["totals"] = {"clips": totals.clips, "tokens": totals.tokens, "pixels": totals.pixels, "bytes": totals.bytes,
                       "videos": totals.videos, "videos_skipped": totals.videos_skipped,
                       "bits_per_pixel": totals.bits_per_pixel}
    lines = b"".join(fmt.canonical_json(s) + b"\n" for r in records for s in r["skipped"])
    with fmt.atomic_file(os.path.join(out_dir, fmt.ERRORS_FILE), tag=f".rank{rank}") as f:
        f.write(lines)
    path = os.path.join(out_dir, fmt.INDEX_FILE)
    fmt.write_json(path, index, tag=f".rank{rank}")
    return path


def _rank_world(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    if rank is None and world_size is None:
        return fmt.rank_and_world()
    rank, world_size = rank or 0, world_size or 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}: expected 0 <= rank < world_size={world_size}")
    return rank, world_size


TileArg = Union[None, int, Callable[[int, int], Optional[int]]]


def tokenize(source: str, out_dir: str, model, options: ClipOptions = ClipOptions(), batch_size: int = 8,
             workers: int = 2, videos_per_shard: int = 32, tile: TileArg = None, device: Union[str, torch.device] = "cpu",
             overwrite: bool = False, rank: Optional[int] = None, world_size: Optional[int] = None,
             progress: bool = False) -> TokenizeResult:
    """Tokenizes every clip of ``source`` (a folder of videos or a JSONL/CSV manifest) into token
    shards in ``out_dir`` (see the module docstring and pyratok.io.shards for the format).

    ``tile``: latent tile size, or a function (height, width) -> tile size, or None.  ``rank`` /
    ``world_size`` default to torch.distributed's (when initialised), else the env RANK /
    WORLD_SIZE that torchrun sets.  Returns what this process did."""
    from tqdm import tqdm

    from pyratok.data import read_manifest

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected at least 1")
    if workers < 0:
        raise ValueError(f"workers={workers}: expected 0 (decode in this process) or more")
    if videos_per_shard < 1:
        raise ValueError(f"videos_per_shard={videos_per_shard}: expected at least 1")
    if options.size is not None and batch_size * 3 * options.frames * options.size[0] * options.size[1] * 4 > MAX_BATCH_BYTES:
        raise ValueError(f"batch_size={batch_size} x frames={options.frames} x size={options.size}: one batch would need "
                         f"more than {MAX_BATCH_BYTES >> 30} GiB of float32 pixels; lower one of them")
    rank, world = _rank_world(rank, world_size)
    items = read_manifest(source)
    config = _dataset_config(model, items, options, videos_per_shard)
    fingerprint = _fingerprint(config)
    _prepare(out_dir, config, overwrite, rank)

    result = TokenizeResult(num_bits=model.num_bits)
    for name in (fmt.CONFIG_FILE, fmt.INDEX_FILE, fmt.ERRORS_FILE):   # this rank's leftovers of a killed run
        leftover = fmt.partial_path(os.path.join(out_dir, name), f".rank{rank}")
        if os.path.exists(leftover):
            os.unlink(leftover)
    pending = []
    for shard in range(rank, config["num_shards"], world):
        if _finished(out_dir, shard, fingerprint) is not None:
            result.shards_done_before += 1
            continue
        for name in (fmt.shard_file(shard), fmt.record_file(shard)):   # in flight when a run was killed
            leftover = fmt.partial_path(os.path.join(out_dir, name))
            if os.path.exists(leftover):
                os.unlink(leftover)
        pending.append(shard)
    index_path = os.path.join(out_dir, fmt.INDEX_FILE)
    if pending and os.path.exists(index_path):
        os.unlink(index_path)   # the dataset is incomplete until the redone shards are recorded

    tile_for = tile if callable(tile) else (lambda h, w: tile)
    text = model.text_encoder is not None
    device = torch.device(device)

    def decoded() -> Iterator[dict]:
        # decoding workers live for one shard: forked for it, gone when it is written.  A forked worker
        # shares the main process's pages copy-on-write, and every page the main process writes afterwards
        # (its heap reused by the encoder's buffers) is then held twice; over a long-lived worker that
        # grew the run's memory by ~20 MB in its first few hundred clips (benchmarks/bench_tokenize.py,
        # memory rows).  Forked afresh per shard, nothing a worker holds outlives the shard, so the peak
        # is that of one shard's run whatever the dataset's length.
        for group in ([[shard] for shard in pending] if workers else [pending]):
            plan = _Plan(items, group, options, videos_per_shard, batch_size, text, max(1, workers))
            with _frozen_objects(workers > 0):
                yield from torch.utils.data.DataLoader(_ClipDecoder(), batch_size=None, sampler=plan,
                                                       num_workers=workers, collate_fn=_identity,
                                                       pin_memory=device.type == "cuda",
                                                       prefetch_factor=2 if workers else None)

    states: dict[int, _ShardState] = {}
    start = time.perf_counter()
    bar = tqdm(desc=f"tokenize (rank {rank}/{world})" if world > 1 else "tokenize", unit="clip",
               disable=not progress, dynamic_ncols=True)
    # closing: on an error the generator's finally blocks (unfreezing, the workers' shutdown) run at once
    with torch.inference_mode(), contextlib.closing(decoded()) as batches:
        for out in batches:
            batch: _Batch = out["batch"]
            state = states.setdefault(batch.shard, _ShardState())
            failed = {**batch.skipped, **out["failed"]}
            if out["video"] is not None:
                clips: list[_Clip] = out["clips"]
                captions = [c.caption for c in clips]
                try:
                    tokens = model.encode(out["video"].to(device, non_blocking=True),
                                          captions if text and captions[0] else None,
                                          tile=tile_for(*clips[0].size))
                except (RuntimeError, ValueError) as err:
                    failed.update({c.video: (c.path, f"encoding failed ({type(err).__name__}: {str(err)[:200]})")
                                   for c in clips})
                else:
                    dtype = fmt.ids_dtype(tokens.num_bits)
                    ids = [i.cpu().numpy().astype(dtype) for i in tokens.ids]              # per level (B, t, h, w)
                    for b, c in enumerate(clips):
                        meta = {"key": fmt.sample_key(c.video, c.clip), "video": c.path, "video_index": c.video,
                                "clip": c.clip, "first_frame": c.frames[0], "last_frame": c.frames[-1], "fps": c.fps,
                                "frames": len(c.frames), "height": c.size[0], "width": c.size[1],
                                "num_bits": tokens.num_bits, "grids": [list(g) for g in tokens.grids],
                                "latent_grid": list(tokens.latent_grid), "model_id": tokens.model_id}
                        state.samples[(c.video, c.clip)] = ([a[b] for a in ids], c, meta)
                    bar.update(len(clips))
            for v, (path, reason) in failed.items():
                if v not in state.skipped:
                    log.warning("skipping %s: %s", path, reason)
                    state.skipped[v] = (path, reason)
            del out
            _trim_heap()
            if batch.last:
                first = batch.shard * videos_per_shard
                record = _write_shard(out_dir, batch.shard, states.pop(batch.shard), config, fingerprint, first,
                                      min(len(items), first + videos_per_shard) - first)
                result.shards_written += 1
                result.clips += record["clips"]
                result.tokens += record["tokens"]
                result.pixels += record["pixels"]
                result.videos_skipped += len(record["skipped"])
    bar.close()
    result.seconds = time.perf_counter() - start
    result.index = _write_index(out_dir, config, fingerprint, rank)
    return result
