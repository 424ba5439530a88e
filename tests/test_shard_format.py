"""The token shard format's building blocks (pyratok.io.shards) on their own: the bytes a shard, a
record and a sample hold are fixed (golden digests), and every reader refusal names the file and
what is wrong.  test_tokenize.py checks the same format end to end through `pyratok tokenize`."""

import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pytest

from pyratok.io import shards
from pyratok.io.shards import ShardError


def _sample(key: str, levels=2, caption="a cat", meta=None):
    ids = [np.arange(4 * (l + 1), dtype=np.uint16).reshape(1, l + 1, 4) for l in range(levels)]
    return shards.sample_files(key, ids, caption, meta or {"key": key, "num_bits": 16, "note": "é"})


def _tar(path, members):
    """A plain tar of (name, bytes) written by the tarfile module (not by write_shard)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_a_shard_is_the_same_bytes_everywhere(tmp_path):
    samples = [_sample("00000000-000000"), _sample("00000000-000001", caption="")]
    sha, size = shards.write_shard(str(tmp_path / "s.tar"), samples)
    blob = (tmp_path / "s.tar").read_bytes()
    assert (sha, size) == (hashlib.sha256(blob).hexdigest(), len(blob)) and size == 10240
    with tarfile.open(tmp_path / "s.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [n for s in samples for n, _ in s]
    assert {(m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0o644, 0, 0, "", "")}
    assert blob[257:265] == b"ustar\x0000"                      # POSIX USTAR headers, not GNU or PAX
    assert sha == "0256eed68808b61e8be836b7d3ae05bda466fc6c190620a0169f533b071df876"
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".partial")]


def test_sample_fields_are_canonical_json_text_and_plain_npy():
    files = dict(_sample("k"))
    assert list(files) == ["k.json", "k.txt", "k.level0.npy", "k.level1.npy"]
    assert files["k.json"] == b'{"key":"k","note":"\\u00e9","num_bits":16}'
    assert shards.canonical_json({"b": [1, {"d": 2, "c": 3}], "a": None}) == b'{"a":null,"b":[1,{"c":3,"d":2}]}'
    assert files["k.txt"] == b"a cat"
    level1 = np.load(io.BytesIO(files["k.level1.npy"]), allow_pickle=False)
    assert level1.dtype == np.uint16 and level1.shape == (1, 2, 4) and level1.ravel().tolist() == list(range(8))
    assert hashlib.sha256(files["k.level0.npy"]).hexdigest() == "6fcdcd4ffca1b7ad0ec44aeb37d71cfaa0042d64b1794ad66354197abf3bcb1e"


@pytest.mark.parametrize("K,dtype", [(1, np.uint8), (8, np.uint8), (9, np.uint16), (16, np.uint16), (17, np.uint32),
                                     (32, np.uint32), (33, np.uint64), (64, np.uint64)])
def test_ids_take_the_smallest_unsigned_type(K, dtype):
    assert shards.ids_dtype(K) == np.dtype(dtype)


def test_ids_past_64_bits_are_refused():
    with pytest.raises(ValueError) as err:
        shards.ids_dtype(65)
    assert str(err.value) == "num_bits=65: token ids have at most 64 bits"


def test_json_records_and_partial_names(tmp_path, monkeypatch):
    assert shards.partial_path("/data/out/shard-000001.tar") == "/data/out/.shard-000001.tar.partial"
    assert shards.partial_path("/data/out/index.json", "-rank1") == "/data/out/.index.json-rank1.partial"
    renamed = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: renamed.append((os.path.basename(a), os.path.basename(b))) or real(a, b))
    shards.write_json(str(tmp_path / "r.json"), {"b": 1, "a": [1, "é"]})
    shards.write_json(str(tmp_path / "t.json"), {}, tag="-rank3")
    assert renamed == [(".r.json.partial", "r.json"), (".t.json-rank3.partial", "t.json")]
    assert (tmp_path / "r.json").read_bytes() == b'{\n "a": [\n  1,\n  "\\u00e9"\n ],\n "b": 1\n}\n'


def test_an_index_is_found_from_its_folder_or_its_file_and_foreign_ones_are_named(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    index = {"format": "pyratok-token-shards", "format_version": 1, "shards": []}
    (folder / "index.json").write_text(json.dumps(index))
    assert shards.read_index(str(folder)) == (str(folder), index)
    assert shards.read_index(str(folder / "index.json")) == (str(folder), index)
    assert shards.read_index(os.path.relpath(folder / "index.json")) == (os.path.dirname(str(folder / "x")), index)

    (folder / "copy.json").write_text(json.dumps({**index, "note": "a renamed copy"}))       # any index file name
    assert shards.read_index(str(folder / "copy.json"))[1]["note"] == "a renamed copy"
    (folder / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(index).encode())      # saved by an editor with a BOM
    assert shards.read_index(str(folder / "bom.json"))[1] == index

    def message(path):
        with pytest.raises(ShardError) as err:
            shards.read_index(str(path))
        return str(err.value)

    (folder / "index.json").write_text(json.dumps({**index, "format": "webdataset"}))
    assert message(folder) == f"{folder / 'index.json'}: not a pyratok token shard index (format='webdataset')"
    (folder / "index.json").write_text(json.dumps({**index, "format_version": 2}))
    assert message(folder) == f"{folder / 'index.json'}: token shard format version 2; this pyratok reads version 1"
    (folder / "index.json").write_text(json.dumps({**index, "shards": {}}))
    assert message(folder) == f"{folder / 'index.json'}: 'shards' is missing or not a list"
    (folder / "index.json").write_text("[1]")
    assert message(folder) == f"{folder / 'index.json'}: not a token shard index (a JSON list, expected an object)"
    (folder / "index.json").write_text("{")
    assert message(folder).startswith(f"{folder / 'index.json'}: not a token shard index (Expecting")
    os.unlink(folder / "index.json")
    assert message(folder / "index.json") == f"{folder / 'index.json'}: no such token shard index"
    (folder / "tokenize.json").write_text("{}")
    assert message(folder) == (f"{folder}: the tokenize run is not finished (no index.json); run the same command "
                               "again to complete it")


def test_samples_are_read_whole_and_incomplete_ones_are_named(tmp_path):
    ok = _sample("a") + _sample("b", caption="") + [("b.flow.npy", b"ignored")]
    got = list(shards.read_samples(_tar(tmp_path / "ok.tar", ok)))
    assert [s["key"] for s in got] == ["a", "b"] and [s["caption"] for s in got] == ["a cat", ""]
    assert [a.shape for a in got[1]["ids"]] == [(1, 1, 4), (1, 2, 4)] and got[0]["meta"]["num_bits"] == 16
    no_text = [f for f in _sample("c") if not f[0].endswith(".txt")]
    assert list(shards.read_samples(_tar(tmp_path / "nt.tar", no_text)))[0]["caption"] == ""

    def message(name, members):
        with pytest.raises(ShardError) as err:
            list(shards.read_samples(_tar(tmp_path / name, members)))
        return str(err.value).replace(str(tmp_path / name), "F")

    no_json = [f for f in _sample("a") if not f[0].endswith(".json")] + _sample("b")
    assert message("nj.tar", no_json) == "F: sample 'a' is incomplete (no json or a missing level)"
    gap = [f for f in _sample("a", levels=3) if not f[0].endswith("level1.npy")]
    assert message("gap.tar", gap) == "F: sample 'a' is incomplete (no json or a missing level)"
    first = [f for f in _sample("a") if not f[0].endswith("level0.npy")]
    assert message("first.tar", _sample("z") + first) == "F: sample 'a' is incomplete (no json or a missing level)"
    no_levels = [f for f in _sample("a") if not f[0].endswith(".npy")]
    assert message("nl.tar", no_levels) == "F: sample 'a' is incomplete (no json or a missing level)"
    # an object array would need unpickling: refused like any damage, nothing is unpickled
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    pickled = [(n, buf.getvalue() if n.endswith("level0.npy") else d) for n, d in _sample("a")]
    assert message("pk.tar", pickled) == ("F: damaged shard (ValueError: Object arrays cannot be loaded when "
                                          "allow_pickle=False)")
    blob = open(_tar(tmp_path / "whole.tar", _sample("a")), "rb").read()
    (tmp_path / "cut.tar").write_bytes(blob[:700])
    with pytest.raises(ShardError) as err:
        list(shards.read_samples(str(tmp_path / "cut.tar")))
    assert str(err.value).startswith(f"{tmp_path / 'cut.tar'}: damaged shard (ReadError: ")


def test_summary_counts_every_record():
    index = {"num_bits": 16, "shards": [
        {"clips": 3, "tokens": 30, "pixels": 3000, "bytes": 100, "videos": 2, "skipped": ["x"]},
        {"clips": 0, "tokens": 0, "pixels": 0, "bytes": 0, "videos": 1, "skipped": ["y", "z"]}]}
    s = shards.summarize(index)
    assert (s.shards, s.clips, s.tokens, s.pixels, s.bytes, s.videos, s.videos_skipped, s.num_bits) == \
        (2, 3, 30, 3000, 100, 3, 3, 16)
    assert s.bits_per_pixel == 16 * 30 / 3000
    assert shards.summarize({"num_bits": 8, "shards": []}).bits_per_pixel == 0.0


@pytest.mark.parametrize("K,dtype", [(16, "int32"), (31, "int32"), (32, "int64"), (40, "int64")])
def test_to_tokens_takes_the_id_type_of_K_and_the_first_clips_source(K, dtype):
    import torch

    grids = [[1, 1, 1], [1, 2, 2]]
    samples = [{"ids": [torch.full(tuple(g), v, dtype=torch.int64) for g in grids], "caption": f"c{v}", "key": str(v),
                "meta": {"num_bits": K, "grids": grids, "latent_grid": [1, 4, 4], "model_id": "m", "frames": 5,
                         "height": 32, "width": 32, "fps": fps}} for v, fps in ((3, 25.0), (5, 30.0))]
    tokens = shards.to_tokens(shards.collate_tokens(samples))
    assert [i.dtype for i in tokens.ids] == [getattr(torch, dtype)] * 2
    assert tokens.ids[1][:, 0, 0, 0].tolist() == [3, 5] and tokens.captions == ["c3", "c5"]
    assert tokens.source == {"frames": 5, "height": 32, "width": 32, "fps": 25.0}
    assert (tokens.num_bits, tokens.grids, tokens.latent_grid, tokens.model_id) == (K, [(1, 1, 1), (1, 2, 2)], (1, 4, 4), "m")
