"""LFQ: a drop-in for vector-quantize-pytorch's ``LFQ`` (pinned 1.32.0) on pyratok's ops.

``from pyratok.nn import LFQ`` in place of ``from vector_quantize_pytorch import LFQ``: the same
constructor arguments, the same ``forward(x, inv_temperature=100., return_loss_breakdown=False,
mask=None)`` returning ``(quantized, indices, aux_loss)`` (and ``LossBreakdown`` with
``return_loss_breakdown``), the same parameter and buffer names (a peer checkpoint loads with
``strict=True``) and the same ``indices_to_codes``.  What changes underneath:

* the entropy aux loss never builds the (tokens x 2^K) softmax: the per-token code distribution
  factorises into bits, and the batch distribution is the half-split GEMM of
  :func:`pyratok.ops.codebook_entropy` (DESIGN.md §2.2), so K = 18..24 fits in memory and K = 16
  is orders of magnitude faster; there is no ``codebook`` buffer of 2^K x K floats;
* the entropy is exact.  The peer clamps ``log p`` at 1e-5 (``log(t, eps=1e-5)``), so its
  per-sample entropy and gradients drift from the true entropy once code probabilities drop
  below 1e-5 (always, at its default ``inv_temperature=100``); ours equals the peer with that
  clamp removed, evaluated in float64, to fp32 rounding (tests/test_lfq_dropin.py);
* the straight-through output is ``quantized + (a - sg(a))`` rather than ``a + sg(quantized - a)``:
  the value is exactly ``+-scale`` (the peer's differs from it by fp32 rounding), the gradient is
  the same;
* indices are computed with integer shifts (int64, exact for every K up to 63).

Open-MAGVIT2 option set: ``lsb_first=True`` numbers codes LSB-first (channel 0 is bit 0, as in
Open-MAGVIT2; the peer and pyratok are MSB-first), and ``token_factorization=True`` with
``factorized_bits=[9, 9]`` returns one index tensor per sub-codebook (a tuple), as Open-MAGVIT2's
factorised tokens; :func:`join_factorized_indices` / :func:`split_factorized_indices` convert
between sub-codebook ids and full-codebook ids in either bit order.
"""

from __future__ import annotations

import math
from collections import namedtuple
from contextlib import nullcontext
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pyratok import ops
from pyratok.ops._checks import MAX_INDEX_BITS, check_indices
from pyratok.reference import entropy as ref_entropy

# the peer's field names, so code that reads ret.quantized / breakdown.batch_entropy keeps working
Return = namedtuple("Return", ["quantized", "indices", "entropy_aux_loss"])
LossBreakdown = namedtuple("LossBreakdown", ["per_sample_entropy", "batch_entropy", "commitment"])


# ---------------------------------------------------------------------------------------
# sub-codebook ids (Open-MAGVIT2 token factorisation)


def _check_factorized_bits(factorized_bits, total: Optional[int] = None) -> list[int]:
    if isinstance(factorized_bits, (str, bytes)) or not isinstance(factorized_bits, Sequence):
        raise TypeError(f"factorized_bits: expected a sequence of ints, got {type(factorized_bits).__name__}")
    bits = list(factorized_bits)
    if not bits or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in bits):
        raise ValueError(f"factorized_bits={factorized_bits!r}: expected positive ints")
    if sum(bits) > MAX_INDEX_BITS:
        raise ValueError(f"factorized_bits={factorized_bits!r}: the full index holds at most {MAX_INDEX_BITS} bits")
    if total is not None and sum(bits) != total:
        raise ValueError(f"factorized_bits={factorized_bits!r} sums to {sum(bits)}, "
                         f"expected log2(codebook_size)={total}")
    return bits


def _shifts(bits: list[int], lsb_first: bool) -> list[int]:
    """Bit offset of each sub-codebook id inside the full id.  Sub-codebook i holds channels
    [sum(bits[:i]), sum(bits[:i+1])).  MSB-first: channel 0 is the top bit, so sub-codebook 0
    sits highest; LSB-first: channel 0 is bit 0, so sub-codebook 0 sits lowest."""
    if lsb_first:
        return [sum(bits[:i]) for i in range(len(bits))]
    return [sum(bits[i + 1:]) for i in range(len(bits))]


def join_factorized_indices(parts: Sequence[torch.Tensor], factorized_bits: Sequence[int],
                            lsb_first: bool = False) -> torch.Tensor:
    """Sub-codebook ids (one tensor per sub-codebook, equal shapes) -> full-codebook ids (int64).

    Sub-codebook i covers channels [sum(bits[:i]), sum(bits[:i+1])) and numbers them in the same
    bit order (MSB-first by default, LSB-first for Open-MAGVIT2) as the full id.
    """
    bits = _check_factorized_bits(factorized_bits)
    if len(parts) != len(bits):
        raise ValueError(f"parts: expected {len(bits)} tensors (one per factorized_bits entry), got {len(parts)}")
    full = None
    for i, (part, width, shift) in enumerate(zip(parts, bits, _shifts(bits, lsb_first))):
        check_indices(part, width, name=f"parts[{i}]")
        term = part.to(torch.int64) << shift
        if full is not None and term.shape != full.shape:
            raise ValueError(f"parts[{i}]: shape {tuple(term.shape)} differs from parts[0] {tuple(full.shape)}")
        full = term if full is None else full | term
    return full


def split_factorized_indices(indices: torch.Tensor, factorized_bits: Sequence[int],
                             lsb_first: bool = False) -> tuple[torch.Tensor, ...]:
    """Full-codebook ids -> one int64 tensor of sub-codebook ids per ``factorized_bits`` entry;
    the inverse of :func:`join_factorized_indices`."""
    bits = _check_factorized_bits(factorized_bits)
    check_indices(indices, sum(bits))
    indices = indices.to(torch.int64)
    return tuple((indices >> shift) & ((1 << width) - 1) for width, shift in zip(bits, _shifts(bits, lsb_first)))


# ---------------------------------------------------------------------------------------
# the module


class CosineSimLinear(nn.Module):
    """The peer's cosine-similarity projection (same parameter name and shape: ``weight``
    (dim_in, dim_out))."""

    def __init__(self, dim_in: int, dim_out: int, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.randn(dim_in, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=0)) * self.scale


def _distributed_group():
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


class LFQ(nn.Module):
    """Lookup-free quantization (MAGVIT-v2), argument-compatible with vector-quantize-pytorch.

    forward(x): x (B, D, ...) channel-first images/videos (``x.ndim >= 4`` or
    ``channel_first=True``) or (B, N, D) sequences ->
    ``Return(quantized like x, indices, aux_loss)``.  indices: int64, (B, ...) for one codebook,
    (B, ..., num_codebooks) for several (a tuple of those, one per sub-codebook, with
    ``token_factorization``).  aux_loss = entropy_loss_weight * (E H(p_n) - diversity_gamma * H(q))
    + commitment_loss_weight * ||x - sg(q)||^2 in training, 0 in eval.

    Arguments beyond the peer's:
      lsb_first: number codes LSB-first (Open-MAGVIT2) instead of MSB-first.
      token_factorization, factorized_bits: return the sub-codebook ids of consecutive channel
        groups (Open-MAGVIT2's [9, 9] for 2^18 codes) instead of full ids.
      entropy_method, entropy_group_size: "exact" (default, log2(codebook_size) <= 24) or the
        upper bounds "groups" / "bits" of :func:`pyratok.ops.codebook_entropy` for larger codebooks.
      backend: pyratok backend for the ops (None = automatic).
    """

    def __init__(self, *, dim: Optional[int] = None, codebook_size: Optional[int] = None,
                 entropy_loss_weight: float = 0.1, commitment_loss_weight: float = 0.0,
                 diversity_gamma: float = 1.0, straight_through_activation: nn.Module = nn.Identity(),
                 num_codebooks: int = 1, keep_num_codebooks_dim: Optional[bool] = None,
                 codebook_scale: float = 1.0, frac_per_sample_entropy: float = 1.0,
                 has_projections: Optional[bool] = None, projection_has_bias: bool = True,
                 soft_clamp_input_value: Optional[float] = None, cosine_sim_project_in: bool = False,
                 cosine_sim_project_in_scale: Optional[float] = None, channel_first: Optional[bool] = None,
                 experimental_softplus_entropy_loss: bool = False, entropy_loss_offset: float = 5.0,
                 spherical: bool = False, force_quantization_f32: bool = True,
                 orthogonal_rotation: bool = False,
                 lsb_first: bool = False, token_factorization: bool = False,
                 factorized_bits: Optional[Sequence[int]] = None,
                 entropy_method: str = "exact", entropy_group_size: Optional[int] = None,
                 backend: Optional[str] = None):
        super().__init__()
        if dim is None and codebook_size is None:
            raise ValueError("dim, codebook_size: give at least one (codebook_size defaults to 2^dim)")
        if codebook_size is None:
            codebook_size = 2 ** dim
        if isinstance(codebook_size, bool) or not isinstance(codebook_size, int) or codebook_size < 2 \
                or codebook_size & (codebook_size - 1):
            numeric = isinstance(codebook_size, (int, float))
            suggestion = 2 ** math.ceil(math.log2(max(codebook_size, 2))) if numeric else 2
            raise ValueError(f"codebook_size={codebook_size!r}: expected a power of 2 >= 2 for lookup-free "
                             f"quantization (suggested {suggestion})")
        codebook_dim = codebook_size.bit_length() - 1
        if codebook_dim > MAX_INDEX_BITS:
            raise ValueError(f"codebook_size=2^{codebook_dim}: indices hold at most {MAX_INDEX_BITS} bits")
        if isinstance(num_codebooks, bool) or not isinstance(num_codebooks, int) or num_codebooks < 1:
            raise ValueError(f"num_codebooks={num_codebooks!r}: expected a positive int")
        codebook_dims = codebook_dim * num_codebooks
        dim = codebook_dims if dim is None else dim
        has_projections = dim != codebook_dims if has_projections is None else has_projections
        if not has_projections and dim != codebook_dims:
            raise ValueError(f"has_projections=False needs dim == log2(codebook_size) * num_codebooks "
                             f"= {codebook_dims}, got dim={dim}")
        keep_num_codebooks_dim = num_codebooks > 1 if keep_num_codebooks_dim is None else keep_num_codebooks_dim
        if num_codebooks > 1 and not keep_num_codebooks_dim:
            raise ValueError("keep_num_codebooks_dim=False: needs num_codebooks == 1")
        if not 0 < frac_per_sample_entropy <= 1:
            raise ValueError(f"frac_per_sample_entropy={frac_per_sample_entropy}: expected 0 < value <= 1")
        if soft_clamp_input_value is not None and soft_clamp_input_value < codebook_scale:
            raise ValueError(f"soft_clamp_input_value={soft_clamp_input_value}: expected >= codebook_scale "
                             f"({codebook_scale})")
        self.factorized_bits = None
        if token_factorization:
            self.factorized_bits = _check_factorized_bits(
                [codebook_dim // 2, codebook_dim - codebook_dim // 2] if factorized_bits is None else factorized_bits,
                codebook_dim)
        elif factorized_bits is not None:
            raise ValueError("factorized_bits: only used with token_factorization=True")
        if entropy_method == "exact" and codebook_dim > ref_entropy.MAX_EXACT_BITS:
            raise ValueError(f"codebook_size=2^{codebook_dim}: the exact codebook entropy supports up to "
                             f"2^{ref_entropy.MAX_EXACT_BITS} codes; pass entropy_method='groups' with "
                             "entropy_group_size, or 'bits' (upper bounds)")
        if entropy_method == "groups" and num_codebooks > 1 and (
                not isinstance(entropy_group_size, int) or codebook_dim % entropy_group_size):
            raise ValueError(f"entropy_group_size={entropy_group_size!r}: with num_codebooks > 1 it must divide "
                             f"log2(codebook_size)={codebook_dim}")

        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.num_codebooks = num_codebooks
        self.dim = dim
        self.has_projections = has_projections
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self.channel_first = channel_first
        self.activation = straight_through_activation
        self.spherical = spherical
        self.codebook_scale = codebook_scale
        self.frac_per_sample_entropy = frac_per_sample_entropy
        self.diversity_gamma = diversity_gamma
        self.entropy_loss_weight = entropy_loss_weight
        self.commitment_loss_weight = commitment_loss_weight
        self.soft_clamp_input_value = soft_clamp_input_value
        self.entropy_loss_offset = entropy_loss_offset
        self.experimental_softplus_entropy_loss = experimental_softplus_entropy_loss
        self.force_quantization_f32 = force_quantization_f32
        self.orthogonal_rotation = orthogonal_rotation
        self.lsb_first = lsb_first
        self.token_factorization = token_factorization
        self.entropy_method = entropy_method
        self.entropy_group_size = entropy_group_size
        self.backend = backend

        # modules in the peer's order, so one seed gives the peer's initial weights
        if cosine_sim_project_in:
            scale = codebook_scale if cosine_sim_project_in_scale is None else cosine_sim_project_in_scale
            self.project_in = CosineSimLinear(dim, codebook_dims, scale) if has_projections else nn.Identity()
        else:
            self.project_in = nn.Linear(dim, codebook_dims, bias=projection_has_bias) if has_projections \
                else nn.Identity()
        self.project_out = nn.Linear(codebook_dims, dim, bias=projection_has_bias) if has_projections \
            else nn.Identity()
        if orthogonal_rotation:
            rotation = torch.empty(codebook_dim, codebook_dim)
            nn.init.orthogonal_(rotation)
            self.register_buffer("orthogonal_rot", rotation)
        # the peer's persistent buffer (its bit weights), kept so that its state dicts load strictly;
        # indices here come from integer shifts, not from this
        self.register_buffer("mask", 2 ** torch.arange(codebook_dim - 1, -1, -1))
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)

    # -----------------------------------------------------------------------------------
    # codes

    @property
    def code_value(self) -> float:
        """The magnitude of each code entry: codebook_scale, over sqrt(codebook_dim) when spherical."""
        return self.codebook_scale / math.sqrt(self.codebook_dim) if self.spherical else self.codebook_scale

    @property
    def dtype(self) -> torch.dtype:
        return self.zero.dtype

    @property
    def codebook(self) -> torch.Tensor:
        """The (2^K, K) codebook, built on demand (the peer keeps it as a buffer); K <= 20."""
        if self.codebook_dim > 20:
            raise ValueError(f"codebook: 2^{self.codebook_dim} x {self.codebook_dim} codes are too many to "
                             "materialise; use indices_to_codes on the indices you need")
        all_codes = torch.arange(self.codebook_size, device=self.zero.device)
        return self.bits_to_codes(ops.indices_to_bits(all_codes, self.codebook_dim, backend=self.backend).float())

    def bits_to_codes(self, bits: torch.Tensor) -> torch.Tensor:
        return bits * self.codebook_scale * 2 - self.codebook_scale

    def _msb_indices(self, indices) -> torch.Tensor:
        """Forward's indices (LSB-first or factorised as configured) -> MSB-first full ids."""
        if self.token_factorization:
            if isinstance(indices, torch.Tensor):
                raise TypeError("indices: token_factorization=True expects the tuple of sub-codebook ids forward "
                                "returns (join_factorized_indices gives full ids)")
            indices = join_factorized_indices(indices, self.factorized_bits, self.lsb_first)
        if self.lsb_first:
            indices = ops.lsb_to_msb(indices.to(torch.int64), self.codebook_dim, backend=self.backend)
        return indices

    def indices_to_codes(self, indices, project_out: bool = True) -> torch.Tensor:
        """indices as forward returns them -> codes (channel-first for images/videos, as the peer)."""
        indices = self._msb_indices(indices)
        is_img_or_video = indices.dim() >= 3 + int(self.keep_num_codebooks_dim)
        should_transpose = is_img_or_video if self.channel_first is None else self.channel_first
        if not self.keep_num_codebooks_dim:
            indices = indices.unsqueeze(-1)
        codes = ops.indices_to_codes(indices, self.codebook_dim, dim=-1, dtype=self.dtype,
                                     backend=self.backend) * self.code_value  # (..., c, d)
        if self.orthogonal_rotation:
            codes = codes @ self.orthogonal_rot.t()
        codes = codes.flatten(-2)  # (..., c d)
        if project_out:
            codes = self.project_out(codes)
        if should_transpose:
            codes = codes.movedim(-1, 1)
        return codes

    # -----------------------------------------------------------------------------------
    # forward

    def _entropies(self, x: torch.Tensor, inv_temperature: float):
        """x (M, c, d) in the quantization dtype -> (per-sample entropy, mean codebook entropy)."""
        kw = dict(inv_temperature=inv_temperature, scale=self.code_value, dim=-1, backend=self.backend)
        per_sample = ops.per_sample_entropy(x, **kw)
        c, d = self.num_codebooks, self.codebook_dim
        if self.entropy_method == "exact" and c > 1:
            method, group_size = "groups", d  # each codebook exactly, summed
        else:
            method, group_size = self.entropy_method, self.entropy_group_size
        batch = ops.codebook_entropy(x.reshape(x.shape[0], c * d), method=method, group_size=group_size,
                                     process_group=_distributed_group(), **kw)
        return per_sample, batch / c

    def forward(self, x: torch.Tensor, inv_temperature: float = 100.0, return_loss_breakdown: bool = False,
                mask: Optional[torch.Tensor] = None):
        """x: (b, d, ...) channel-first or (b, n, d); mask: (b, n) bool (n = the flattened positions)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x: expected a float tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        is_img_or_video = x.dim() >= 4
        should_transpose = is_img_or_video if self.channel_first is None else self.channel_first
        if should_transpose:
            x = x.movedim(1, -1)
            positions = x.shape[1:-1]
            x = x.reshape(x.shape[0], -1, x.shape[-1])  # (b, n, d)
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected dimension {self.dim} on the {'channel' if should_transpose else 'last'} "
                             f"axis, got shape {tuple(x.shape)}")
        x = self.project_in(x)
        if self.soft_clamp_input_value is not None:
            clamp = self.soft_clamp_input_value
            x = (x / clamp).tanh() * clamp
        x = x.unflatten(-1, (self.num_codebooks, self.codebook_dim))  # (b, n, c, d)
        if self.orthogonal_rotation:
            x = x @ self.orthogonal_rot
        if self.spherical:
            x = F.normalize(x, dim=-1) * self.codebook_scale

        force_f32 = self.force_quantization_f32
        context = torch.autocast(x.device.type, enabled=False) if force_f32 and x.device.type == "cuda" \
            else nullcontext()
        with context:
            orig_dtype = x.dtype
            if force_f32:
                x = x.float()
            original_input = x
            signs, indices = ops.binary_quantize(x.detach(), dim=-1, backend=self.backend)[:2]
            quantized = signs * self.code_value
            indices = indices.to(torch.int64)  # (b, n, c), MSB-first
            if self.training:
                soft = self.activation(x)
                x = quantized + (soft - soft.detach())
            else:
                x = quantized

            if self.training:
                entropy_input = original_input if mask is None else original_input[self._flat_mask(mask, x)]
                entropy_input = entropy_input.reshape(-1, self.num_codebooks, self.codebook_dim)  # (M, c, d)
                if self.frac_per_sample_entropy < 1:
                    # the peer's sampling, draw for draw (same RNG calls, so the same tokens)
                    tokens = entropy_input.shape[0]
                    keep = torch.randn(tokens).argsort(dim=-1) < int(tokens * self.frac_per_sample_entropy)
                    entropy_input = entropy_input[keep.to(entropy_input.device)]
                per_sample_entropy, codebook_entropy = self._entropies(entropy_input, inv_temperature)
                entropy_aux_loss = per_sample_entropy - self.diversity_gamma * codebook_entropy
                if self.experimental_softplus_entropy_loss:
                    entropy_aux_loss = F.softplus(entropy_aux_loss + self.entropy_loss_offset)
            else:
                entropy_aux_loss = per_sample_entropy = codebook_entropy = self.zero
            if self.training and self.commitment_loss_weight > 0:
                commit_loss = F.mse_loss(original_input, quantized, reduction="none")
                if mask is not None:
                    commit_loss = commit_loss[self._flat_mask(mask, x)]
                commit_loss = commit_loss.mean()
            else:
                commit_loss = self.zero
            if force_f32:
                x = x.to(orig_dtype)

        if self.orthogonal_rotation:
            x = x @ self.orthogonal_rot.t()
        x = self.project_out(x.flatten(-2))  # (b, n, dim)
        if should_transpose:
            x = x.reshape(x.shape[0], *positions, x.shape[-1]).movedim(-1, 1)
            indices = indices.reshape(indices.shape[0], *positions, indices.shape[-1])
        indices = self._public_indices(indices)
        aux_loss = entropy_aux_loss * self.entropy_loss_weight + commit_loss * self.commitment_loss_weight
        ret = Return(x, indices, aux_loss)
        if not return_loss_breakdown:
            return ret
        return ret, LossBreakdown(per_sample_entropy, codebook_entropy, commit_loss)

    def _flat_mask(self, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask: expected a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        b, n = x.shape[:2]
        if mask.numel() != b * n or mask.shape[0] != b:
            raise ValueError(f"mask: expected (batch, positions) = ({b}, {n}) (or the unflattened positions), "
                             f"got shape {tuple(mask.shape)}")
        return mask.reshape(b, n).to(x.device)

    def _public_indices(self, indices: torch.Tensor):
        """(..., c) MSB-first int64 -> the configured order / factorisation / codebook axis."""
        if self.lsb_first:
            indices = ops.msb_to_lsb(indices, self.codebook_dim, backend=self.backend).to(torch.int64)
        if not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)
        if self.token_factorization:
            return split_factorized_indices(indices, self.factorized_bits, self.lsb_first)
        return indices

    def extra_repr(self) -> str:
        extra = ", lsb_first=True" if self.lsb_first else ""
        if self.token_factorization:
            extra += f", factorized_bits={self.factorized_bits}"
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, num_codebooks={self.num_codebooks}, "
                f"spherical={self.spherical}{extra}")
