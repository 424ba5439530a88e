"""A frozen vision teacher for PyraTok's drift (retention) term (DESIGN.md §3, Losses).

The paper keeps the LoRA-adapted encoder close to a frozen DINOv3 encoder.  Any local Hugging
Face vision model folder plays that role here: DINOv2/v3, SigLIP or CLIP vision towers, loaded
with transformers' Auto classes (nothing is downloaded).  Every frame of a clip goes through
the teacher on its own; its patch tokens come back as a feature map per frame:

    video (B, 3, T, H, W) in [-1, 1]
      -> per frame: [0, 1], the model's own mean/std, resized to a multiple of its patch size
      -> last hidden state, CLS/register tokens dropped -> (B, D, T, H/p, W/p)

PyraTok projects its deepest encoder features with a small trainable head and compares them
with these maps (pooled onto the latent grid over the VAE's causal frame groups).
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _vision_config(config):
    """The vision sub-config of dual-tower models (CLIP, SigLIP), else the config itself."""
    return getattr(config, "vision_config", None) or config


class VisionTeacher(nn.Module):
    """Frozen local Hugging Face vision model -> per-frame patch feature maps (B, D, T, h, w).

    path: a local folder with config.json and weights (and optionally preprocessor_config.json,
    whose image_mean / image_std are used; ImageNet's otherwise).
    """

    def __init__(self, path: str):
        super().__init__()
        if not os.path.isdir(path):
            raise FileNotFoundError(f"drift_teacher: no such model folder: {path}")
        from transformers import AutoConfig, AutoModel

        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
            model = AutoModel.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"drift_teacher: {path} is not a loadable Hugging Face vision model ({err})") from None
        if hasattr(model, "vision_model"):                    # CLIP / SigLIP: keep the vision tower only
            model = model.vision_model
        vision = _vision_config(config)
        if not hasattr(vision, "patch_size") or not hasattr(vision, "hidden_size"):
            raise ValueError(f"drift_teacher: {path} has no patch_size/hidden_size: not a ViT-style vision model")
        self.model = model.eval().requires_grad_(False)
        self.patch = int(vision.patch_size)
        self.dim = int(vision.hidden_size)
        self.image_size = int(getattr(vision, "image_size", 224))
        self.extra_tokens = 1 + int(getattr(vision, "num_register_tokens", 0) or 0)   # CLS (+ registers)
        mean, std = _IMAGENET_MEAN, _IMAGENET_STD
        pre = os.path.join(path, "preprocessor_config.json")
        if os.path.isfile(pre):
            with open(pre) as f:
                proc = json.load(f)
            mean, std = proc.get("image_mean", mean), proc.get("image_std", std)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.path = path

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()                                     # frozen: dropout stays off
        return self

    @torch.no_grad()
    def forward(self, video: torch.Tensor) -> torch.Tensor:
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"video: expected (B, 3, T, H, W), got {tuple(video.shape)}")
        B, _, T, H, W = video.shape
        frames = rearrange(video.float(), "b c t h w -> (b t) c h w")
        frames = ((frames + 1) / 2 - self.mean) / self.std
        h = max(1, round(H / self.patch)) * self.patch
        w = max(1, round(W / self.patch)) * self.patch
        if (h, w) != (H, W):
            frames = F.interpolate(frames, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        kwargs = {}
        if (h, w) != (self.image_size, self.image_size):
            kwargs["interpolate_pos_encoding"] = True
        hidden = self.model(pixel_values=frames, **kwargs).last_hidden_state      # (B*T, N, D)
        patches = (h // self.patch) * (w // self.patch)
        tokens = hidden[:, hidden.shape[1] - patches:] if hidden.shape[1] >= patches else None
        if tokens is None or hidden.shape[1] - patches not in (0, self.extra_tokens):
            raise ValueError(f"drift_teacher: {hidden.shape[1]} output tokens for {patches} patches of {h}x{w}")
        return rearrange(tokens, "(b t) (y x) d -> b d t y x", b=B, t=T, y=h // self.patch, x=w // self.patch)

