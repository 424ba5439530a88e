"""PyraTok's training losses as named, weighted, switchable terms (DESIGN.md §3, Losses).

    total = w_recon * recon + w_codebook * codebook + w_ar * ar + w_drift * drift
    recon    = l1 + ssim_weight * (1 - SSIM) + lpips_weight * LPIPS   (LPIPS with local weights only)
    codebook = sum over levels l of
               commitment  ||z_l - sg(c_l)||^2
             + entropy     E H(p_l) - gamma H(q_l)      (pyratok.ops.lfq_entropy_loss, exact up to K=24)
             + hierarchy   KL(p_l || sg(up(p_(l-1))))   (l > 0; coarse-to-fine consistency)
             + text_token  KL(p_l || sg(p_text,l))
             + text_code   KL(p_text,l || sg(usage_l))
    ar       = the prior's bitwise BCE of all levels given text and earlier levels
    drift    = mean squared distance of the LoRA encoder's tap features to the frozen encoder's
               (needs a second, frozen pass of the encoder's convolutional part; computed lazily,
               as StyleGAN2 does its R1 penalty: on training steps that are multiples of
               drift_every, weighted drift_every x, which keeps the expected gradient and cuts
               the pass's cost by drift_every; a forward call without a step computes it always)

p_l = sigmoid(4 tau z_l) are the bit probabilities of level l's pre-quantization values
(the same distribution the entropy term uses); p_text,l = sigmoid(text head); usage_l is the
per-bit frequency of level l's codes in the batch.  Paper weights: 2.5 / 2.5 / 1.5 / 0.6.
A term with weight 0 is not computed, so it sends no gradient anywhere.
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


def codebook_terms(lapq_out, cfg: LossConfig, process_group=None) -> dict[str, Optional[torch.Tensor]]:
    """Per-term sums over levels of the codebook loss (unweighted inside each term)."""
    K = lapq_out.codes[0].shape[1]
    method = cfg.entropy_method if cfg.entropy_method != "auto" else ("exact" if K <= 24 else "groups")
    terms: dict[str, Optional[torch.Tensor]] = {k: None for k in
                                                ("commitment", "entropy", "hierarchy", "text_token", "text_code")}

    def add(name, value):
        terms[name] = value if terms[name] is None else terms[name] + value

    for l, (z, c) in enumerate(zip(lapq_out.logits, lapq_out.codes)):
        logits = _bit_logits(z, cfg.inv_temperature)
        if cfg.commitment:
            add("commitment", F.mse_loss(z.float(), c.detach().float()))
        if cfg.entropy:
            add("entropy", ops.lfq_entropy_loss(z, 1.0, cfg.entropy_gamma, method, process_group,
                                                inv_temperature=cfg.inv_temperature,
                                                group_size=None if method == "exact" else 16).loss)
        if cfg.hierarchy and l > 0:
            coarse = _bit_logits(lapq_out.logits[l - 1], cfg.inv_temperature).detach()
            up = F.interpolate(coarse, size=z.shape[2:], mode="nearest")
            add("hierarchy", ops.bernoulli_kl(logits, up))
        text_logits = None if lapq_out.text_logits is None else lapq_out.text_logits[l]
        if text_logits is not None and cfg.text_token:
            add("text_token", ops.bernoulli_kl(logits, text_logits.detach().float()))
        if text_logits is not None and cfg.text_code:
            usage = (c.detach() > 0).float().mean(dim=(0, 2, 3, 4)).clamp(1e-4, 1 - 1e-4)       # (K,)
            usage_logits = torch.logit(usage).view(1, -1, 1, 1, 1).expand_as(text_logits)
            add("text_code", ops.bernoulli_kl(text_logits.float(), usage_logits.contiguous()))
    return terms


def codebook_total(terms: dict[str, Optional[torch.Tensor]], cfg: LossConfig) -> Optional[torch.Tensor]:
    parts = [getattr(cfg, name) * v for name, v in terms.items() if v is not None]
    return sum(parts) if parts else None
