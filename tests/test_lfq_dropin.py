"""pyratok.nn.LFQ against vector-quantize-pytorch's LFQ (the pinned peer), option by option.

The peer is the oracle for everything but one detail: it clamps log p at 1e-5 inside its
entropies (``log(t, eps=1e-5)``), so its per-sample entropy (and a little of its codebook
entropy) is not the entropy once code probabilities drop below 1e-5.  The grid therefore runs
the peer in float64 with that clamp removed ("the exact peer"), which must equal ours in
float64 to ~1e-10; our float32 result must equal the exact peer to float32 rounding; and the
stock peer's error against the exact value is shown to be the larger one.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from pyratok import ops
from pyratok.nn import LFQ, join_factorized_indices, split_factorized_indices

vqp_lfq = pytest.importorskip("vector_quantize_pytorch.lookup_free_quantization")


@pytest.fixture
def exact_peer(monkeypatch):
    """The peer's entropies without the 1e-5 clamp on log p (the tiniest positive float64)."""
    monkeypatch.setattr(vqp_lfq, "log", lambda t, eps=None: t.clamp(min=1e-300).log())


def make_pair(dtype=torch.float64, **kw):
    """(peer, ours) with the same weights (ours loads the peer's state dict strictly)."""
    torch.manual_seed(0)
    peer = vqp_lfq.LFQ(**kw)
    ours = LFQ(**kw)
    ours.load_state_dict(peer.state_dict(), strict=True)
    return peer.to(dtype), ours.to(dtype)


def run(module, x, tau, mask=None, seed=1, peer_mask=False):
    """(quantized, indices, aux loss, breakdown, grad x, grads of params).

    peer_mask: the oracle for a masked batch.  The peer's masked path flattens the codebook axis
    into the tokens (``original_input[mask]`` is (m, c, d), then ``'b n ... -> (b n) ...'``), so
    its batch entropy degenerates into the per-sample one and the aux loss into ~0; the oracle is
    the peer's loss on the kept tokens alone, x[mask] as one (1, m, d) batch."""
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)  # frac_per_sample_entropy draws tokens from the global RNG
    if peer_mask:
        q, idx, _ = module(x, inv_temperature=tau)
        (_, _, aux), breakdown = module(x[mask][None], inv_temperature=tau, return_loss_breakdown=True)
    else:
        (q, idx, aux), breakdown = module(x, inv_temperature=tau, return_loss_breakdown=True, mask=mask)
    weights = torch.linspace(-1, 1, q.numel(), dtype=q.dtype).reshape(q.shape)
    ((q * weights).sum() + aux).backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    module.zero_grad()
    return q.detach(), idx, aux.detach(), [t.detach() for t in breakdown], x.grad, grads


def assert_same(got, want, rtol, atol):
    q, idx, aux, bd, gx, gp = got
    q2, idx2, aux2, bd2, gx2, gp2 = want
    assert idx.dtype == torch.int64 and idx2.dtype == torch.int64
    assert idx.shape == idx2.shape
    assert torch.equal(idx, idx2)
    torch.testing.assert_close(q, q2, rtol=rtol, atol=atol)
    torch.testing.assert_close(aux, aux2, rtol=rtol, atol=atol)
    for a, b in zip(bd, bd2):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=rtol, atol=atol)
    torch.testing.assert_close(gx, gx2, rtol=rtol, atol=atol)
    assert gp.keys() == gp2.keys()
    for name in gp:
        torch.testing.assert_close(gp[name], gp2[name], rtol=rtol, atol=atol, msg=name)


# (constructor options, input shape, input std, use a mask): each row exercises some options
GRID = [
    (dict(codebook_size=2 ** 8), (2, 8, 3, 4, 5), 0.05, False),                        # video, channel-first
    (dict(codebook_size=2 ** 6, commitment_loss_weight=0.25), (2, 7, 6), 1.0, True),     # (b, n, d), mask
    (dict(dim=12, codebook_size=2 ** 5, diversity_gamma=1.5), (2, 12, 4, 4), 0.5, False),  # projections
    (dict(dim=10, codebook_size=2 ** 4, num_codebooks=2, commitment_loss_weight=0.1), (2, 9, 10), 0.3, True),
    (dict(codebook_size=2 ** 6, spherical=True, codebook_scale=1.5), (2, 6, 5, 5), 1.0, False),
    (dict(codebook_size=2 ** 6, soft_clamp_input_value=2.0, codebook_scale=0.5), (3, 11, 6), 2.0, False),
    (dict(codebook_size=2 ** 5, straight_through_activation=nn.Tanh(), orthogonal_rotation=True),
     (2, 5, 2, 3, 4), 0.2, False),
    (dict(dim=8, codebook_size=2 ** 6, cosine_sim_project_in=True, experimental_softplus_entropy_loss=True),
     (2, 10, 8), 1.0, False),
    (dict(codebook_size=2 ** 6, frac_per_sample_entropy=0.5, channel_first=True), (2, 6, 20), 0.1, False),
    (dict(dim=6, codebook_size=2 ** 3, num_codebooks=2, has_projections=False, keep_num_codebooks_dim=True,
          spherical=True), (2, 6, 4, 4), 1.0, False),
]


def grid_input(shape, std, dtype, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).mul(std).to(dtype)


def grid_mask(kw, shape):
    b, n = shape[0], (shape[1] if len(shape) == 3 and not kw.get("channel_first") else None)
    mask = torch.rand(b, n, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[:, 0] = True
    return mask


@pytest.mark.parametrize("tau", [1.0, 100.0])
@pytest.mark.parametrize("row", range(len(GRID)))
def test_matches_exact_peer_in_float64(row, tau, exact_peer):
    kw, shape, std, masked = GRID[row]
    peer, ours = make_pair(torch.float64, force_quantization_f32=False, **kw)
    x = grid_input(shape, std, torch.float64)
    mask = grid_mask(kw, shape) if masked else None
    assert_same(run(ours, x, tau, mask), run(peer, x, tau, mask, peer_mask=masked), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("row", range(len(GRID)))
def test_float32_matches_exact_peer_to_float32_rounding(row, exact_peer):
    kw, shape, std, masked = GRID[row]
    peer, _ = make_pair(torch.float64, force_quantization_f32=False, **kw)
    _, ours = make_pair(torch.float32, **kw)
    mask = grid_mask(kw, shape) if masked else None
    want = run(peer, grid_input(shape, std, torch.float64), 100.0, mask, peer_mask=masked)
    got = run(ours, grid_input(shape, std, torch.float32), 100.0, mask)
    assert_same(got, tuple(t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else
                           ([b.float() for b in t] if isinstance(t, list) else
                            ({k: v.float() for k, v in t.items()} if isinstance(t, dict) else t)) for t in want),
                rtol=1e-4, atol=2e-5)


def test_stock_peer_clamp_is_the_larger_error():
    """At the peer's default inv_temperature=100 and encoder-scale inputs, the stock peer's
    per-sample entropy is off the exact float64 value (its log clamp); ours is not."""
    kw = dict(codebook_size=2 ** 8, commitment_loss_weight=0.0)
    x = grid_input((4, 8, 8, 8), 0.02, torch.float32)
    stock, ours = make_pair(torch.float32, **kw)
    truth = ops.lfq_entropy_loss(x.double(), 0.1, 0.1, inv_temperature=100.0)
    (_, _, stock_aux), stock_bd = stock.train()(x, return_loss_breakdown=True)
    (_, _, our_aux), our_bd = ours.train()(x, return_loss_breakdown=True)
    our_err = (our_bd.per_sample_entropy.double() - truth.per_sample_entropy).abs()
    stock_err = (stock_bd.per_sample_entropy.double() - truth.per_sample_entropy).abs()
    assert our_err < 1e-5 * truth.per_sample_entropy
    assert stock_err > 100 * our_err
    torch.testing.assert_close(our_aux.double(), truth.loss, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kw,shape", [
    (dict(codebook_size=2 ** 8), (2, 8, 3, 4)),
    (dict(dim=10, codebook_size=2 ** 4, num_codebooks=2), (2, 5, 10)),
    (dict(codebook_size=2 ** 6, spherical=True, orthogonal_rotation=True), (2, 6, 2, 3, 3)),
])
def test_eval_mode_and_indices_to_codes(kw, shape):
    peer, ours = make_pair(torch.float32, **kw)
    peer.eval(), ours.eval()
    x = grid_input(shape, 1.0, torch.float32).requires_grad_()
    q_peer, i_peer, aux_peer = peer(x)
    q_ours, i_ours, aux_ours = ours(x)
    assert torch.equal(i_ours, i_peer) and aux_ours.item() == aux_peer.item() == 0
    torch.testing.assert_close(q_ours, q_peer)
    if not ours.has_projections:
        assert not q_ours.requires_grad  # eval returns the codes themselves, as the peer
    for project_out in (True, False):
        torch.testing.assert_close(ours.indices_to_codes(i_ours, project_out=project_out),
                                   peer.indices_to_codes(i_peer, project_out=project_out))


def test_state_dict_round_trips_both_ways():
    peer, ours = make_pair(torch.float32, dim=12, codebook_size=2 ** 5, orthogonal_rotation=True)
    torch.manual_seed(5)
    other = vqp_lfq.LFQ(dim=12, codebook_size=2 ** 5, orthogonal_rotation=True)
    other.load_state_dict(ours.state_dict(), strict=True)
    x = grid_input((2, 12, 3, 3), 1.0, torch.float32)
    torch.testing.assert_close(other.eval()(x).quantized, ours.eval()(x).quantized)


# ---- Open-MAGVIT2 option set -----------------------------------------------------------------


def magvit2_reference_indices(x, factorized_bits):
    """Open-MAGVIT2's index rule written out: channel j of a (sub-)codebook is bit j (LSB-first)."""
    bits = (x.movedim(1, -1) > 0).long()  # (b, ..., K)
    out, start = [], 0
    for width in factorized_bits:
        out.append((bits[..., start:start + width] << torch.arange(width)).sum(-1))
        start += width
    return out


def test_lsb_first_and_token_factorization():
    x = grid_input((2, 18, 2, 3, 3), 1.0, torch.float32)
    msb = LFQ(codebook_size=2 ** 18).eval()(x).indices
    lsb = LFQ(codebook_size=2 ** 18, lsb_first=True).eval()(x).indices
    assert torch.equal(lsb, magvit2_reference_indices(x, [18])[0])
    assert torch.equal(ops.msb_to_lsb(msb, 18), lsb)
    fact = LFQ(codebook_size=2 ** 18, lsb_first=True, token_factorization=True, factorized_bits=[9, 9]).eval()
    parts = fact(x).indices
    assert isinstance(parts, tuple) and len(parts) == 2
    for got, want in zip(parts, magvit2_reference_indices(x, [9, 9])):
        assert got.dtype == torch.int64 and torch.equal(got, want)
    assert torch.equal(join_factorized_indices(parts, [9, 9], lsb_first=True), lsb)
    torch.testing.assert_close(fact.indices_to_codes(parts), LFQ(codebook_size=2 ** 18).indices_to_codes(msb))
    torch.testing.assert_close(fact.indices_to_codes(parts), torch.where(x > 0, 1.0, -1.0))


@pytest.mark.parametrize("bits,lsb_first", list(itertools.product([[9, 9], [3, 5, 2], [1, 1]], [False, True])))
def test_join_split_round_trip(bits, lsb_first):
    K = sum(bits)
    full = torch.randint(0, 2 ** K, (4, 7), generator=torch.Generator().manual_seed(K))
    parts = split_factorized_indices(full, bits, lsb_first)
    assert all(p.max() < 2 ** w for p, w in zip(parts, bits))
    assert torch.equal(join_factorized_indices(parts, bits, lsb_first), full)
    # MSB-first: the first sub-codebook holds the top bits
    if not lsb_first:
        assert torch.equal(parts[0], full >> (K - bits[0]))


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="codebook_size"):
        LFQ(codebook_size=1000)
    with pytest.raises(ValueError, match="factorized_bits"):
        LFQ(codebook_size=2 ** 8, token_factorization=True, factorized_bits=[4, 5])
    with pytest.raises(ValueError, match="entropy_method"):
        LFQ(codebook_size=2 ** 30)
    with pytest.raises(ValueError, match="expected dimension 8"):
        LFQ(codebook_size=2 ** 8)(torch.randn(2, 9, 4, 4))
    with pytest.raises(ValueError, match="parts"):
        join_factorized_indices([torch.zeros(3, dtype=torch.long)], [2, 2])
    with pytest.raises(ValueError, match="2\\^4"):
        split_factorized_indices(torch.tensor([16]), [2, 2])


def test_large_codebook_without_materialising_it():
    """2^24 codes: the peer would build a 2^24 x 24 codebook and an N x 2^24 softmax."""
    lfq = LFQ(dim=32, codebook_size=2 ** 24, entropy_loss_weight=0.1).train()
    x = torch.randn(2, 32, 4, 4, requires_grad=True)
    q, idx, aux = lfq(x)
    aux.backward()
    assert idx.shape == (2, 4, 4) and int(idx.max()) < 2 ** 24 and torch.isfinite(aux)
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ---- a training loop written for the peer -----------------------------------------------------


def peer_style_training(LFQ, steps=6):
    """A loop as one writes it for vector-quantize-pytorch (its README's usage); only the
    class differs between the two runs."""
    torch.manual_seed(0)
    encoder = nn.Conv2d(3, 16, 3, padding=1)
    quantizer = LFQ(codebook_size=2 ** 10, dim=16, entropy_loss_weight=0.1, diversity_gamma=1.0,
                    commitment_loss_weight=0.25)
    decoder = nn.Conv2d(16, 3, 3, padding=1)
    params = [*encoder.parameters(), *quantizer.parameters(), *decoder.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    losses = []
    for _ in range(steps):
        quantized, indices, entropy_aux_loss = quantizer(encoder(images), inv_temperature=10.0)
        assert indices.shape == (4, 16, 16) and indices.dtype == torch.int64
        loss = (decoder(quantized) - images).abs().mean() + entropy_aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    quantizer.eval()
    codes = quantizer.indices_to_codes(quantizer(encoder(images)).indices)
    return losses, codes


def test_peer_training_loop_runs_unchanged():
    peer_losses, peer_codes = peer_style_training(vqp_lfq.LFQ)
    our_losses, our_codes = peer_style_training(LFQ)
    # same trajectory up to fp32 rounding and the peer's 1e-5 clamp (small at inv_temperature=10)
    assert our_losses == pytest.approx(peer_losses, rel=1e-3)
    torch.testing.assert_close(our_codes, peer_codes, rtol=1e-3, atol=1e-3)
