"""Training configuration: one TOML file with [model], [data] and [train] tables.

    [model]
    preset = "tiny"            # "tiny" | "paper"; or pretrained = "path/to/model" to continue from one
    text_encoder = "default"   # optional override: "default", a local HF folder, or "none"
    backbone_path = ""         # optional: diffusers folder or Wan .pth of the backbone

    [data]
    source = "videos/"         # a folder of videos or a JSONL/CSV manifest (path, caption, start, end)
    num_frames = 17            # 1 + 4k
    height = 128
    width = 128
    fps = 0                    # 0 = each file's own rate
    crop = "random"
    resize = 0                 # short side before cropping; 0 = the smallest size covering the crop

    [train]
    out_dir = "runs/tiny"
    stage = 1                  # the paper's three stages (see STAGES)
    steps = 1000
    batch_size = 1
    grad_accum = 1
    lr = 1e-5                  # the paper's AdamW learning rate; warm-up then cosine decay
    ...

    [loss]                     # optional: overrides of the stage's loss weights (LossConfig fields)
    entropy = 0.2

Every key is optional except data.source and train.out_dir; unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, field
from typing import Optional

# The stages.  Each one sets EVERY loss weight (from LossConfig's defaults, the paper's
# weights, plus the stage's switches below; a [loss] table then overrides single weights) and
# EVERY trainable group, so a stage started from another stage's checkpoint trains exactly what
# its row says, whatever the checkpoint's config held.  Stages 1-3 are the paper's:
#   0 backbone:            the VAE itself (encoder + decoder; L1 + SSIM + a small KL), for when no
#                          pretrained backbone exists (the embedded tiny model);
#   1 language alignment:  reconstruction + the codebook loss with its text terms (commitment,
#                          entropy, hierarchy, text_token, text_code); LaPQ (text heads included),
#                          the encoder's LoRA and the null-text embedding train;
#   2 token alignment:     + the AR objective through the prior (the prior trains too);
#   3 joint:               + the frame-level retention (drift) term (its teacher head trains too).
# Trainable groups: "backbone" (every VAE weight), "lapq", "lora", "null_text", "prior",
# "drift_head"; train.train_decoder adds "decoder" (the VAE decoder + post_quant_conv) and
# train.train_encoder adds "encoder" (the VAE encoder + quant_conv, besides its LoRA).
STAGES = {
    0: {"name": "backbone", "loss": {}, "train": ("backbone",)},
    1: {"name": "language alignment", "loss": {"ar": 0.0, "drift": 0.0},
        "train": ("lapq", "lora", "null_text")},
    2: {"name": "token alignment", "loss": {"drift": 0.0},
        "train": ("lapq", "lora", "null_text", "prior")},
    3: {"name": "joint", "loss": {},
        "train": ("lapq", "lora", "null_text", "prior", "drift_head")},
}


MAX_STEPS = 10 ** 9
MAX_BATCH = 4096


def _check_types(section: str, values) -> None:
    """Each key must have its default's type (an int is accepted where a float is expected):
    a TOML ``steps = "2"`` or ``ema = true`` is an error naming the key, not a crash later."""
    for f in dataclasses.fields(values):
        value = getattr(values, f.name)
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        kind = type(default)
        ok = (isinstance(value, bool) if kind is bool else
              isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
              isinstance(value, int) and not isinstance(value, bool) if kind is int else
              isinstance(value, kind))
        if not ok:
            expected = {float: "a number", int: "an integer", bool: "true or false", str: "a string",
                        list: "a list"}.get(kind, kind.__name__)
            raise ValueError(f"{section}.{f.name}={value!r}: expected {expected}, got {type(value).__name__}")


def _check_range(name: str, value, low, high, low_open: bool = False, high_open: bool = False) -> None:
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if not math.isfinite(value) or too_low or too_high:
        raise ValueError(f"{name}={value}: expected {low} {'<' if low_open else '<='} {name.split('.')[-1]} "
                         f"{'<' if high_open else '<='} {high}")


@dataclass
class ModelSection:
    preset: str = "tiny"
    pretrained: str = ""
    text_encoder: str = ""          # "" keeps the preset's choice; "none" switches text off
    backbone_path: str = ""
    lpips: str = ""                 # a local LPIPS (VGG) weights file: switches the LPIPS recon term on


@dataclass
class DataSection:
    source: str = ""
    num_frames: int = 17
    height: int = 128
    width: int = 128
    fps: float = 0.0
    crop: str = "random"
    resize: int = 0                 # short side before cropping (0 = just cover the crop)
    buckets: list = field(default_factory=list)
    num_workers: int = 2


@dataclass
class TrainSection:
    out_dir: str = ""
    stage: int = 1
    steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.01
    betas: list = field(default_factory=lambda: [0.9, 0.99])
    warmup: int = 100
    min_lr_ratio: float = 0.1
    clip_grad: float = 1.0
    ema: float = 0.0                # 0 = off, else the EMA decay
    train_decoder: bool = False     # stages 1-3: also train the backbone's decoder (for backbones
                                    # trained in-house; the paper keeps a pretrained one frozen)
    train_encoder: bool = False     # stages 1-3: also train the backbone's encoder itself (end to end
                                    # with the quantizer; for small backbones trained in-house)
    masking: bool = True
    amp: str = "bf16"               # autocast dtype on GPU: "bf16" | "fp16" | "none"
    cpu_amp: str = "none"           # autocast on CPU: "bf16" (fast with AMX / AVX512-BF16) | "none"
    checkpoint_every: int = 500
    log_every: int = 10
    seed: int = 0
    distributed: str = "ddp"        # "ddp" | "fsdp" (under torchrun)
    progress: bool = True


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    loss: dict = field(default_factory=dict)    # LossConfig overrides on top of the stage's weights

    def __post_init__(self):
        for name, section in (("model", self.model), ("data", self.data), ("train", self.train)):
            _check_types(name, section)
        d, t = self.data, self.train
        if not d.source:
            raise ValueError("data.source: required (a folder of videos or a manifest)")
        if not t.out_dir:
            raise ValueError("train.out_dir: required")
        if t.stage not in STAGES:
            raise ValueError(f"train.stage={t.stage}: expected one of {sorted(STAGES)}")
        if self.model.preset not in ("tiny", "paper"):
            raise ValueError(f"model.preset={self.model.preset!r}: expected 'tiny' or 'paper'")
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every"):
            if getattr(t, name) < 1:
                raise ValueError(f"train.{name}={getattr(t, name)}: expected >= 1")
        _check_range("train.steps", t.steps, 1, MAX_STEPS)
        _check_range("train.batch_size", t.batch_size, 1, MAX_BATCH)
        _check_range("train.grad_accum", t.grad_accum, 1, MAX_BATCH)
        _check_range("train.warmup", t.warmup, 0, MAX_STEPS)
        _check_range("train.seed", t.seed, 0, 2 ** 63 - 1)
        _check_range("train.lr", t.lr, 0.0, 1.0, low_open=True)
        _check_range("train.weight_decay", t.weight_decay, 0.0, 1e3)
        _check_range("train.min_lr_ratio", t.min_lr_ratio, 0.0, 1.0)
        _check_range("train.clip_grad", t.clip_grad, 0.0, 1e12)
        _check_range("train.ema", t.ema, 0.0, 1.0, high_open=True)
        if len(t.betas) != 2:
            raise ValueError(f"train.betas={t.betas}: expected two numbers [beta1, beta2]")
        for i, b in enumerate(t.betas):
            if isinstance(b, bool) or not isinstance(b, (int, float)):
                raise ValueError(f"train.betas[{i}]={b!r}: expected a number")
            _check_range(f"train.betas[{i}]", b, 0.0, 1.0, high_open=True)
        if t.amp not in ("bf16", "fp16", "none"):
            raise ValueError(f"train.amp={t.amp!r}: expected 'bf16', 'fp16' or 'none'")
        if t.cpu_amp not in ("bf16", "none"):
            raise ValueError(f"train.cpu_amp={t.cpu_amp!r}: expected 'bf16' or 'none'")
        if t.distributed not in ("ddp", "fsdp"):
            raise ValueError(f"train.distributed={t.distributed!r}: expected 'ddp' or 'fsdp'")
        from pyratok.utils import MAX_FRAMES, MAX_SIDE

        if d.num_frames < 1 or (d.num_frames - 1) % 4:
            raise ValueError(f"data.num_frames={d.num_frames}: clips have 1 + 4k frames (1, 5, 9, 17, 33, ...)")
        _check_range("data.num_frames", d.num_frames, 1, MAX_FRAMES)
        for name in ("height", "width"):
            value = getattr(d, name)
            _check_range(f"data.{name}", value, 8, MAX_SIDE)
            if value % 8:
                raise ValueError(f"data.{name}={value}: expected a multiple of 8")
        _check_range("data.resize", d.resize, 0, MAX_SIDE)
        _check_range("data.fps", d.fps, 0.0, 1000.0)
        _check_range("data.num_workers", d.num_workers, 0, 256)
        if d.crop not in ("random", "center"):
            raise ValueError(f"data.crop={d.crop!r}: expected 'random' or 'center'")
        for b in d.buckets:
            if (not isinstance(b, list) or len(b) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                  and 8 <= v <= MAX_SIDE and v % 8 == 0 for v in b)):
                raise ValueError(f"data.buckets: {b!r} is not a [height, width] pair of multiples of 8 "
                                 f"in 8..{MAX_SIDE}")
        self.loss_config()                                          # validates the [loss] table

    def loss_config(self):
        """The stage's complete LossConfig: defaults, the stage's switches, then [loss]."""
        from pyratok.models.losses import LossConfig

        known = {f.name for f in dataclasses.fields(LossConfig)}
        bad = set(self.loss) - known
        if bad:
            raise ValueError(f"config: unknown keys in [loss]: {sorted(bad)}; known: {sorted(known)}")
        values = {}
        for k, v in self.loss.items():
            default = getattr(LossConfig, k)
            if isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if type(v) is not type(default):
                raise ValueError(f"[loss] {k}={v!r}: expected {type(default).__name__} (like {default!r})")
            values[k] = v
        return LossConfig(**(STAGES[self.train.stage]["loss"] | values))

    @classmethod
    def from_dict(cls, d: dict, base_dir: str = ".") -> "TrainConfig":
        sections = {"model": ModelSection, "data": DataSection, "train": TrainSection}
        unknown = set(d) - set(sections) - {"loss"}
        if unknown:
            raise ValueError(f"config: unknown tables {sorted(unknown)}; expected [model], [data], [train], [loss]")
        built = {}
        for name, klass in sections.items():
            if not isinstance(d.get(name, {}), dict):
                raise ValueError(f"config: [{name}] must be a table, got {type(d[name]).__name__}")
            values = dict(d.get(name, {}))
            names = {f.name for f in dataclasses.fields(klass)}
            bad = set(values) - names
            if bad:
                raise ValueError(f"config: unknown keys in [{name}]: {sorted(bad)}; known: {sorted(names)}")
            built[name] = klass(**values)
        for section, key in (("data", "source"), ("train", "out_dir"), ("model", "pretrained"),
                             ("model", "backbone_path"), ("model", "lpips")):
            value = getattr(built[section], key)
            if value and not os.path.isabs(value):
                setattr(built[section], key, os.path.normpath(os.path.join(base_dir, value)))
        if not isinstance(d.get("loss", {}), dict):
            raise ValueError("config: [loss] must be a table of LossConfig weights")
        return cls(**built, loss=dict(d.get("loss", {})))

    @classmethod
    def from_file(cls, path: str) -> "TrainConfig":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config: no such file {path}")
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"config: {path} is not valid TOML ({err})") from None
        return cls.from_dict(data, os.path.dirname(os.path.abspath(path)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
