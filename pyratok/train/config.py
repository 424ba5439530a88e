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
# "drift_head"; train.train_decoder adds "decoder" (the VAE decoder + post_quant_conv).
STAGES = {
    0: {"name": "backbone", "loss": {}, "train": ("backbone",)},
    1: {"name": "language alignment", "loss": {"ar": 0.0, "drift": 0.0},
        "train": ("lapq", "lora", "null_text")},
    2: {"name": "token alignment", "loss": {"drift": 0.0},
        "train": ("lapq", "lora", "null_text", "prior")},
    3: {"name": "joint", "loss": {},
        "train": ("lapq", "lora", "null_text", "prior", "drift_head")},
}


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
    masking: bool = True
    amp: str = "bf16"               # autocast dtype on GPU: "bf16" | "fp16" | "none"
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
        if not self.data.source:
            raise ValueError("data.source: required (a folder of videos or a manifest)")
        if not self.train.out_dir:
            raise ValueError("train.out_dir: required")
        if self.train.stage not in STAGES:
            raise ValueError(f"train.stage={self.train.stage}: expected one of {sorted(STAGES)}")
        if self.model.preset not in ("tiny", "paper"):
            raise ValueError(f"model.preset={self.model.preset!r}: expected 'tiny' or 'paper'")
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every"):
            if getattr(self.train, name) < 1:
                raise ValueError(f"train.{name}={getattr(self.train, name)}: expected >= 1")
        if self.train.amp not in ("bf16", "fp16", "none"):
            raise ValueError(f"train.amp={self.train.amp!r}: expected 'bf16', 'fp16' or 'none'")
        if self.train.distributed not in ("ddp", "fsdp"):
            raise ValueError(f"train.distributed={self.train.distributed!r}: expected 'ddp' or 'fsdp'")
        self.loss_config()                                          # validates the [loss] table

    def loss_config(self):
        """The stage's complete LossConfig: defaults, the stage's switches, then [loss]."""
        from pyratok.models.losses import LossConfig

        known = {f.name for f in dataclasses.fields(LossConfig)}
        bad = set(self.loss) - known
        if bad:
            raise ValueError(f"config: unknown keys in [loss]: {sorted(bad)}; known: {sorted(known)}")
        values = {k: float(v) if isinstance(v, int) and not isinstance(v, bool) and
                  isinstance(getattr(LossConfig, k, None), float) else v for k, v in self.loss.items()}
        return LossConfig(**(STAGES[self.train.stage]["loss"] | values))

    @classmethod
    def from_dict(cls, d: dict, base_dir: str = ".") -> "TrainConfig":
        sections = {"model": ModelSection, "data": DataSection, "train": TrainSection}
        unknown = set(d) - set(sections) - {"loss"}
        if unknown:
            raise ValueError(f"config: unknown tables {sorted(unknown)}; expected [model], [data], [train], [loss]")
        built = {}
        for name, klass in sections.items():
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
