"""LPIPS (Zhang et al. 2018, VGG variant) from a local weights file, for losses and eval.

Nothing is downloaded: pass the path of a state dict in the layout of the ``lpips``
package's ``LPIPS(net="vgg")`` (keys ``net.slice{1..5}.<i>.weight/bias`` of VGG-16's
feature layers and ``lin{0..4}.model.1.weight``), e.g. made once where the weights are at
hand with ``torch.save(lpips.LPIPS(net="vgg").state_dict(), "lpips_vgg.pth")``.

distance = sum over the 5 VGG stages of spatial means of
           || w_s * (normalize(f_s(x)) - normalize(f_s(y))) ||^2 ,
inputs in [-1, 1] shifted/scaled by the ImageNet constants of the original.
"""

from __future__ import annotations

import os

import torch
from einops import rearrange
from torch import nn

# VGG-16 conv layers per LPIPS slice: (index in torchvision's vgg16.features, in, out)
_SLICES = [
    [(0, 3, 64), (2, 64, 64)],
    [(5, 64, 128), (7, 128, 128)],
    [(10, 128, 256), (12, 256, 256), (14, 256, 256)],
    [(17, 256, 512), (19, 512, 512), (21, 512, 512)],
    [(24, 512, 512), (26, 512, 512), (28, 512, 512)],
]
_CHANNELS = [64, 128, 256, 512, 512]


class LPIPS(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.convs = nn.ModuleList(nn.ModuleList(nn.Conv2d(i, o, 3, padding=1) for _, i, o in s) for s in _SLICES)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS)
        self.requires_grad_(False)

    @classmethod
    def from_file(cls, path: str) -> "LPIPS":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"lpips weights: no such file {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = cls()
        mapped = {}
        for s, layers in enumerate(_SLICES):
            for j, (idx, _, _) in enumerate(layers):
                for p in ("weight", "bias"):
                    mapped[f"convs.{s}.{j}.{p}"] = state.get(f"net.slice{s + 1}.{idx}.{p}")
        for s in range(5):
            mapped[f"lins.{s}.weight"] = state.get(f"lin{s}.model.1.weight")
        missing = sorted(k for k, v in mapped.items() if v is None)
        if missing:
            raise ValueError(f"lpips weights {path}: not an lpips VGG state dict (missing keys for {missing[:4]}...)")
        model.load_state_dict({**mapped, "shift": model.shift, "scale": model.scale})
        return model.eval()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS of images (N, 3, H, W) or videos (B, 3, T, H, W) in [-1, 1]."""
        if x.dim() == 5:
            x, y = (rearrange(v, "b c t h w -> (b t) c h w") for v in (x, y))
        h = torch.cat([x, y]).float()
        h = (h - self.shift) / self.scale
        total = 0.0
        for s, (convs, lin) in enumerate(zip(self.convs, self.lins)):
            if s > 0:
                h = nn.functional.max_pool2d(h, 2)
            for conv in convs:
                h = torch.relu(conv(h))
            fx, fy = h.chunk(2)
            fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((fx - fy) ** 2).mean(dim=(1, 2, 3))
        return total.mean()
