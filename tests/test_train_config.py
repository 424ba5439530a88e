"""The training config (pyratok/train/config.py): every field's accepted range at its bounds, the
exact error one step outside, the stage's loss weights, path resolution and the TOML round trip."""

import dataclasses

import pytest

from pyratok.models.losses import LossConfig
from pyratok.train import TrainConfig
from pyratok.train.config import STAGES

BASE = {"data": {"source": "/v"}, "train": {"out_dir": "/r"}}


def config(section=None, key=None, value=None, **tables) -> TrainConfig:
    d = {name: dict(table) for name, table in BASE.items()}
    for name, table in tables.items():
        d.setdefault(name, {}).update(table)
    if section is not None:
        d.setdefault(section, {})[key] = value
    return TrainConfig.from_dict(d)


def error(*args, **kwargs) -> str:
    with pytest.raises(ValueError) as err:
        config(*args, **kwargs)
    return str(err.value)


ACCEPTED = [
    ("train", "steps", 1), ("train", "steps", 10 ** 9),
    ("train", "batch_size", 1), ("train", "batch_size", 4096),
    ("train", "grad_accum", 1), ("train", "grad_accum", 4096),
    ("train", "checkpoint_every", 1), ("train", "log_every", 1),
    ("train", "warmup", 0), ("train", "warmup", 10 ** 9),
    ("train", "seed", 0), ("train", "seed", 2 ** 63 - 1),
    ("train", "lr", 1.0), ("train", "lr", 1e-12), ("train", "lr", 1),
    ("train", "weight_decay", 0.0), ("train", "weight_decay", 1000.0),
    ("train", "min_lr_ratio", 0.0), ("train", "min_lr_ratio", 1.0),
    ("train", "clip_grad", 0.0), ("train", "clip_grad", 1e12),
    ("train", "ema", 0.0), ("train", "ema", 0.9999),
    ("train", "betas", [0.0, 0.999]), ("train", "betas", [0, 0.5]),
    ("train", "amp", "bf16"), ("train", "amp", "fp16"), ("train", "amp", "none"),
    ("train", "cpu_amp", "bf16"), ("train", "cpu_amp", "none"),
    ("train", "distributed", "ddp"), ("train", "distributed", "fsdp"),
    ("train", "stage", 0), ("train", "stage", 3),
    ("model", "preset", "tiny"), ("model", "preset", "paper"),
    ("data", "num_frames", 1), ("data", "num_frames", 5), ("data", "num_frames", 4097),
    ("data", "height", 8), ("data", "height", 8192), ("data", "width", 8), ("data", "width", 8192),
    ("data", "resize", 0), ("data", "resize", 8192),
    ("data", "fps", 0.0), ("data", "fps", 1000.0), ("data", "fps", 24),
    ("data", "num_workers", 0), ("data", "num_workers", 256),
    ("data", "crop", "random"), ("data", "crop", "center"),
    ("data", "buckets", [[8, 8], [8192, 16]]),
]


@pytest.mark.parametrize("section,key,value", ACCEPTED)
def test_values_at_the_bounds_are_accepted(section, key, value):
    assert getattr(getattr(config(section, key, value), section), key) == value


REFUSED = [
    # the <1 checks name the minimum; the range checks both bounds
    ("train", "steps", 0, "train.steps=0: expected >= 1"),
    ("train", "steps", 10 ** 9 + 1, "train.steps=1000000001: expected 1 <= steps <= 1000000000"),
    ("train", "batch_size", 0, "train.batch_size=0: expected >= 1"),
    ("train", "batch_size", 4097, "train.batch_size=4097: expected 1 <= batch_size <= 4096"),
    ("train", "grad_accum", 0, "train.grad_accum=0: expected >= 1"),
    ("train", "grad_accum", 4097, "train.grad_accum=4097: expected 1 <= grad_accum <= 4096"),
    ("train", "checkpoint_every", 0, "train.checkpoint_every=0: expected >= 1"),
    ("train", "log_every", 0, "train.log_every=0: expected >= 1"),
    ("train", "warmup", -1, "train.warmup=-1: expected 0 <= warmup <= 1000000000"),
    ("train", "warmup", 10 ** 9 + 1, "train.warmup=1000000001: expected 0 <= warmup <= 1000000000"),
    ("train", "seed", -1, "train.seed=-1: expected 0 <= seed <= 9223372036854775807"),
    ("train", "seed", 2 ** 63, "train.seed=9223372036854775808: expected 0 <= seed <= 9223372036854775807"),
    ("train", "lr", 0.0, "train.lr=0.0: expected 0.0 < lr <= 1.0"),
    ("train", "lr", 1.5, "train.lr=1.5: expected 0.0 < lr <= 1.0"),
    ("train", "lr", float("nan"), "train.lr=nan: expected 0.0 < lr <= 1.0"),
    ("train", "lr", float("inf"), "train.lr=inf: expected 0.0 < lr <= 1.0"),
    ("train", "weight_decay", -0.5, "train.weight_decay=-0.5: expected 0.0 <= weight_decay <= 1000.0"),
    ("train", "weight_decay", 1000.5, "train.weight_decay=1000.5: expected 0.0 <= weight_decay <= 1000.0"),
    ("train", "min_lr_ratio", -0.5, "train.min_lr_ratio=-0.5: expected 0.0 <= min_lr_ratio <= 1.0"),
    ("train", "min_lr_ratio", 1.5, "train.min_lr_ratio=1.5: expected 0.0 <= min_lr_ratio <= 1.0"),
    ("train", "clip_grad", -0.5, "train.clip_grad=-0.5: expected 0.0 <= clip_grad <= 1000000000000.0"),
    ("train", "clip_grad", 2e12, "train.clip_grad=2000000000000.0: expected 0.0 <= clip_grad <= 1000000000000.0"),
    ("train", "ema", 1.0, "train.ema=1.0: expected 0.0 <= ema < 1.0"),
    ("train", "ema", -0.5, "train.ema=-0.5: expected 0.0 <= ema < 1.0"),
    ("train", "betas", [0.9], "train.betas=[0.9]: expected two numbers [beta1, beta2]"),
    ("train", "betas", [0.9, 0.99, 0.999], "train.betas=[0.9, 0.99, 0.999]: expected two numbers [beta1, beta2]"),
    ("train", "betas", [0.9, "x"], "train.betas[1]='x': expected a number"),
    ("train", "betas", [True, 0.9], "train.betas[0]=True: expected a number"),
    ("train", "betas", [0.9, 1.0], "train.betas[1]=1.0: expected 0.0 <= betas[1] < 1.0"),
    ("train", "betas", [-0.5, 0.9], "train.betas[0]=-0.5: expected 0.0 <= betas[0] < 1.0"),
    ("train", "amp", "fp8", "train.amp='fp8': expected 'bf16', 'fp16' or 'none'"),
    ("train", "cpu_amp", "fp16", "train.cpu_amp='fp16': expected 'bf16' or 'none'"),
    ("train", "distributed", "deepspeed", "train.distributed='deepspeed': expected 'ddp' or 'fsdp'"),
    ("train", "stage", 4, "train.stage=4: expected one of [0, 1, 2, 3]"),
    ("train", "stage", -1, "train.stage=-1: expected one of [0, 1, 2, 3]"),
    ("model", "preset", "big", "model.preset='big': expected 'tiny' or 'paper'"),
    ("data", "num_frames", 0, "data.num_frames=0: clips have 1 + 4k frames (1, 5, 9, 17, 33, ...)"),
    ("data", "num_frames", 6, "data.num_frames=6: clips have 1 + 4k frames (1, 5, 9, 17, 33, ...)"),
    ("data", "num_frames", 4101, "data.num_frames=4101: expected 1 <= num_frames <= 4097"),
    ("data", "height", 0, "data.height=0: expected 8 <= height <= 8192"),
    ("data", "height", 12, "data.height=12: expected a multiple of 8"),
    ("data", "height", 8200, "data.height=8200: expected 8 <= height <= 8192"),
    ("data", "width", 4, "data.width=4: expected 8 <= width <= 8192"),
    ("data", "width", 20, "data.width=20: expected a multiple of 8"),
    ("data", "width", 8200, "data.width=8200: expected 8 <= width <= 8192"),
    ("data", "resize", -1, "data.resize=-1: expected 0 <= resize <= 8192"),
    ("data", "resize", 8193, "data.resize=8193: expected 0 <= resize <= 8192"),
    ("data", "fps", -1.0, "data.fps=-1.0: expected 0.0 <= fps <= 1000.0"),
    ("data", "fps", 1000.5, "data.fps=1000.5: expected 0.0 <= fps <= 1000.0"),
    ("data", "num_workers", -1, "data.num_workers=-1: expected 0 <= num_workers <= 256"),
    ("data", "num_workers", 257, "data.num_workers=257: expected 0 <= num_workers <= 256"),
    ("data", "crop", "middle", "data.crop='middle': expected 'random' or 'center'"),
    ("data", "buckets", [[8]], "data.buckets: [8] is not a [height, width] pair of multiples of 8 in 8..8192"),
    ("data", "buckets", [[8, 8, 8]], "data.buckets: [8, 8, 8] is not a [height, width] pair of multiples of 8 in 8..8192"),
    ("data", "buckets", [[8, 12]], "data.buckets: [8, 12] is not a [height, width] pair of multiples of 8 in 8..8192"),
    ("data", "buckets", [[0, 8]], "data.buckets: [0, 8] is not a [height, width] pair of multiples of 8 in 8..8192"),
    ("data", "buckets", [[8, 8200]], "data.buckets: [8, 8200] is not a [height, width] pair of multiples of 8 in 8..8192"),
    ("data", "buckets", [[True, 8]], "data.buckets: [True, 8] is not a [height, width] pair of multiples of 8 in 8..8192"),
    ("data", "buckets", [[8.0, 8]], "data.buckets: [8.0, 8] is not a [height, width] pair of multiples of 8 in 8..8192"),
    ("data", "buckets", [[8, 8], 16], "data.buckets: 16 is not a [height, width] pair of multiples of 8 in 8..8192"),
    # types: each key has its default's type (an int where a float is expected is fine)
    ("train", "steps", "2", "train.steps='2': expected an integer, got str"),
    ("train", "steps", 2.0, "train.steps=2.0: expected an integer, got float"),
    ("train", "steps", True, "train.steps=True: expected an integer, got bool"),
    ("train", "lr", True, "train.lr=True: expected a number, got bool"),
    ("train", "lr", "1e-4", "train.lr='1e-4': expected a number, got str"),
    ("train", "progress", 1, "train.progress=1: expected true or false, got int"),
    ("train", "betas", "0.9", "train.betas='0.9': expected a list, got str"),
    ("model", "preset", 3, "model.preset=3: expected a string, got int"),
    ("data", "buckets", {"a": 1}, "data.buckets={'a': 1}: expected a list, got dict"),
]


@pytest.mark.parametrize("section,key,value,message", REFUSED, ids=[f"{s}.{k}={v!r}" for s, k, v, _ in REFUSED])
def test_each_value_out_of_range_is_one_exact_error(section, key, value, message):
    assert error(section, key, value) == message


def test_required_keys_and_the_table_structure():
    with pytest.raises(ValueError) as err:
        TrainConfig.from_dict({"train": {"out_dir": "/r"}})
    assert str(err.value) == "data.source: required (a folder of videos or a manifest)"
    with pytest.raises(ValueError) as err:
        TrainConfig.from_dict({"data": {"source": "/v"}})
    assert str(err.value) == "train.out_dir: required"
    with pytest.raises(ValueError) as err:
        TrainConfig.from_dict({**BASE, "extra": {}, "more": {}})
    assert str(err.value) == "config: unknown tables ['extra', 'more']; expected [model], [data], [train], [loss]"
    with pytest.raises(ValueError) as err:
        TrainConfig.from_dict({**BASE, "model": ["tiny"]})
    assert str(err.value) == "config: [model] must be a table, got list"
    with pytest.raises(ValueError) as err:
        TrainConfig.from_dict({"data": {"source": "/v", "fps": 1, "sauce": 2}, "train": {"out_dir": "/r"}})
    names = sorted(f.name for f in dataclasses.fields(type(TrainConfig.from_dict(BASE).data)))
    assert str(err.value) == f"config: unknown keys in [data]: ['sauce']; known: {names}"
    with pytest.raises(ValueError) as err:
        TrainConfig.from_dict({**BASE, "loss": [1]})
    assert str(err.value) == "config: [loss] must be a table of LossConfig weights"


def test_relative_paths_resolve_against_the_config_folder():
    d = {"model": {"pretrained": "m", "backbone_path": "../b", "lpips": "/abs/vgg.pth", "text_encoder": "enc"},
         "data": {"source": "videos/"}, "train": {"out_dir": "run"}}
    cfg = TrainConfig.from_dict(d, "/base/cfg")
    assert (cfg.model.pretrained, cfg.model.backbone_path, cfg.model.lpips) == ("/base/cfg/m", "/base/b", "/abs/vgg.pth")
    assert (cfg.data.source, cfg.train.out_dir) == ("/base/cfg/videos", "/base/cfg/run")
    assert cfg.model.text_encoder == "enc"                       # a name or "none", not a path here
    assert d["data"]["source"] == "videos/"                       # the caller's dict is left alone
    assert TrainConfig.from_dict(BASE, "/base").model.pretrained == ""   # empty stays empty
    assert TrainConfig.from_dict({"data": {"source": "v"}, "train": {"out_dir": "r"}}).data.source == "v"


def test_from_file_reads_toml_relative_to_its_folder(tmp_path):
    path = tmp_path / "sub" / "t.toml"
    path.parent.mkdir()
    path.write_text('[data]\nsource = "clips"\nnum_frames = 9\n[train]\nout_dir = "out"\nlr = 1\n[loss]\nentropy = 0.5\n')
    cfg = TrainConfig.from_file(str(path))
    assert cfg.data.source == str(tmp_path / "sub" / "clips") and cfg.train.out_dir == str(tmp_path / "sub" / "out")
    assert cfg.data.num_frames == 9 and cfg.train.lr == 1 and cfg.loss == {"entropy": 0.5}
    with pytest.raises(FileNotFoundError) as err:
        TrainConfig.from_file(str(tmp_path / "none.toml"))
    assert str(err.value) == f"config: no such file {tmp_path / 'none.toml'}"
    path.write_text("[train\n")
    with pytest.raises(ValueError, match=r"^config: .*t\.toml is not valid TOML \(.+\)$"):
        TrainConfig.from_file(str(path))


def test_to_dict_round_trips():
    cfg = config(train={"stage": 2, "betas": [0.8, 0.9], "ema": 0.99}, data={"buckets": [[16, 24]]},
                 loss={"entropy": 0.3})
    d = cfg.to_dict()
    assert d["train"]["stage"] == 2 and d["data"]["buckets"] == [[16, 24]] and d["loss"] == {"entropy": 0.3}
    assert TrainConfig.from_dict(d) == cfg


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_the_stage_sets_every_loss_weight_and_loss_overrides_single_ones(stage):
    want = dataclasses.asdict(LossConfig())
    want.update(STAGES[stage]["loss"])
    assert dataclasses.asdict(config(train={"stage": stage}).loss_config()) == want
    got = config(train={"stage": stage}, loss={"ar": 0.5, "entropy": 1, "drift_every": 2}).loss_config()
    assert (got.ar, got.entropy, got.drift_every) == (0.5, 1.0, 2)
    assert type(got.entropy) is float


def test_stage_switches():
    assert config(train={"stage": 1}).loss_config().ar == 0.0 and config(train={"stage": 1}).loss_config().drift == 0.0
    assert config(train={"stage": 2}).loss_config().ar == LossConfig().ar != 0.0
    assert config(train={"stage": 2}).loss_config().drift == 0.0
    assert config(train={"stage": 3}).loss_config().drift == LossConfig().drift != 0.0


def test_bad_loss_tables_are_named():
    known = sorted(f.name for f in dataclasses.fields(LossConfig))
    assert error(loss={"entropyy": 0.1, "bogus": 1}) == f"config: unknown keys in [loss]: ['bogus', 'entropyy']; known: {known}"
    assert error(loss={"entropy": "0.1"}) == f"[loss] entropy='0.1': expected float (like {LossConfig.entropy!r})"
    assert error(loss={"entropy": True}) == f"[loss] entropy=True: expected float (like {LossConfig.entropy!r})"
    assert error(loss={"drift_every": 2.0}) == "[loss] drift_every=2.0: expected int (like 4)"
    assert error(loss={"entropy_method": 1}) == "[loss] entropy_method=1: expected str (like 'auto')"


def test_the_checks_name_any_key_and_type_they_are_given():
    """The two checks are generic: a dotted name of any depth keeps its last part in the range
    message, and a field of a type outside the config's own (a tuple here) is named by the type."""
    from pyratok.train.config import _check_range, _check_types

    with pytest.raises(ValueError) as err:
        _check_range("a.b.c", 0, 1, 2)
    assert str(err.value) == "a.b.c=0: expected 1 <= c <= 2"

    @dataclasses.dataclass
    class Section:
        pair: tuple = (1, 2)

    with pytest.raises(ValueError) as err:
        _check_types("extra", Section(pair=[1, 2]))
    assert str(err.value) == "extra.pair=[1, 2]: expected tuple, got list"
