"""PyraTok's training losses as named, weighted, switchable terms (DESIGN.md §3, Losses).

    total = w_recon * recon + w_codebook * codebook + w_ar * ar + w_drift * drift
    recon    = l1 + ssim_weight * (1 - SSIM) + lpips_weight * LPIPS   (LPIPS with local weights only)
    codebook = sum over levels l of
               commitment  ||z_l - sg(c_l)||^2
             + entropy     E H(p_l) - gamma H(q_l)      (pyratok.ops.lfq_entropy_loss, exact up to K=24)
             + hierarchy   KL(sg(up(p_(l-1))) || p_l)   (l > 0; coarse-to-fine consistency)
             + residual    ||sg(r_l) - phi_l(up(sg(c_l)))||^2  (each level's lift fits the residual it
                                                       quantizes; trains phi_l only; off by default)
             + text_token  KL(p_text,l || p_l)          (tokens <-> the caption's predicted bits)
             + text_code   KL(sg(u_l) || p_text,l)      (the text head <- the codewords a clip uses)
    ar       = the prior's bitwise BCE of all levels given text and earlier levels
    drift    = mean squared distance of the LoRA encoder's tap features to the frozen encoder's
               (needs a second, frozen pass of the encoder's convolutional part; computed lazily,
               as StyleGAN2 does its R1 penalty: on training steps that are multiples of
               drift_every, weighted drift_every x, which keeps the expected gradient and cuts
               the pass's cost by drift_every; a forward call without a step computes it always)

p_l = sigmoid(4 tau z_l) are the bit probabilities of level l's pre-quantization values
(the same distribution the entropy term uses); p_text,l = sigmoid(head_l(sg(e_t))) are the bit
probabilities the level's text head predicts from the frozen caption embedding e_t (one K-vector
per clip, pyratok.models.lapq); u_l is the per-bit frequency of the hard codes each clip uses.  Paper weights: 2.5 / 2.5 / 1.5 / 0.6.  A term with weight 0 is not computed, so
it sends no gradient anywhere.

Our reading of the paper's Eq. 2 (README, "How pyratok reads the paper"):
* the stop-gradient is on the text embedding only.  The alignment terms therefore train the text
  head to predict a clip's code bits from its caption, and pull the tokens (and, through the
  straight-through codes, the codewords the clip uses) toward that prediction.  A target that is
  the same for every caption (the batch's bit usage) would carry no language.
* the KLs that pull the soft assignments p toward a target r are taken as KL(r || p), with p
  second.  KL(p || r) = CE(p, r) - H(p): at the per-sample entropy's weight its - H(p) cancels
  that term's sharpening (it pushes every p back toward 1/2), while KL(r || p) = CE(r, p) - H(r)
  has no H(p) in it, so the entropy term alone decides how sharp p is; it is still minimised at
  p = r (a cross-entropy CE(p, r) would not be: it drives p to 0/1 on r's side, and with the
  straight-through codes that runs away, which we measured: every logit saturates on one code).
* text_code trains the head toward the bits of the codewords a clip actually uses, KL(sg(u) || r);
  the codewords move through text_token (the tokens choose them).  Pulling the hard codes
  themselves through the straight-through estimator is a pressure that does not fade as the
  codes agree, and it saturated the logits in the same measurement.
* text_code's mean over clips is taken over the whole data-parallel batch (sum and count are
  all-reduced, like the entropy statistics), so R ranks give the single-process value.
* terms that need a caption (text_token, text_code) are computed only for clips that have one.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F

from pyratok import ops


@dataclass
class LossConfig:
    recon: float = 2.5
    codebook: float = 2.5
    ar: float = 1.5
    drift: float = 0.6
    drift_every: int = 4                  # lazy drift: on every n-th training step, weighted n x (1 = every step)
    # inside recon
    l1: float = 1.0
    ssim: float = 1.0
    lpips: float = 1.0                    # used only when LPIPS weights are loaded
    # inside codebook (per level, summed over levels)
    commitment: float = 0.25
    entropy: float = 0.1
    entropy_gamma: float = 1.0            # codebook-entropy weight relative to per-sample entropy
    entropy_method: str = "auto"          # "exact" up to K=24, then "groups"
    inv_temperature: float = 1.0          # tau in p = sigmoid(4 tau z)
    hierarchy: float = 0.1
    # residual fit (not in the paper's Eq. 2, off by default): without it nothing ties a level's
    # learned lift phi_l to the residual r_l it quantizes, and the residuals stop meaning anything
    # (measured on the bundled model's run: the latent error grew with every level).  The codes
    # are detached: the term trains the lifts phi_l only (a least-squares fit, like a VQ codebook
    # loss); letting it reach the bits through the straight-through codes diverged within 400
    # steps when the encoder trained too.  The bundled default model trains with residual = 1.0.
    residual: float = 0.0
    text_token: float = 0.1
    text_code: float = 0.1

    def __post_init__(self):
        if not isinstance(self.drift_every, int) or self.drift_every < 1:
            raise ValueError(f"drift_every={self.drift_every!r}: expected an int >= 1 (1 = every step)")
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and v < 0:
                raise ValueError(f"loss weight {f.name}={v}: weights are >= 0 (0 switches a term off)")


@dataclass
class LossBreakdown:
    """Every computed term's unweighted value (terms switched off are absent) and the weighted total."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    indices: Optional[list[torch.Tensor]] = None   # per-level token ids of the batch (for usage stats)

    def scalars(self) -> dict[str, float]:
        return {"total": float(self.total.detach())} | {k: float(v.detach()) for k, v in self.terms.items()}


def _bit_logits(z: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    return 4.0 * inv_temperature * z.float()


def bernoulli_kl_from_probability(u: torch.Tensor, r_logits: torch.Tensor) -> torch.Tensor:
    """Per-row KL(u || r) over the last axis, for probabilities u that may be exactly 0 or 1
    (0 log 0 = 0) and logits r: sum_k [u log u + (1-u) log(1-u)] + softplus(r) - u r."""
    neg_entropy = torch.xlogy(u, u) + torch.xlogy(1 - u, 1 - u)
    return (neg_entropy + F.softplus(r_logits) - u * r_logits).sum(-1)


def _group_mean(values: torch.Tensor, process_group=None) -> torch.Tensor:
    """Mean of ``values`` over the whole data-parallel batch: sum and count all-reduced (each
    rank's gradient is R times its slice of the single-process gradient, as for the entropy
    statistics, so the gradient DDP averages over the R ranks is the single-process one)."""
    total, count = values.sum(), values.numel()
    if process_group is None:
        return total / count
    from pyratok.ops.entropy import _global_sum

    total, count = _global_sum(total, count, process_group)
    return total / count.clamp_min(1)


CODEBOOK_TERMS = ("commitment", "entropy", "hierarchy", "residual", "text_token", "text_code")


def codebook_terms(lapq_out, cfg: LossConfig, process_group=None,
                   has_text: Optional[torch.Tensor] = None, lapq=None) -> dict[str, Optional[torch.Tensor]]:
    """Per-term sums over levels of the codebook loss (unweighted inside each term).

    lapq: the LaPQ that made lapq_out (its lifts phi_l), needed by the residual term only.

    has_text: (B,) bool, the clips that have a caption (None: all of them); the text terms use
    only those, and are absent when none has one."""
    K = lapq_out.codes[0].shape[1]
    method = cfg.entropy_method if cfg.entropy_method != "auto" else ("exact" if K <= 24 else "groups")
    terms: dict[str, Optional[torch.Tensor]] = dict.fromkeys(CODEBOOK_TERMS)
    if cfg.residual and lapq is None:
        raise ValueError("LossConfig.residual > 0 needs the LaPQ (codebook_terms(..., lapq=model.lapq))")

    def add(name, value):
        terms[name] = value if terms[name] is None else terms[name] + value

    # the clips the text terms use: all of them (no copy) unless some have no caption
    local = has_text is None or bool(has_text.any())
    rows = slice(None) if has_text is None or bool(has_text.all()) else has_text
    for l, (z, c) in enumerate(zip(lapq_out.logits, lapq_out.codes)):
        logits = _bit_logits(z, cfg.inv_temperature)
        if cfg.commitment:
            add("commitment", F.mse_loss(z.float(), c.detach().float()))
        if cfg.entropy:
            add("entropy", ops.lfq_entropy_loss(z, 1.0, cfg.entropy_gamma, method, process_group,
                                                inv_temperature=cfg.inv_temperature,
                                                group_size=16 if method == "groups" else None).loss)
        if cfg.residual:
            r = lapq_out.residuals[l]
            lift = lapq.blocks[l].lift(c.detach(), tuple(r.shape[2:]))
            add("residual", F.mse_loss(lift.float(), r.detach().float()))
        if cfg.hierarchy and l > 0:
            coarse = _bit_logits(lapq_out.logits[l - 1], cfg.inv_temperature).detach()
            up = F.interpolate(coarse, size=z.shape[2:], mode="nearest")
            add("hierarchy", ops.bernoulli_kl(up, logits))
        text_logits = None if lapq_out.text_logits is None else lapq_out.text_logits[l]
        if text_logits is None:
            continue
        if cfg.text_token and local:                         # per position, then the mean
            p_rows = logits[rows]
            add("text_token", ops.bernoulli_kl(text_logits[rows].float().expand_as(p_rows).contiguous(), p_rows))
        if cfg.text_code and (local or process_group is not None):   # the all-reduce needs every rank
            usage = (c[rows].detach() > 0).float().mean(dim=(2, 3, 4))           # (B', K) per-clip bit usage
            add("text_code", _group_mean(bernoulli_kl_from_probability(usage, text_logits[rows].flatten(1).float()),
                                         process_group))
    return terms


def codebook_total(terms: dict[str, Optional[torch.Tensor]], cfg: LossConfig) -> Optional[torch.Tensor]:
    parts = [getattr(cfg, name) * v for name, v in terms.items() if v is not None]
    return sum(parts) if parts else None
