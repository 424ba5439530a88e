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


def test_psnr_of_a_hand_computed_case():
    a = torch.zeros(1, 3, 1, 4, 4)
    b = a.clone()
    b[0, 0, 0, 0, 0] = 1.0                        # one channel value off by 1 in range 2: MSE = 1 / 48
    assert psnr(b, a).item() == pytest.approx(10 * math.log10(4 * 48), abs=1e-4)   # 22.833 dB


def test_ssim_matches_scikit_image_on_real_frames():
    """Our SSIM (torchmetrics: Gaussian window 11, sigma 1.5) is scikit-image's structural_similarity
    with the same window averaged over the whole SSIM map; skimage's default mean leaves out a
    5-pixel border, which on small frames differs by several hundredths (checked both ways)."""
    skimage_metrics = pytest.importorskip("skimage.metrics")
    from pyratok.data import bundled_clip_path, read_video, resize_and_crop

    clip = resize_and_crop(read_video(bundled_clip_path("carphone_pristine.mp4"), 2), 64, 64, None)[None]
    g = torch.Generator().manual_seed(0)
    noisy = (clip + 0.15 * torch.randn(clip.shape, generator=g)).clamp(-1, 1)
    full_maps, cropped = [], []
    for t in range(2):
        value, full = skimage_metrics.structural_similarity(
            clip[0, :, t].permute(1, 2, 0).double().numpy(), noisy[0, :, t].permute(1, 2, 0).double().numpy(),
            channel_axis=2, data_range=2.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, full=True)
        full_maps.append(full.mean())
        cropped.append(value)
    got = ssim(noisy, clip).item()
    assert got == pytest.approx(sum(full_maps) / 2, abs=2e-4)
    assert abs(got - sum(cropped) / 2) > 0.02
