"""Training PyraTok: configs (TOML), the loop (single process or torchrun), checkpoints."""

from pyratok.train.config import STAGES, TrainConfig
from pyratok.train.loop import ResumableSampler, Trainer, build_model, setup_distributed

__all__ = ["STAGES", "ResumableSampler", "TrainConfig", "Trainer", "build_model", "setup_distributed"]
