"""The entropy loss on realistic inputs: vector-quantize-pytorch's default inv_temperature = 100
with a trained encoder's small latents, where most code probabilities are denormal in fp32.

The C++ CPU kernels (and the GEMMs around them) run with flush-to-zero there
(csrc/core/entropy.h, FlushDenormals): the value and gradient must still match the float64
computation to fp32 rounding, and the time must not blow up against N(0, 1) inputs (it was
~10-50x before, 1.1 s against 0.1 s at K = 16 over 8192 tokens).
"""

from __future__ import annotations

import time

import pytest
import torch

import pyratok
from pyratok import ops

pytestmark = pytest.mark.skipif("cpu" not in pyratok.available_backends("cpu"),
                                reason="the C++ CPU backend is not built")


def latent(std, shape=(4, 14, 16, 16), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * std


def loss_and_grad(x, backend="cpu", tau=100.0):
    x = x.clone().requires_grad_()
    out = ops.lfq_entropy_loss(x, 1.0, 1.0, inv_temperature=tau, backend=backend)
    out.loss.backward()
    return out, x.grad


@pytest.mark.parametrize("std", [0.02, 0.05, 0.1])
def test_value_and_gradient_match_float64_at_denormal_scale(std):
    x = latent(std)
    got, grad = loss_and_grad(x)
    want, want_grad = loss_and_grad(x.double(), backend="reference")
    # the inputs do reach the denormal range: many code probabilities below FLT_MIN
    z = 4 * 100.0 * x.double().movedim(1, -1).reshape(-1, 14)
    least_likely = torch.nn.functional.logsigmoid(-z.abs()).sum(1)  # log of each token's least likely code
    log_tiny = torch.log(torch.tensor(torch.finfo(torch.float32).tiny, dtype=torch.float64))
    assert (least_likely < log_tiny).float().mean() > 0.3
    torch.testing.assert_close(got.per_sample_entropy.double(), want.per_sample_entropy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.codebook_entropy.double(), want.codebook_entropy, rtol=1e-5, atol=1e-6)
    scale = want_grad.abs().max()
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-5 * scale)


def _best_time(x, rounds=3):
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        loss_and_grad(x)
        best = min(best, time.perf_counter() - start)
    return best


def test_denormal_scale_is_not_slower_than_unit_scale():
    shape = (8, 16, 32, 32)  # the case: K = 16 over 8 x 32 x 32 tokens
    loss_and_grad(latent(1.0, shape))  # warm-up
    unit, small = _best_time(latent(1.0, shape, seed=1)), _best_time(latent(0.05, shape, seed=1))
    assert small < 3 * unit, f"N(0, 0.05): {small * 1e3:.1f} ms vs N(0, 1): {unit * 1e3:.1f} ms"
