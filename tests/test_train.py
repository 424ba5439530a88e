"""Training: configs, 5 steps single-process and with 2 gloo processes under torchrun, loadable
checkpoints, exact resume after an interruption."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from pyratok.data import bundled_clip_path
from pyratok.models.pyratok import PyraTok
from pyratok.train import TrainConfig, Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_config(tmp_path, steps=5, stage=1, checkpoint_every=100, extra_train=""):
    tmp_path.mkdir(parents=True, exist_ok=True)
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("\n".join(json.dumps({"path": bundled_clip_path(n), "caption": c}) for n, c in
                                  [("carphone_pristine.mp4", "a man talking in a car"),
                                   ("bikes.mp4", "bikes in a street")]) + "\n")
    cfg = tmp_path / "train.toml"
    cfg.write_text(f"""
[model]
preset = "tiny"
text_encoder = "none"

[data]
source = "{manifest}"
num_frames = 5
height = 32
width = 32
num_workers = 0

[train]
out_dir = "{tmp_path / 'run'}"
stage = {stage}
steps = {steps}
batch_size = 1
grad_accum = 2
lr = 1e-3
warmup = 2
checkpoint_every = {checkpoint_every}
log_every = 1
progress = false
{extra_train}
""")
    return cfg


def trained_weights(path):
    return {k: v for k, v in load_file(os.path.join(path, "model.safetensors")).items()}


def test_five_steps_single_process_and_loadable_checkpoint(tmp_path):
    cfg = TrainConfig.from_file(str(write_config(tmp_path)))
    trainer = Trainer(cfg)
    record = trainer.run()
    assert trainer.step == 5 and record["step"] == 5
    assert {"total", "l1", "ssim", "commitment", "entropy", "psnr", "usage_l0", "usage_l3", "tokens_per_s"} <= set(record)
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[-1])["step"] == 5
    ckpt = trainer.latest_checkpoint()
    assert ckpt.endswith("step-00000005")
    model = PyraTok.from_pretrained(ckpt)
    assert model.model_id and model.encode(torch.zeros(1, 3, 5, 32, 32)).num_tokens > 0


def changed_and_unchanged(tmp_path, stage, extra=""):
    """Two steps of a stage -> ({names of parameters that changed}, {names that did not})."""
    cfg = TrainConfig.from_file(str(write_config(tmp_path, steps=2, stage=stage, extra_train=extra)))
    trainer = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.run()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach())}
    return changed, set(before) - changed


def test_stage_zero_trains_the_whole_backbone_and_nothing_else(tmp_path):
    changed, unchanged = changed_and_unchanged(tmp_path, stage=0)
    backbone = {n for n in changed | unchanged if n.startswith("vae.") and ".lora_" not in n}
    assert changed == backbone                                  # every backbone weight moved, nothing else
    assert any(n.startswith("vae.decoder.") for n in changed) and any(n.startswith("vae.encoder.") for n in changed)


def test_stage_one_keeps_the_backbone_and_decoder_frozen(tmp_path):
    changed, unchanged = changed_and_unchanged(tmp_path, stage=1)
    assert not any(n.startswith("vae.") and ".lora_" not in n for n in changed)     # frozen: bit for bit
    assert not any(n.startswith("prior.") for n in changed)                          # AR is off in stage 1
    lapq = {n for n in changed | unchanged if n.startswith("lapq.")}
    # the text heads get no gradient without a caption (text_encoder = "none"); every other LaPQ weight moves
    assert {n for n in lapq if n not in changed} <= {n for n in lapq if ".text_" in n}
    assert any(".lora_B" in n for n in changed)
    changed, _ = changed_and_unchanged(tmp_path / "dec", stage=1, extra="train_decoder = true")
    assert any(n.startswith("vae.decoder.") for n in changed)
    assert not any(n.startswith("vae.encoder.") and ".lora_" not in n for n in changed)
    changed, _ = changed_and_unchanged(tmp_path / "enc", stage=1, extra="train_encoder = true")
    assert any(n.startswith("vae.encoder.") and ".lora_" not in n for n in changed)
    assert not any(n.startswith(("vae.decoder.", "vae.post_quant_conv.")) for n in changed)


def test_what_each_stage_trains(tmp_path):
    from pyratok.train.loop import build_model

    def trained(stage, extra=""):
        cfg = TrainConfig.from_file(str(write_config(tmp_path / f"s{stage}{bool(extra)}", stage=stage,
                                                     extra_train=extra)))
        names = [n for n, p in build_model(cfg).named_parameters() if p.requires_grad]
        if stage > 0 and "train_encoder" not in extra:  # the frozen encoder trains only its LoRA adapters
            assert all(".lora_" in n for n in names if n.startswith("vae.encoder."))
        return {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("vae.") else "") for n in names}

    assert trained(0) == {"vae.encoder", "vae.decoder", "vae.quant_conv", "vae.post_quant_conv"}
    assert trained(1) == {"lapq", "null_text", "vae.encoder"}            # vae.encoder: its LoRA only
    assert trained(1, "train_decoder = true") == {"lapq", "null_text", "vae.encoder", "vae.decoder",
                                                  "vae.post_quant_conv"}
    # the whole encoder and quant_conv instead of the encoder's LoRA only
    assert trained(1, "train_encoder = true") == trained(1) | {"vae.quant_conv"}
    assert trained(1, "train_encoder = true\ntrain_decoder = true") == trained(0) | {"lapq", "null_text"}
    assert trained(2) == trained(1) | {"prior"}


def test_resume_is_exact(tmp_path):
    full = Trainer(TrainConfig.from_file(str(write_config(tmp_path / "a", steps=6, checkpoint_every=3))))
    full.run()
    cfg_b = write_config(tmp_path / "b", steps=6, checkpoint_every=100)

    def interrupt(trainer):
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)          # as a scheduler would: handled after the step

    first = Trainer(TrainConfig.from_file(str(cfg_b)))
    first.run(on_step=interrupt)
    assert first.stopped_by_signal == signal.SIGTERM and first.step == 3
    second = Trainer(TrainConfig.from_file(str(cfg_b)))
    second.run(resume=True)
    assert second.step == 6
    a = trained_weights(full.latest_checkpoint())
    b = trained_weights(second.latest_checkpoint())
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_ema_weights_follow_the_recursion_are_saved_and_restored(tmp_path):
    """e_0 = p_0, e_(s+1) = e_s + (1 - decay) (p_(s+1) - e_s) after each optimizer step; the EMA is
    in the checkpoint's trainer state and a resumed run continues from it."""
    from pyratok.train.loop import TRAINER_STATE
    from pyratok.train.state_io import load_state

    cfg = TrainConfig.from_file(str(write_config(tmp_path, steps=3, checkpoint_every=100, extra_train="ema = 0.5")))
    trainer = Trainer(cfg)
    want = [p.detach().clone() for p in trainer.params]
    trajectory = []

    def record(t):
        trajectory.append([p.detach().clone() for p in t.params])

    trainer.run(on_step=record)
    for params in trajectory:
        want = [e + 0.5 * (p - e) for e, p in zip(want, params)]
    assert any(not torch.equal(w, p) for w, p in zip(want, trajectory[-1]))       # it is not the raw weights
    for got, w in zip(trainer.ema, want):
        torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-7)
    state = load_state(trainer.latest_checkpoint(), TRAINER_STATE)
    assert len(state["ema"]) == len(want)
    for got, w in zip(state["ema"], want):
        torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-7)
    again = Trainer(TrainConfig.from_file(str(write_config(tmp_path, steps=3, extra_train="ema = 0.5"))))
    again.load_checkpoint(trainer.latest_checkpoint())
    assert all(torch.equal(a, b) for a, b in zip(again.ema, state["ema"]))
    # used: step-N/ema/ is a loadable model whose trained weights are the EMA and every other
    # weight the model's; step-N/ itself keeps the raw weights (for resuming)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    trained = [names[id(p)] for p in trainer.params]
    ema_model = PyraTok.from_pretrained(os.path.join(trainer.latest_checkpoint(), "ema"))
    raw_model = PyraTok.from_pretrained(trainer.latest_checkpoint())
    ema_params, raw_params = dict(ema_model.named_parameters()), dict(raw_model.named_parameters())
    for name, w, p in zip(trained, want, trajectory[-1]):
        torch.testing.assert_close(ema_params[name], w, rtol=1e-6, atol=1e-7)
        assert torch.equal(raw_params[name], p)
    untouched = set(raw_params) - set(trained)
    assert untouched and all(torch.equal(ema_params[n], raw_params[n]) for n in untouched)
    assert all(torch.equal(p, r) for p, r in zip(trainer.params, trajectory[-1]))    # saving put the raw weights back


DDP_STEP = """
import os, sys
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from pyratok.models.pyratok import PyraTok, PyraTokConfig
from pyratok.models.text import TextEmbedding

torch.manual_seed(0)
model = PyraTok(PyraTokConfig.tiny(text_encoder=None))
model.config.loss.drift = 0.0
with torch.no_grad():                        # LoRA off its B = 0 start, so that every adapter gets a gradient
    for n, p in model.named_parameters():
        if ".lora_B." in n:
            p.normal_(0, 0.02)
model.requires_grad_(False)
for n, p in model.named_parameters():
    p.requires_grad_(not n.startswith("vae.") or ".lora_" in n)
g = torch.Generator().manual_seed(1)
video = torch.rand(2, 3, 5, 32, 32, generator=g) * 2 - 1
text = TextEmbedding(torch.randn(2, 3, 384, generator=g), torch.ones(2, 3, dtype=torch.bool))
world = int(os.environ.get("WORLD_SIZE", "1"))
if world > 1:
    dist.init_process_group("gloo")
    r = dist.get_rank()
    net, pg = DDP(model, find_unused_parameters=True), dist.group.WORLD
    video, text = video[r:r + 1], TextEmbedding(text.tokens[r:r + 1], text.mask[r:r + 1])
else:
    net, pg = model, None
opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
_, losses = net(video, text, None, pg)
assert {"ar", "entropy", "text_code", "text_token", "hierarchy"} <= set(losses.terms), losses.terms
losses.total.backward()
opt.step()
if world == 1 or dist.get_rank() == 0:
    torch.save({n: p.detach() for n, p in model.named_parameters() if p.requires_grad}, sys.argv[1])
if world > 1:
    dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_ddp_ranks_equal_one_process_on_the_union_batch(tmp_path):
    """One SGD step of every trained group (LaPQ with its text heads, LoRA, prior) with every
    batch-coupled term on (entropy's H(q), text_code's mean, AR): 2 gloo ranks with one clip each
    give the parameters of one process with both clips, to fp32 tolerance.  (It found the
    all-reduced terms training at 1/world of their weight under DDP, fixed in ops/entropy.py.)"""
    script = tmp_path / "ddp_step.py"
    script.write_text(DDP_STEP)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt")], env=env, capture_output=True,
                         text=True, timeout=600)
    if one.returncode != 0:
        raise RuntimeError(one.stderr[-3000:])
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), str(tmp_path / "two.pt")], env=env, capture_output=True, text=True,
                         timeout=600, cwd=str(tmp_path))
    if two.returncode != 0:
        raise RuntimeError(two.stderr[-3000:])
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    if not (a.keys() == b.keys() and any(k.startswith("prior.") for k in a) and any(".lora_" in k for k in a)):
        raise RuntimeError(f"parameters saved: {sorted(a)} vs {sorted(b)}")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-6, msg=k)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="data.source: required"):
        TrainConfig.from_dict({"train": {"out_dir": "x"}})
    with pytest.raises(ValueError, match=r"unknown keys in \[train\]: \['lr_typo'\]"):
        TrainConfig.from_dict({"data": {"source": "v"}, "train": {"out_dir": "x", "lr_typo": 1}})
    with pytest.raises(ValueError, match="train.stage=7"):
        TrainConfig.from_dict({"data": {"source": "v"}, "train": {"out_dir": "x", "stage": 7}})
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nout_dir=")
    with pytest.raises(ValueError, match="not valid TOML"):
        TrainConfig.from_file(str(bad))


@pytest.mark.slow
def test_two_gloo_processes_under_torchrun(tmp_path):
    cfg = write_config(tmp_path, steps=5)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYRATOK_BACKEND=os.environ.get("PYRATOK_BACKEND", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "pyratok.cli", "train", str(cfg), "-q"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000005"
    assert (ckpt / "model.safetensors").is_file()
    PyraTok.from_pretrained(str(ckpt))


@pytest.mark.slow
def test_fsdp_on_cpu_is_a_clear_error(tmp_path):
    """PyTorch's FSDP has no CPU backend: the run must say so and point to DDP, not crash
    inside torch.  (The FSDP path itself, with its gathered full-state checkpoints, needs
    GPUs and has not run yet.)"""
    cfg = write_config(tmp_path, steps=1, extra_train='distributed = "fsdp"')
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "pyratok.cli", "train", str(cfg), "-q"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert res.returncode != 0
    assert "train.distributed='fsdp' needs GPUs" in res.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cpu_bf16_autocast_trains_both_stages(tmp_path):
    # train.cpu_amp = "bf16": the convolutions run in bf16 (AMX), the entropy statistics in fp32;
    # the losses stay finite and the weights move in the backbone stage and in stage 1
    for stage in (0, 1):
        cfg = TrainConfig.from_file(str(write_config(tmp_path / f"s{stage}", steps=2, stage=stage,
                                                     extra_train='cpu_amp = "bf16"')))
        trainer = Trainer(cfg)
        with trainer._autocast():
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        record = trainer.run()
        assert all(math.isfinite(v) for k, v in record.items() if isinstance(v, float)), record
        changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])]
        assert changed and all(v.dtype == torch.float32 for v in trainer.model.state_dict().values()
                               if v.is_floating_point())
    with pytest.raises(ValueError, match="train.cpu_amp='fp16'"):
        TrainConfig.from_dict({"data": {"source": "v"}, "train": {"out_dir": "x", "cpu_amp": "fp16"}})
