"""Token files: round trip, corruption / truncation / foreign-file detection, shards."""

import json
import os

import numpy as np
import pytest
import torch

from pyratok.io import TokenFileError, TokenShardDataset, load_tokens, read_token_metadata, save_tokens, write_token_shards
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
