"""Self-describing token files (DESIGN.md §4, Token files).

One video -> one ``.safetensors`` file.  Each level's ids are stored as K bit planes,
``level_<l>``: (K, ceil(N_l/8)) uint8 where N_l = t*h*w tokens in raster order and plane k
holds bit k of every id (MSB-first ids, numpy.packbits order inside each byte), so a
file costs K bits per token.  The safetensors metadata (all strings) says what the file is:

    format          "pyratok-tokens"            (anything else is a foreign file)
    format_version  "1"
    num_bits        K
    bit_order       "msb-first"
    grids           JSON [[t, h, w], ...] per level;  latent_grid JSON [T, H, W]
    source          JSON {frames, height, width, fps, path?}
    model_id        the model's id (its config hash, see PyraTok.model_id)
    caption         optional
    checksum        sha256 over the metadata above (canonical JSON) and every plane's bytes

Readers reject truncated, corrupted (checksum) and foreign files with TokenFileError.
Datasets use shards: ``write_token_shards`` packs many videos per file plus an
``index.json``; ``TokenShardDataset`` reads them back (torch or numpy).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Optional

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pyratok import ops
from pyratok.tokens import Tokens
from pyratok.utils import atomic_write

FORMAT = "pyratok-tokens"
FORMAT_VERSION = "1"
_KEYS = ("format", "format_version", "num_bits", "bit_order", "grids", "latent_grid", "source", "model_id", "caption")


class TokenFileError(ValueError):
    """A token file that is missing, truncated, corrupted, foreign or of another version."""


def _planes(ids: torch.Tensor, K: int) -> torch.Tensor:
    """(1, t, h, w) ids -> (K, ceil(N/8)) uint8 bit planes."""
    bits = ops.indices_to_bits(ids.reshape(-1).cpu(), K)             # (N, K)
    return ops.pack_bits(bits.T.contiguous())                        # (K, ceil(N/8))


def _ids(planes: torch.Tensor, grid) -> torch.Tensor:
    n = grid[0] * grid[1] * grid[2]
    bits = ops.unpack_bits(planes, n).T.contiguous()                 # (N, K)
    return ops.bits_to_indices(bits).reshape(1, *grid)


def _checksum(meta: dict, tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256(json.dumps({k: meta.get(k, "") for k in _KEYS}, sort_keys=True).encode())
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _metadata(tokens: Tokens, caption: Optional[str]) -> dict:
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "num_bits": str(tokens.num_bits),
        "bit_order": "msb-first", "grids": json.dumps([list(g) for g in tokens.grids]),
        "latent_grid": json.dumps(list(tokens.latent_grid)), "source": json.dumps(tokens.source, sort_keys=True),
        "model_id": tokens.model_id, "caption": caption or "",
    }


MAX_HEADER_BYTES = 100 << 20   # safetensors' own limit on a header
MAX_LEVELS = 64
MAX_GRID_TOKENS = 1 << 34      # tokens of one level (a 2 GiB plane at K = 1)


def _json_field(meta: dict, key: str, where: str):
    if not isinstance(meta.get(key), str):
        raise TokenFileError(f"{where}: metadata {key!r} is missing")
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as err:
        raise TokenFileError(f"{where}: metadata {key!r} is not JSON ({err})") from None


def _is_grid(g) -> bool:
    return (isinstance(g, list) and len(g) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_GRID_TOKENS for v in g))


def _validated(meta: dict, where: str) -> dict:
    """The decoded metadata after every field is checked: num_bits an int 1..63, grids a list of
    [t, h, w] positive ints, latent_grid one such triple, source an object, model_id a string.
    Run before any tensor is read, so an inconsistent file fails in one line."""
    try:
        K = int(meta.get("num_bits", ""))
    except ValueError:
        raise TokenFileError(f"{where}: metadata 'num_bits' is missing or not an integer "
                             f"({meta.get('num_bits')!r})") from None
    if not 1 <= K <= 63:
        raise TokenFileError(f"{where}: num_bits={K}: token ids exist for 1..63 bits")
    grids = _json_field(meta, "grids", where)
    if not isinstance(grids, list) or not 1 <= len(grids) <= MAX_LEVELS or not all(_is_grid(g) for g in grids):
        raise TokenFileError(f"{where}: metadata 'grids' must be a list of 1..{MAX_LEVELS} [t, h, w] "
                             f"triples of positive integers, got {meta.get('grids')[:120]}")
    if any(t * h * w > MAX_GRID_TOKENS for t, h, w in grids):
        raise TokenFileError(f"{where}: a level grid holds more than {MAX_GRID_TOKENS} tokens")
    latent = _json_field(meta, "latent_grid", where)
    if not _is_grid(latent):
        raise TokenFileError(f"{where}: metadata 'latent_grid' must be a [t, h, w] triple of positive integers")
    source = _json_field(meta, "source", where)
    if not isinstance(source, dict):
        raise TokenFileError(f"{where}: metadata 'source' must be a JSON object, got {type(source).__name__}")
    if not isinstance(meta.get("model_id"), str):
        raise TokenFileError(f"{where}: metadata 'model_id' is missing")
    return {"num_bits": K, "grids": grids, "latent_grid": latent, "source": source}


def _check_planes(shapes: dict, fields: dict, where: str, prefix: str = "") -> None:
    """Every level's plane exists with shape (K, ceil(N/8)) and dtype uint8 (from the header)."""
    K = fields["num_bits"]
    for l, (t, h, w) in enumerate(fields["grids"]):
        name = f"{prefix}level_{l}"
        if name not in shapes:
            raise TokenFileError(f"{where}: level {l} ({name}) is missing")
        shape, dtype = shapes[name]
        want = [K, (t * h * w + 7) // 8]
        if list(shape) != want or dtype not in ("U8", torch.uint8):
            raise TokenFileError(f"{where}: level {l} holds {tuple(shape)} {dtype}, expected {tuple(want)} uint8")


def _tokens_from(meta: dict, planes: list[torch.Tensor], where: str) -> Tokens:
    K = int(meta["num_bits"])
    grids = [tuple(g) for g in json.loads(meta["grids"])]
    for l, (p, g) in enumerate(zip(planes, grids)):
        want = (K, (g[0] * g[1] * g[2] + 7) // 8)
        if tuple(p.shape) != want or p.dtype != torch.uint8:
            raise TokenFileError(f"{where}: level {l} holds {tuple(p.shape)} {p.dtype}, expected {want} uint8")
    caption = meta.get("caption") or None
    return Tokens([_ids(p, g) for p, g in zip(planes, grids)], K, grids,
                  tuple(json.loads(meta["latent_grid"])), json.loads(meta["source"]), meta["model_id"],
                  None if caption is None else [caption])


def _check_header(meta: dict, where: str) -> dict:
    if meta.get("format") != FORMAT:
        raise TokenFileError(f"{where}: not a pyratok token file (format={meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise TokenFileError(f"{where}: token file format version {meta.get('format_version')!r}; "
                             f"this pyratok reads version {FORMAT_VERSION}")
    if meta.get("bit_order") != "msb-first":
        raise TokenFileError(f"{where}: unknown bit order {meta.get('bit_order')!r}")
    return meta


def _read(path: str) -> tuple[dict, dict]:
    """(metadata, tensors) of a safetensors file, with clear errors for anything else."""
    if not os.path.isfile(path):
        raise TokenFileError(f"{path}: no such token file")
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise TokenFileError(f"{path}: truncated ({len(data)} bytes) or not a token file")
    header_len = int.from_bytes(data[:8], "little")
    if data[8:9] != b"{":
        raise TokenFileError(f"{path}: not a token file (no safetensors header)")
    if header_len > len(data) - 8:
        raise TokenFileError(f"{path}: truncated (header says {header_len} bytes, file has {len(data) - 8})")
    try:
        meta = json.loads(data[8:8 + header_len]).get("__metadata__")
        tensors = st_load(data)
    except Exception as err:  # safetensors/JSON raise several types for damaged bytes
        raise TokenFileError(f"{path}: truncated or corrupted token file ({type(err).__name__}: {err})") from None
    return meta, tensors


def save_tokens(path: str, tokens: Tokens) -> None:
    """Writes one video's tokens (batch of 1) to ``path`` atomically."""
    if tokens.batch_size != 1:
        raise ValueError(f"tokens: a token file holds one video, got a batch of {tokens.batch_size} "
                         "(save tokens[i] per video, or use write_token_shards)")
    caption = tokens.captions[0] if tokens.captions else None
    meta = _metadata(tokens, caption)
    planes = [_planes(i, tokens.num_bits) for i in tokens.ids]
    meta["checksum"] = _checksum(meta, planes)
    blob = st_save({f"level_{l}": p for l, p in enumerate(planes)}, metadata=meta)
    with atomic_write(path) as f:
        f.write(blob)


def _read_header(path: str) -> tuple[dict, dict, int]:
    """(metadata, {name: (shape, dtype, (begin, end))}, data start) from a safetensors header,
    without reading the tensor data."""
    if not os.path.isfile(path):
        raise TokenFileError(f"{path}: no such token file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(9)
        if len(head) < 9:
            raise TokenFileError(f"{path}: truncated ({size} bytes) or not a token file")
        header_len = int.from_bytes(head[:8], "little")
        if head[8:9] != b"{":
            raise TokenFileError(f"{path}: not a token file (no safetensors header)")
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise TokenFileError(f"{path}: truncated (header says {header_len} bytes, file has {size - 8})")
        f.seek(8)
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:     # it starts with "{": a dict or an error
        raise TokenFileError(f"{path}: corrupted token file header ({err})") from None
    meta = header.pop("__metadata__", None)
    infos = {}
    for name, info in header.items():
        try:
            begin, end = (int(v) for v in info["data_offsets"])
            infos[name] = (list(info["shape"]), info["dtype"], (begin, end))
        except (KeyError, TypeError, ValueError):
            raise TokenFileError(f"{path}: corrupted entry {name!r} in the token file header") from None
        if not 0 <= begin <= end <= size - 8 - header_len:
            raise TokenFileError(f"{path}: truncated ({name} lies past the end of the file)")
    return meta if isinstance(meta, dict) else {}, infos, 8 + header_len


def read_token_metadata(path: str) -> dict:
    """The decoded metadata of a token file (for `pyratok info`): the header is validated
    before anything else is read, then the checksum is verified one level at a time (memory
    bounded by one level's bit planes, never the whole file)."""
    meta, infos, start = _read_header(path)
    _check_header(meta, path)
    fields = _validated(meta, path)
    _check_planes({k: (v[0], v[1]) for k, v in infos.items()}, fields, path)
    h = hashlib.sha256(json.dumps({k: meta.get(k, "") for k in _KEYS}, sort_keys=True).encode())
    with open(path, "rb") as f:
        for l in range(len(fields["grids"])):
            begin, end = infos[f"level_{l}"][2]
            f.seek(start + begin)
            remaining = end - begin
            while remaining:
                block = f.read(min(remaining, 1 << 22))
                if not block:
                    raise TokenFileError(f"{path}: truncated inside level {l}")
                h.update(block)
                remaining -= len(block)
    if meta.get("checksum") != h.hexdigest():
        raise TokenFileError(f"{path}: checksum mismatch: the file is corrupted")
    out = {**meta, **fields}
    out["num_tokens"] = sum(t * h * w for t, h, w in out["grids"])
    return out


def load_tokens(path: str) -> Tokens:
    """Reads a token file; raises TokenFileError if it is truncated, corrupted or foreign."""
    meta, infos, _ = _read_header(path)
    _check_header(meta, path)
    fields = _validated(meta, path)
    _check_planes({k: (v[0], v[1]) for k, v in infos.items()}, fields, path)
    meta, tensors = _read(path)
    planes = [tensors[f"level_{l}"] for l in range(len(fields["grids"]))]
    if meta.get("checksum") != _checksum(meta, planes):
        raise TokenFileError(f"{path}: checksum mismatch: the file is corrupted")
    return _tokens_from(meta, planes, path)


def write_token_shards(out_dir: str, items: Iterable[tuple[str, Tokens]], shard_size: int = 1024) -> str:
    """Packs many videos' tokens into shard files + ``index.json``; returns the index path.

    items: (key, tokens of one video).  Keys must be unique (e.g. the video's path).
    """
    os.makedirs(out_dir, exist_ok=True)
    index = {"format": FORMAT + "-shards", "format_version": FORMAT_VERSION, "shards": [], "items": []}
    pending: list[tuple[str, Tokens]] = []
    seen = set()

    def flush():
        if not pending:
            return
        name = f"shard-{len(index['shards']):05d}.safetensors"
        tensors, metas = {}, {}
        for key, tok in pending:
            planes = [_planes(i, tok.num_bits) for i in tok.ids]
            meta = _metadata(tok, tok.captions[0] if tok.captions else None)
            meta["checksum"] = _checksum(meta, planes)
            metas[key] = meta
            for l, p in enumerate(planes):
                tensors[f"{len(metas) - 1}.level_{l}"] = p
        blob = st_save(tensors, metadata={"format": FORMAT + "-shard", "format_version": FORMAT_VERSION,
                                          "items": json.dumps(metas)})
        with atomic_write(os.path.join(out_dir, name)) as f:
            f.write(blob)
        index["shards"].append({"file": name, "sha256": hashlib.sha256(blob).hexdigest(), "count": len(pending)})
        for pos, (key, tok) in enumerate(pending):
            index["items"].append({"key": key, "shard": len(index["shards"]) - 1, "position": pos,
                                   "num_tokens": tok.num_tokens})
        pending.clear()

    for key, tok in items:
        if key in seen:
            raise ValueError(f"items: duplicate key {key!r}")
        if tok.batch_size != 1:
            raise ValueError(f"items[{key!r}]: one video per item, got a batch of {tok.batch_size}")
        seen.add(key)
        pending.append((key, tok))
        if len(pending) == shard_size:
            flush()
    flush()
    path = os.path.join(out_dir, "index.json")
    with atomic_write(path, "w") as f:
        json.dump(index, f, indent=1)
    return path


class TokenShardDataset(torch.utils.data.Dataset):
    """Reads a sharded token dataset: ``ds[i]`` -> Tokens of one video; ``ds.numpy(i)`` ->
    list of per-level (t, h, w) numpy id arrays; ``ds.keys`` in order.  Shards are verified
    (sha256) when first opened, and each item against its own checksum when read; one shard is
    kept open at a time (worker-safe)."""

    def __init__(self, index_path: str):
        if not os.path.isfile(index_path):
            raise TokenFileError(f"{index_path}: no such token index")
        try:
            with open(index_path) as f:
                self.index = json.load(f)
        except json.JSONDecodeError as err:
            raise TokenFileError(f"{index_path}: not a token index ({err})") from None
        if self.index.get("format") != FORMAT + "-shards":
            raise TokenFileError(f"{index_path}: not a pyratok token index")
        self.root = os.path.dirname(os.path.abspath(index_path))
        self.items = self.index["items"]
        self.keys = [it["key"] for it in self.items]
        self._open: tuple[int, dict, dict] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def _shard(self, s: int):
        if self._open is None or self._open[0] != s:
            info = self.index["shards"][s]
            path = os.path.join(self.root, info["file"])
            if not os.path.isfile(path):
                raise TokenFileError(f"{path}: shard listed in the index is missing")
            with open(path, "rb") as f:
                blob = f.read()
            if hashlib.sha256(blob).hexdigest() != info["sha256"]:
                raise TokenFileError(f"{path}: checksum mismatch: the shard is corrupted")
            meta, tensors = _read(path)
            self._open = (s, json.loads(meta["items"]), tensors)
        return self._open

    def __getitem__(self, i: int) -> Tokens:
        item = self.items[i]
        _, metas, tensors = self._shard(item["shard"])
        where = f"{item['key']} in shard {item['shard']}"
        meta = metas.get(item["key"])
        if not isinstance(meta, dict):
            raise TokenFileError(f"{where}: the shard has no metadata for this item")
        fields = _validated(meta, where)
        prefix = f"{item['position']}."
        _check_planes({k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}, fields, where, prefix)
        planes = [tensors[f"{prefix}level_{l}"] for l in range(len(fields["grids"]))]
        if meta.get("checksum") != _checksum(meta, planes):      # the shard's sha256 passed: a bad writer
            raise TokenFileError(f"{where}: checksum mismatch: the item's metadata or ids are corrupted")
        return _tokens_from(meta, planes, where)

    def numpy(self, i: int) -> list[np.ndarray]:
        return [ids[0].numpy() for ids in self[i].ids]
