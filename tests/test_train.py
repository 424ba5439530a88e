"""Training: configs, 5 steps single-process and with 2 gloo processes under torchrun, loadable
checkpoints, exact resume after an interruption."""

import json
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


def test_stage_zero_trains_the_backbone(tmp_path):
    cfg = TrainConfig.from_file(str(write_config(tmp_path, steps=2, stage=0)))
    trainer = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if n.startswith("vae.decoder.")}
    trainer.run()
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_what_each_stage_trains(tmp_path):
    from pyratok.train.loop import build_model

    def trained(stage, extra=""):
        cfg = TrainConfig.from_file(str(write_config(tmp_path / f"s{stage}{bool(extra)}", stage=stage,
                                                     extra_train=extra)))
        names = [n for n, p in build_model(cfg).named_parameters() if p.requires_grad]
        if stage > 0:                                   # the frozen encoder trains only its LoRA adapters
            assert all(".lora_" in n for n in names if n.startswith("vae.encoder."))
        return {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("vae.") else "") for n in names}

    assert trained(0) == {"vae.encoder", "vae.decoder", "vae.quant_conv", "vae.post_quant_conv"}
    assert trained(1) == {"lapq", "null_text", "vae.encoder"}            # vae.encoder: its LoRA only
    assert trained(1, "train_decoder = true") == {"lapq", "null_text", "vae.encoder", "vae.decoder",
                                                  "vae.post_quant_conv"}
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
