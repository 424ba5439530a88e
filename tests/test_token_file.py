"""Token files: round trip, corruption / truncation / foreign-file detection, shards."""

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load, save

from pyratok.io import TokenFileError, TokenShardDataset, load_tokens, read_token_metadata, save_tokens, write_token_shards
from pyratok.io import token_file
from pyratok.tokens import Tokens

GRIDS = [(2, 1, 1), (2, 2, 3), (2, 5, 6)]


def make_tokens(K=17, B=1, seed=0, caption="a clip"):
    g = torch.Generator().manual_seed(seed)
    dtype = torch.int32 if K <= 31 else torch.int64
    ids = [torch.randint(0, 2**min(K, 62), (B, *gr), generator=g, dtype=torch.int64).to(dtype) for gr in GRIDS]
    return Tokens(ids, K, GRIDS, (2, 5, 6), {"frames": 5, "height": 40, "width": 48, "fps": 25.0}, "model-abc",
                  [caption] * B if caption else None)


@pytest.mark.parametrize("K", [1, 8, 16, 17, 33, 63])
def test_round_trip(tmp_path, K):
    tok = make_tokens(K)
    path = tmp_path / "clip.safetensors"
    save_tokens(str(path), tok)
    back = load_tokens(str(path))
    assert all(torch.equal(a, b) for a, b in zip(back.ids, tok.ids))
    assert (back.num_bits, back.grids, back.latent_grid, back.source, back.model_id, back.captions) == \
        (tok.num_bits, tok.grids, tok.latent_grid, tok.source, tok.model_id, tok.captions)
    # K bits per token plus a small header
    payload = sum(K * ((t * h * w + 7) // 8) for t, h, w in GRIDS)
    assert os.path.getsize(path) < payload + 2048
    meta = read_token_metadata(str(path))
    assert meta["num_bits"] == K and meta["num_tokens"] == tok.num_tokens and meta["bit_order"] == "msb-first"


def test_corruption_truncation_foreign(tmp_path):
    path = tmp_path / "clip.safetensors"
    save_tokens(str(path), make_tokens())
    data = path.read_bytes()
    flipped = bytearray(data)
    flipped[-3] ^= 0x10                                   # one bit in the last plane
    (tmp_path / "bad.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(TokenFileError, match="checksum mismatch"):
        load_tokens(str(tmp_path / "bad.safetensors"))
    (tmp_path / "short.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(TokenFileError, match="truncated"):
        load_tokens(str(tmp_path / "short.safetensors"))
    (tmp_path / "tiny.safetensors").write_bytes(data[:5])
    with pytest.raises(TokenFileError, match="truncated"):
        load_tokens(str(tmp_path / "tiny.safetensors"))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(TokenFileError, match="not a pyratok token file"):
        load_tokens(str(tmp_path / "weights.safetensors"))
    (tmp_path / "text.safetensors").write_text("hello, I am not a token file at all")
    with pytest.raises(TokenFileError):
        load_tokens(str(tmp_path / "text.safetensors"))
    with pytest.raises(TokenFileError, match="no such token file"):
        load_tokens(str(tmp_path / "missing.safetensors"))
    # metadata tampering is caught by the checksum too
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    header["__metadata__"]["model_id"] = "model-xyz"
    new_header = json.dumps(header).encode().ljust(header_len)
    if len(new_header) == header_len:
        (tmp_path / "meta.safetensors").write_bytes(data[:8] + new_header + data[8 + header_len:])
        with pytest.raises(TokenFileError, match="checksum mismatch"):
            load_tokens(str(tmp_path / "meta.safetensors"))


def test_batch_must_be_split_and_failed_write_leaves_old_file(tmp_path):
    path = tmp_path / "clip.safetensors"
    save_tokens(str(path), make_tokens())
    before = path.read_bytes()
    with pytest.raises(ValueError, match="a token file holds one video, got a batch of 2"):
        save_tokens(str(path), make_tokens(B=2))
    assert path.read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
    save_tokens(str(path), make_tokens(B=2)[1])
    assert load_tokens(str(path)).num_bits == 17


def test_tokens_validation():
    tok = make_tokens()
    with pytest.raises(ValueError, match=r"ids\[1\]: expected shape"):
        Tokens([tok.ids[0], tok.ids[0], tok.ids[2]], 17, GRIDS, (2, 5, 6))
    with pytest.raises(ValueError, match="expected torch.int32 for K=17"):
        Tokens([i.long() for i in tok.ids], 17, GRIDS, (2, 5, 6))
    assert tok.bits_per_pixel() == pytest.approx(17 * tok.num_tokens / (5 * 40 * 48))


def test_shards(tmp_path):
    items = [(f"video{i}.mp4", make_tokens(K=16, seed=i, caption=f"caption {i}")) for i in range(7)]
    index = write_token_shards(str(tmp_path / "ds"), items, shard_size=3)
    ds = TokenShardDataset(index)
    assert len(ds) == 7 and ds.keys == [k for k, _ in items]
    assert len(ds.index["shards"]) == 3
    for i, (_, tok) in enumerate(items):
        got = ds[i]
        assert all(torch.equal(a, b) for a, b in zip(got.ids, tok.ids))
        assert got.captions == tok.captions
        arrays = ds.numpy(i)
        assert isinstance(arrays[0], np.ndarray) and arrays[2].shape == GRIDS[2]
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=0)
    assert sum(1 for _ in loader) == 7
    shard = tmp_path / "ds" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    fresh = TokenShardDataset(index)
    with pytest.raises(TokenFileError, match="shard is corrupted"):
        fresh[4]
    with pytest.raises(ValueError, match="duplicate key"):
        write_token_shards(str(tmp_path / "dup"), [items[0], items[0]])


def test_atomic_files_get_ordinary_permissions(tmp_path):
    from pyratok.utils import atomic_write

    old = os.umask(0o022)
    try:
        with atomic_write(str(tmp_path / "f.bin")) as f:
            f.write(b"x")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "f.bin").st_mode & 0o777 == 0o644       # not mkstemp's private 0600


# ---- the shard format of write_token_shards / TokenShardDataset, pinned field by field ---------------

def _header(data: bytes) -> tuple[int, dict]:
    """(length, parsed JSON) of a safetensors file's header."""
    length = int.from_bytes(data[:8], "little")
    return length, json.loads(data[8:8 + length])


def _st_metadata(path) -> dict:
    return _header(open(path, "rb").read())[1]["__metadata__"]


def _raw(path, header: dict, body: bytes = b""):
    """A file of safetensors layout written by hand: length, the JSON ``header``, then ``body``."""
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + body)
    return path


def _rewrite_shard(folder, shard: int, edit) -> None:
    """Rewrites one shard through ``edit(metadata_items, tensors)`` and records its new sha256 in the
    index, so only the reader's own per-item checks stand between it and the damage."""
    path = folder / f"shard-{shard:05d}.safetensors"
    data = path.read_bytes()
    meta, tensors = _st_metadata(path), load(data)
    items = json.loads(meta["items"])
    edit(items, tensors)
    meta["items"] = json.dumps(items)
    blob = save(tensors, metadata=meta)
    path.write_bytes(blob)
    index = json.loads((folder / "index.json").read_text())
    index["shards"][shard]["sha256"] = hashlib.sha256(blob).hexdigest()
    (folder / "index.json").write_text(json.dumps(index))


def test_shard_index_and_shard_metadata_are_the_documented_format(tmp_path):
    items = [(f"v{i}", make_tokens(K=16, seed=i, caption=None if i == 1 else f"caption {i}")) for i in range(4)]
    folder = tmp_path / "ds"
    folder.mkdir()                                            # an existing folder is fine
    path = write_token_shards(str(folder), items, shard_size=3)
    assert path == os.path.join(str(folder), "index.json")
    n = items[0][1].num_tokens
    want = {"format": "pyratok-tokens-shards", "format_version": "1",
            "shards": [{"file": f"shard-0000{s}.safetensors",
                        "sha256": hashlib.sha256((folder / f"shard-0000{s}.safetensors").read_bytes()).hexdigest(),
                        "count": c} for s, c in ((0, 3), (1, 1))],
            "items": [{"key": f"v{i}", "shard": i // 3, "position": i % 3, "num_tokens": n} for i in range(4)]}
    assert (folder / "index.json").read_text() == json.dumps(want, indent=1)
    meta = _st_metadata(folder / "shard-00000.safetensors")
    assert {k: v for k, v in meta.items() if k != "items"} == {"format": "pyratok-tokens-shard", "format_version": "1"}
    # each item's metadata is exactly what save_tokens writes for that video (checksum included)
    for key, tok in items[:3]:
        save_tokens(str(tmp_path / f"{key}.safetensors"), tok)
        single = _st_metadata(tmp_path / f"{key}.safetensors")
        assert json.loads(meta["items"])[key] == single
    ds = TokenShardDataset(path)
    assert ds[1].captions is None and ds[2].captions == ["caption 2"]
    # the folder is written again in place, and a batch is refused by name
    assert write_token_shards(str(folder), items[:1]) == path and TokenShardDataset(path).keys == ["v0"]
    with pytest.raises(ValueError) as err:
        write_token_shards(str(tmp_path / "b"), [("pair", make_tokens(B=2))])
    assert str(err.value) == "items['pair']: one video per item, got a batch of 2"


def test_shards_hold_1024_videos_by_default(tmp_path):
    one = Tokens([torch.zeros(1, 1, 1, 1, dtype=torch.int32)], 1, [(1, 1, 1)], (1, 1, 1))
    index = json.loads(open(write_token_shards(str(tmp_path), ((f"k{i}", one) for i in range(1025)))).read())
    assert [s["count"] for s in index["shards"]] == [1024, 1]


def test_shard_reader_names_what_is_wrong(tmp_path):
    items = [(f"v{i}", make_tokens(K=16, seed=i)) for i in range(5)]
    folder = tmp_path / "ds"
    index = write_token_shards(str(folder), items, shard_size=2)

    def message(path, i=0):
        with pytest.raises(TokenFileError) as err:
            TokenShardDataset(str(path))[i]
        return str(err.value)

    assert message(tmp_path / "none.json") == f"{tmp_path / 'none.json'}: no such token index"
    (tmp_path / "bad.json").write_text("{oops")
    assert message(tmp_path / "bad.json").startswith(f"{tmp_path / 'bad.json'}: not a token index (Expecting")
    (tmp_path / "other.json").write_text('{"format": "something-else"}')
    assert message(tmp_path / "other.json") == f"{tmp_path / 'other.json'}: not a pyratok token index"

    # one shard is read (and verified) once for all its items, in any order of access
    reads = []
    real = token_file._read
    ds = TokenShardDataset(index)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(token_file, "_read", lambda p: reads.append(os.path.basename(p)) or real(p))
        got = [ds[i] for i in (0, 1, 1, 0, 2, 3)]
    assert reads == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert all(torch.equal(a, b) for g, i in zip(got, (0, 1, 1, 0, 2, 3)) for a, b in zip(g.ids, items[i][1].ids))

    os.unlink(folder / "shard-00002.safetensors")
    assert message(index, 4) == f"{folder / 'shard-00002.safetensors'}: shard listed in the index is missing"

    # damage that keeps the shard's sha256 right (the index rewritten with it): the item's own checks
    _rewrite_shard(folder, 0, lambda m, t: m.pop("v1"))
    assert message(index, 1) == "v1 in shard 0: the shard has no metadata for this item"
    _rewrite_shard(folder, 0, lambda m, t: m["v0"].update(num_bits="x"))
    assert message(index, 0) == "v0 in shard 0: metadata 'num_bits' is missing or not an integer ('x')"
    _rewrite_shard(folder, 1, lambda m, t: t.pop("1.level_2"))
    assert message(index, 3) == "v3 in shard 1: level 2 (1.level_2) is missing"
    _rewrite_shard(folder, 1, lambda m, t: t["0.level_1"].__setitem__((0, 0), t["0.level_1"][0, 0] ^ 1))
    assert message(index, 2) == "v2 in shard 1: checksum mismatch: the item's metadata or ids are corrupted"


def test_a_file_without_a_caption_key_reads_and_has_no_caption(tmp_path):
    """The caption is optional in the format: a writer that leaves the key out (the checksum then
    counts it as empty) gives a file both readers accept, with no captions."""
    tok = make_tokens(caption=None)
    meta = token_file._metadata(tok, None)
    del meta["caption"]
    planes = [token_file._planes(i, tok.num_bits) for i in tok.ids]
    # the documented checksum: sha256 over the metadata fields as sorted JSON (a missing one as "")
    # followed by every plane's bytes
    keys = ("format", "format_version", "num_bits", "bit_order", "grids", "latent_grid", "source", "model_id", "caption")
    h = hashlib.sha256(json.dumps({k: meta.get(k, "") for k in keys}, sort_keys=True).encode())
    for p in planes:
        h.update(p.numpy().tobytes())
    meta["checksum"] = h.hexdigest()
    path = tmp_path / "nocap.safetensors"
    path.write_bytes(save({f"level_{l}": p for l, p in enumerate(planes)}, metadata=meta))
    assert load_tokens(str(path)).captions is None
    assert read_token_metadata(str(path))["num_tokens"] == tok.num_tokens
    save_tokens(str(tmp_path / "plain.safetensors"), tok)
    assert load_tokens(str(tmp_path / "plain.safetensors")).captions is None
    written = _st_metadata(tmp_path / "plain.safetensors")
    assert written["caption"] == "" and written["checksum"] == h.hexdigest()
    # the source is stored with sorted keys whatever order the Tokens hold it in
    assert list(tok.source) == ["frames", "height", "width", "fps"]
    assert written["source"] == '{"fps": 25.0, "frames": 5, "height": 40, "width": 48}'
    with pytest.raises(ValueError) as err:
        save_tokens(str(tmp_path / "two.safetensors"), make_tokens(B=2))
    assert str(err.value) == ("tokens: a token file holds one video, got a batch of 2 (save tokens[i] per video, "
                              "or use write_token_shards)")


def test_read_token_metadata_names_the_file_in_every_error(tmp_path):
    path = tmp_path / "clip.safetensors"
    save_tokens(str(path), make_tokens())
    data = path.read_bytes()
    header_len, header = _header(data)

    def write(name, meta=None, drop=None, body=None):
        h = json.loads(json.dumps(header))
        h["__metadata__"].update(meta or {})
        if drop:
            h.pop(drop)
        raw = json.dumps(h, separators=(",", ":")).encode().ljust(header_len)
        assert len(raw) == header_len
        out = tmp_path / name
        out.write_bytes(data[:8] + raw + (data[8 + header_len:] if body is None else body))
        with pytest.raises(TokenFileError) as err:
            read_token_metadata(str(out))
        return str(err.value)

    assert write("v.safetensors", {"format_version": "9"}) == \
        f"{tmp_path / 'v.safetensors'}: token file format version '9'; this pyratok reads version 1"
    assert write("k.safetensors", {"num_bits": "0"}) == f"{tmp_path / 'k.safetensors'}: num_bits=0: token ids exist for 1..63 bits"
    assert write("l.safetensors", drop="level_1") == f"{tmp_path / 'l.safetensors'}: level 1 (level_1) is missing"
    flipped = bytearray(data[8 + header_len:])
    flipped[-1] ^= 1
    assert write("c.safetensors", body=bytes(flipped)) == f"{tmp_path / 'c.safetensors'}: checksum mismatch: the file is corrupted"

    # a file cut short after its header was read (another process truncating it): a clear error, no hang
    real = token_file._read_header

    def header_then_truncate(p):
        out = real(p)
        os.truncate(p, os.path.getsize(p) - 4)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(token_file, "_read_header", header_then_truncate)
        with pytest.raises(TokenFileError) as err:
            read_token_metadata(str(path))
    assert str(err.value) == f"{path}: truncated inside level 2"


def test_the_whole_file_reader_refuses_short_and_headerless_bytes(tmp_path):
    """token_file._read, the reader of a shard (after its sha256) and of a token file (after its
    header was checked), on its own: every refusal names the file and says what is wrong."""
    def message(name, data):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(TokenFileError) as err:
            token_file._read(str(tmp_path / name))
        return str(err.value).replace(str(tmp_path / name), "F")

    assert message("7", b"\x02" + b"\x00" * 6) == "F: truncated (7 bytes) or not a token file"
    assert message("8", b"\x02" + b"\x00" * 7) == "F: not a token file (no safetensors header)"
    assert message("long", (12).to_bytes(8, "little") + b"{}") == "F: truncated (header says 12 bytes, file has 2)"
    assert message("just", (4).to_bytes(8, "little") + b'{"a"') == \
        "F: truncated or corrupted token file (JSONDecodeError: Expecting ':' delimiter: line 1 column 5 (char 4))"
    empty = _raw(tmp_path / "empty", {"__metadata__": {"format": "x"}})            # the header fills the file
    meta, tensors = token_file._read(str(empty))
    assert meta == {"format": "x"} and tensors == {}
    with pytest.raises(TokenFileError) as err:
        token_file._read(str(tmp_path / "missing"))
    assert str(err.value) == f"{tmp_path / 'missing'}: no such token file"


def test_levels_of_the_wrong_shape_are_refused_by_name():
    tok = make_tokens(K=5)
    meta = token_file._metadata(tok, None)
    planes = [token_file._planes(i, 5) for i in tok.ids]
    assert token_file._tokens_from(meta, planes, "W").num_bits == 5
    for bad in (planes[1][:4], planes[1].to(torch.int16)):
        with pytest.raises(TokenFileError) as err:
            token_file._tokens_from(meta, [planes[0], bad, planes[2]], "W")
        assert str(err.value) == f"W: level 1 holds {tuple(bad.shape)} {bad.dtype}, expected (5, 2) uint8"


def _crafted(tmp_path, name, edit=None, planes=None, drop=None, tok=None) -> str:
    """A token file written by hand: save_tokens' metadata (checksum recomputed) through ``edit``,
    its planes replaced by ``planes`` or without the one named ``drop``."""
    tok = tok or make_tokens(K=17)
    meta = token_file._metadata(tok, "a clip")
    real = [token_file._planes(i, tok.num_bits) for i in tok.ids]
    meta["checksum"] = token_file._checksum(meta, real)
    for key, value in (edit or {}).items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    tensors = {f"level_{l}": p for l, p in enumerate(planes or real)}
    tensors.pop(drop, None)
    path = tmp_path / name
    path.write_bytes(save(tensors, metadata=meta))
    return str(path)


BIG = 1 << 17
REFUSALS = [                                     # (metadata edits, the message after "<path>: ")
    ({"format": "other"}, "not a pyratok token file (format='other')"),
    ({"format_version": "2"}, "token file format version '2'; this pyratok reads version 1"),
    ({"bit_order": "lsb-first"}, "unknown bit order 'lsb-first'"),
    ({"num_bits": "x"}, "metadata 'num_bits' is missing or not an integer ('x')"),
    ({"num_bits": None}, "metadata 'num_bits' is missing or not an integer (None)"),
    ({"num_bits": "64"}, "num_bits=64: token ids exist for 1..63 bits"),
    ({"num_bits": "0"}, "num_bits=0: token ids exist for 1..63 bits"),
    ({"grids": None}, "metadata 'grids' is missing"),
    ({"grids": "[[1, 2"}, "metadata 'grids' is not JSON (Expecting ',' delimiter: line 1 column 7 (char 6))"),
    ({"grids": "5"}, "metadata 'grids' must be a list of 1..64 [t, h, w] triples of positive integers, got 5"),
    ({"grids": "[]"}, "metadata 'grids' must be a list of 1..64 [t, h, w] triples of positive integers, got []"),
    ({"grids": json.dumps([[1, 1, 1]] * 65)},
     "metadata 'grids' must be a list of 1..64 [t, h, w] triples of positive integers, got "
     + json.dumps([[1, 1, 1]] * 65)[:120]),
    ({"grids": "[[1, 1, 0]]"},
     "metadata 'grids' must be a list of 1..64 [t, h, w] triples of positive integers, got [[1, 1, 0]]"),
    ({"grids": json.dumps([[1, 1, (1 << 34) + 1]])},
     f"metadata 'grids' must be a list of 1..64 [t, h, w] triples of positive integers, got [[1, 1, {(1 << 34) + 1}]]"),
    ({"grids": json.dumps([[1, BIG, BIG + 1]])}, "a level grid holds more than 17179869184 tokens"),
    ({"grids": json.dumps([[BIG + 1, BIG, 1]])}, "a level grid holds more than 17179869184 tokens"),
    ({"grids": json.dumps([[1, BIG, BIG]])}, "level 0 holds (17, 1) U8, expected (17, 2147483648) uint8"),
    ({"grids": json.dumps([[1, 1, 1 << 34]])}, "level 0 holds (17, 1) U8, expected (17, 2147483648) uint8"),
    ({"latent_grid": None}, "metadata 'latent_grid' is missing"),
    ({"latent_grid": "[2, 5]"}, "metadata 'latent_grid' must be a [t, h, w] triple of positive integers"),
    ({"source": "{"}, "metadata 'source' is not JSON (Expecting property name enclosed in double quotes: "
                      "line 1 column 2 (char 1))"),
    ({"source": "[1]"}, "metadata 'source' must be a JSON object, got list"),
    ({"model_id": None}, "metadata 'model_id' is missing"),
]


@pytest.mark.parametrize("edit,message", REFUSALS, ids=range(len(REFUSALS)))
def test_every_refusal_names_the_file_and_the_field(tmp_path, edit, message):
    path = _crafted(tmp_path, "bad.safetensors", edit)
    for reader in (load_tokens, read_token_metadata):
        with pytest.raises(TokenFileError) as err:
            reader(path)
        assert str(err.value) == f"{path}: {message}", reader.__name__


def test_header_and_plane_damage_is_named(tmp_path):
    def refused(path):
        messages = []
        for reader in (load_tokens, read_token_metadata):
            with pytest.raises(TokenFileError) as err:
                reader(str(path))
            messages.append(str(err.value).replace(str(path), "F"))
        assert messages[0] == messages[1]
        return messages[0]

    tok = make_tokens(K=17)
    planes = [token_file._planes(i, 17) for i in tok.ids]
    assert refused(_crafted(tmp_path, "m", drop="level_1")) == "F: level 1 (level_1) is missing"
    wide = _crafted(tmp_path, "w", planes=[planes[0], torch.zeros(17, 3, dtype=torch.uint8), planes[2]])
    assert refused(wide) == "F: level 1 holds (17, 3) U8, expected (17, 2) uint8"
    typed = _crafted(tmp_path, "t", planes=[planes[0], planes[1].to(torch.int16), planes[2]])
    assert refused(typed) == "F: level 1 holds (17, 2) I16, expected (17, 2) uint8"

    (tmp_path / "short").write_bytes(b"\x02" * 5)
    assert refused(tmp_path / "short") == "F: truncated (5 bytes) or not a token file"
    (tmp_path / "plain").write_bytes(b"\x02" + b"\x00" * 7 + b"[1, 2]")
    assert refused(tmp_path / "plain") == "F: not a token file (no safetensors header)"
    def raw(name, header, body=b""):
        return _raw(tmp_path / name, header, body)

    assert refused(raw("nometa", {})) == "F: not a pyratok token file (format=None)"          # header fills the file
    assert refused(raw("listmeta", {"__metadata__": ["x"]})) == "F: not a pyratok token file (format=None)"
    assert refused(raw("entry", {"level_0": 5})) == "F: corrupted entry 'level_0' in the token file header"
    assert refused(raw("offsets", {"level_0": {"dtype": "U8", "shape": [1], "data_offsets": ["0", "x"]}})) == \
        "F: corrupted entry 'level_0' in the token file header"
    assert refused(raw("past", {"level_0": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}, b"x")) == \
        "F: truncated (level_0 lies past the end of the file)"
    (tmp_path / "empty").write_bytes(save({"e": torch.zeros(0)}))                             # an empty tensor is fine
    assert refused(tmp_path / "empty") == "F: not a pyratok token file (format=None)"
    (tmp_path / "json").write_bytes((6).to_bytes(8, "little") + b'{"a" }')
    assert refused(tmp_path / "json") == "F: corrupted token file header (Expecting ':' delimiter: line 1 column 6 (char 5))"
    (tmp_path / "long").write_bytes((40).to_bytes(8, "little") + b"{" + b" " * 30)
    assert refused(tmp_path / "long") == "F: truncated (header says 40 bytes, file has 31)"
    (tmp_path / "over").write_bytes((35).to_bytes(8, "little") + b"{" + b" " * 30)   # within 8 bytes of the size
    assert refused(tmp_path / "over") == "F: truncated (header says 35 bytes, file has 31)"
    good = tmp_path / "good.safetensors"
    save_tokens(str(good), tok)
    (tmp_path / "cut").write_bytes(good.read_bytes()[:-4])
    assert refused(tmp_path / "cut") == "F: truncated (level_2 lies past the end of the file)"


@pytest.mark.parametrize("levels", [1, 64])
def test_one_level_and_the_most_levels_round_trip(tmp_path, levels):
    grids = [(1, 1, 2)] * levels
    tok = Tokens([torch.full((1, 1, 1, 2), l % 2, dtype=torch.int32) for l in range(levels)], 1, grids, (1, 1, 2))
    save_tokens(str(tmp_path / "t.safetensors"), tok)
    back = load_tokens(str(tmp_path / "t.safetensors"))
    assert back.grids == grids and all(torch.equal(a, b) for a, b in zip(back.ids, tok.ids))
    meta = read_token_metadata(str(tmp_path / "t.safetensors"))
    assert meta["grids"] == [list(g) for g in grids] and meta["latent_grid"] == [1, 1, 2] and meta["source"] == {}


def test_readers_never_read_a_file_whole_to_check_it(tmp_path, monkeypatch):
    """read_token_metadata reads a header and then the planes in bounded blocks: every read() has a
    size, so a huge or hostile file costs at most its header plus one block."""
    path = tmp_path / "clip.safetensors"
    save_tokens(str(path), make_tokens())
    sizes = []

    class Counted:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            sizes.append(n)
            return self.f.read(n)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(token_file, "open", lambda *a, **k: Counted(open(*a, **k)), raising=False)
    assert read_token_metadata(str(path))["num_bits"] == 17
    assert sizes and all(isinstance(n, int) and 0 < n <= 1 << 22 for n in sizes), sizes
