import math

import pytest
import torch

from pyratok.metrics import psnr, ssim
from conftest import lpips_weights_file


def test_psnr_matches_the_255_convention():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 4, 16, 16, generator=g) * 2 - 1
    b = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    a8, b8 = ((a + 1) * 127.5), ((b + 1) * 127.5)
    per_frame = [10 * math.log10(255 ** 2 / (a8[i, :, t] - b8[i, :, t]).pow(2).mean().item())
                 for i in range(2) for t in range(4)]
    assert psnr(b, a).item() == pytest.approx(sum(per_frame) / len(per_frame), rel=1e-4)
    assert psnr(a, a).item() > 100


def test_ssim_range_and_gradient():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 3, 2, 32, 32, generator=g) * 2 - 1
    assert ssim(a, a).item() == pytest.approx(1.0, abs=1e-5)
    noisy = (a + 0.3 * torch.randn(a.shape, generator=g)).requires_grad_()
    s = ssim(noisy, a, clamp=False)
    assert 0 < s.item() < 0.95
    (1 - s).backward()
    assert noisy.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"video: expected \(B, 3, T, H, W\)"):
        ssim(a[:, :2], a[:, :2])


def test_lpips_from_a_local_file(tmp_path):
    from pyratok.lpips import LPIPS

    lp = LPIPS.from_file(lpips_weights_file(tmp_path / "lpips_vgg.pth"))
    a = torch.rand(1, 3, 2, 32, 32) * 2 - 1
    assert lp(a, a).item() == pytest.approx(0.0, abs=1e-6)
    b = (a + 0.2 * torch.randn_like(a)).requires_grad_()
    d = lp(b, a)
    assert d.item() > 0
    d.backward()
    assert b.grad.abs().sum() > 0
    torch.save({"w": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an lpips VGG state dict"):
        LPIPS.from_file(str(tmp_path / "other.pth"))
    with pytest.raises(FileNotFoundError, match="lpips weights: no such file"):
        LPIPS.from_file(str(tmp_path / "missing.pth"))
