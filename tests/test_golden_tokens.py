"""The on-disk token format cannot drift silently: tests/data/golden_tokens.safetensors (written
once by this version of the format) must load to known ids, and saving the same tokens today must
give the same metadata fields and the same bit-packed planes.  (safetensors writes its metadata
map in no fixed order, so the file's bytes are compared through its parsed header and tensors.)"""

import os

import torch
from safetensors import safe_open

from pyratok.io import load_tokens, save_tokens
from pyratok.tokens import Tokens

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden_tokens.safetensors")
IDS = [[175, 1220], [537, 2550, 1603, 211, 919, 1639, 1372, 3257],
       [3470, 2583, 3656, 345, 366, 2602, 2778, 904, 3239, 2022, 1092, 1456, 1919, 391, 2988, 3584, 1099, 2871,
        2298, 3078, 3859, 3516, 3116, 3775, 1349, 3896, 1176, 183, 2997, 3184, 763, 3261]]
GRIDS = [(2, 1, 1), (2, 2, 2), (2, 4, 4)]


def golden_tokens() -> Tokens:
    ids = [torch.tensor(v, dtype=torch.int32).view(1, *g) for v, g in zip(IDS, GRIDS)]
    return Tokens(ids, 12, GRIDS, (2, 4, 4), {"frames": 5, "height": 32, "width": 32}, "golden-model-0001",
                  ["a golden clip"])


def contents(path):
    with safe_open(path, "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def test_the_golden_file_loads_to_known_tokens():
    tokens = load_tokens(GOLDEN)
    assert tokens.num_bits == 12 and list(tokens.grids) == GRIDS and tokens.latent_grid == (2, 4, 4)
    assert [i.flatten().tolist() for i in tokens.ids] == IDS
    assert tokens.model_id == "golden-model-0001" and tokens.captions == ["a golden clip"]
    meta, planes = contents(GOLDEN)
    assert meta["format"] == "pyratok-tokens" and meta["format_version"] == "1" and meta["bit_order"] == "msb-first"
    # bit planes: plane k holds bit k (MSB first) of every position, 8 positions a byte in
    # numpy.packbits order.  Level 0's ids 175 = 0000 1010 1111 and 1220 = 0100 1100 0100:
    assert planes["level_0"].shape == (12, 1)
    assert planes["level_0"].flatten().tolist() == [0b00, 0b01 << 6, 0, 0, 0b11 << 6, 0b01 << 6, 0b10 << 6, 0,
                                                    0b10 << 6, 0b11 << 6, 0b10 << 6, 0b10 << 6]


def test_saving_today_writes_the_golden_format(tmp_path):
    save_tokens(str(tmp_path / "t.safetensors"), golden_tokens())
    want_meta, want_planes = contents(GOLDEN)
    got_meta, got_planes = contents(str(tmp_path / "t.safetensors"))
    assert got_meta == want_meta
    assert got_planes.keys() == want_planes.keys()
    for k in want_planes:
        assert got_planes[k].dtype == want_planes[k].dtype and torch.equal(got_planes[k], want_planes[k]), k
