"""pyratok.tokens.Tokens on its own: every validation rule at its boundary, the derived figures,
indexing and device moves (mutation testing of pyratok/tokens.py found these unchecked)."""

import pytest
import torch

from pyratok.tokens import Tokens

GRIDS = [(1, 1, 2), (1, 2, 4)]


def ids(B=2, dtype=torch.int32, grids=GRIDS, start=0):
    return [torch.arange(start, start + B * t * h * w, dtype=dtype).reshape(B, t, h, w) for t, h, w in grids]


def tokens(B=2, K=12, **kw):
    return Tokens(ids(B, torch.int32 if K <= 31 else torch.int64), K, GRIDS, (1, 2, 4), **kw)


def test_num_bits_from_1_to_63_and_the_id_dtype_switch_at_32():
    for K in (1, 31):
        assert Tokens(ids(dtype=torch.int32), K, GRIDS, (1, 2, 4)).num_bits == K
    for K in (32, 63):
        assert Tokens(ids(dtype=torch.int64), K, GRIDS, (1, 2, 4)).num_bits == K
    for K in (0, 64, -1):
        with pytest.raises(ValueError, match=f"num_bits={K}: token ids exist for 1..63 bits"):
            Tokens(ids(dtype=torch.int64), K, GRIDS, (1, 2, 4))
    with pytest.raises(ValueError, match=r"ids\[0\]: expected torch.int32 for K=31, got torch.int64"):
        Tokens(ids(dtype=torch.int64), 31, GRIDS, (1, 2, 4))
    with pytest.raises(ValueError, match=r"ids\[0\]: expected torch.int64 for K=32, got torch.int32"):
        Tokens(ids(dtype=torch.int32), 32, GRIDS, (1, 2, 4))
    bad_last = ids()
    bad_last[1] = bad_last[1].long()
    with pytest.raises(ValueError, match=r"ids\[1\]: expected torch.int32"):
        Tokens(bad_last, 12, GRIDS, (1, 2, 4))


def test_levels_shapes_and_batch():
    with pytest.raises(ValueError, match="ids: 0 levels but 0 grids"):
        Tokens([], 12, [], (1, 2, 4))
    with pytest.raises(ValueError, match="ids: 1 levels but 2 grids"):
        Tokens(ids()[:1], 12, GRIDS, (1, 2, 4))
    with pytest.raises(ValueError, match=r"ids\[1\]: expected shape \(2, 1, 2, 4\), got \(2, 1, 4, 2\)"):
        Tokens([ids()[0], ids()[1].reshape(2, 1, 4, 2)], 12, GRIDS, (1, 2, 4))
    with pytest.raises(ValueError, match=r"ids\[1\]: expected shape \(2, 1, 2, 4\), got \(3, 1, 2, 4\)"):
        Tokens([ids()[0], ids(B=3)[1]], 12, GRIDS, (1, 2, 4))                     # batch differs between levels
    with pytest.raises(ValueError, match=r"ids\[0\]: expected shape \(-1, 1, 1, 2\), got \(1, 2\)"):
        Tokens([ids()[0][0, 0], ids()[1]], 12, GRIDS, (1, 2, 4))                  # not 4-d
    with pytest.raises(ValueError, match="captions: 1 captions for a batch of 2"):
        tokens(captions=["one"])
    tok = Tokens(ids(), 12, [[1, 1, 2], [1, 2, 4]], [1, 2, 4])
    assert tok.grids == [(1, 1, 2), (1, 2, 4)] and tok.latent_grid == (1, 2, 4)      # lists become tuples
    assert all(type(v) is int for g in tok.grids for v in g)
    assert tok.levels == 2 and tok.batch_size == 2 and tok.num_tokens == 2 + 8
    assert tok.source == {} and tok.model_id == "" and tok.captions is None


def test_bits_per_pixel():
    tok = tokens(source={"frames": 5, "height": 16, "width": 32})
    assert tok.bits_per_pixel() == 12 * 10 / (5 * 16 * 32)
    for missing in ("frames", "height", "width"):
        src = {"frames": 5, "height": 16, "width": 32}
        del src[missing]
        with pytest.raises(ValueError, match="^source: frames, height and width are needed for bits per pixel$"):
            tokens(source=src).bits_per_pixel()


def test_indexing_and_to():
    tok = tokens(B=3, captions=["a", "b", "c"], model_id="m", source={"fps": 5.0})
    for index, row in ((0, 0), (2, 2), (-1, 2), (-3, 0)):
        one = tok[index]
        assert one.batch_size == 1 and one.captions == [tok.captions[row]]
        assert all(torch.equal(a, b[row:row + 1]) for a, b in zip(one.ids, tok.ids))
        assert (one.num_bits, one.grids, one.model_id, one.source) == (12, tok.grids, "m", {"fps": 5.0})
    for index in (3, -4):
        with pytest.raises(IndexError, match=f"index {index} out of range for a batch of 3"):
            tok[index]
    assert tokens(B=2)[1].captions is None
    moved = tok.to("cpu")
    assert moved is not tok and all(torch.equal(a, b) for a, b in zip(moved.ids, tok.ids))
    assert moved.captions == tok.captions and moved.model_id == "m"
    meta = torch.device("meta")
    assert all(i.device == meta for i in tok.to(meta).ids) and all(i.device.type == "cpu" for i in tok.ids)
