"""The global autoregressive prior of PyraTok (DESIGN.md §3, Global AR prior).

One causal transformer reads the sequence

    [text tokens][SOI][level 1 tokens][SEP][level 2 tokens] ... [SEP][level L tokens]

(raster order t, h, w inside a level) and predicts each visual token from everything
before it.  A visual token enters as Linear(K -> width) of its straight-through code, so
the loss reaches the quantizer; the head predicts the token's K bits (K logits, BCE), so
the 2^K vocabulary never appears.  Positions: a learned level embedding plus fixed
sine/cosine features of the token's (t, y, x) cell centre in normalised grid units, so a
coarse cell and the fine cells it covers sit at nearby positions.

:class:`ARPrior` is the compact built-in transformer; :class:`HFCausalLMPrior` lets a
local Hugging Face causal LM play the same role through ``inputs_embeds``.  Both share
the sequence layout, the loss and ``sample`` (greedy or with a temperature), so the prior
is also a usable generator of token pyramids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from pyratok.models.text import TextEmbedding

Grid = tuple[int, int, int]


@dataclass
class PriorConfig:
    num_bits: int = 16        # K
    text_dim: int = 384
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    max_levels: int = 8
    dropout: float = 0.0


class PriorOutput(NamedTuple):
    loss: torch.Tensor            # mean BCE over all visual tokens and bits
    logits: list[torch.Tensor]    # per level (B, n_l, K): logits of that level's bits
    targets: list[torch.Tensor]   # per level (B, n_l, K): the bits (0/1 float)


def _sincos(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """(N,) positions -> (N, dim) sine/cosine features (dim even)."""
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=pos.device, dtype=torch.float32) / half)
    angles = pos.float()[:, None] * freq[None] * 64.0
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def grid_positions(grid: Grid, dim: int, device) -> torch.Tensor:
    """(t*h*w, dim) features of each cell centre (t, (y+.5)/h, (x+.5)/w), raster order."""
    t, h, w = grid
    d3 = (dim // 6) * 2
    tt = torch.arange(t, device=device).repeat_interleave(h * w) / 64.0
    yy = ((torch.arange(h, device=device) + 0.5) / h).repeat_interleave(w).repeat(t)
    xx = ((torch.arange(w, device=device) + 0.5) / w).repeat(t * h)
    feats = torch.cat([_sincos(tt, d3), _sincos(yy, d3), _sincos(xx, d3)], dim=-1)
    return F.pad(feats, (0, dim - feats.shape[-1]))


def _check_levels(text: TextEmbedding, codes: Sequence[torch.Tensor], num_bits: int) -> None:
    if len(codes) == 0:
        raise ValueError("codes: expected one (B, K, t, h, w) tensor per level, got none")
    for l, c in enumerate(codes):
        if c.dim() != 5 or c.shape[1] != num_bits:
            raise ValueError(f"codes[{l}]: expected (B, {num_bits}, t, h, w), got {tuple(c.shape)}")
        if c.shape[0] != text.batch_size:
            raise ValueError(f"codes[{l}]: batch {c.shape[0]} does not match the text batch {text.batch_size}")


class _PriorBase(nn.Module):
    """Sequence layout, loss and sampling shared by the built-in and the HF-backed prior.

    Subclasses provide ``self.width``, ``self.num_bits`` and ``_run(embeds, key_valid, past)
    -> (hidden (B, S, width), past)`` for causal attention over ``embeds`` given earlier
    ``past`` state; ``key_valid`` (B, S_total) marks real tokens (text padding is False).
    """

    def _init_embeddings(self, text_dim: int, max_levels: int):
        self.text_proj = nn.Linear(text_dim, self.width)
        self.code_proj = nn.Linear(self.num_bits, self.width)
        self.soi = nn.Parameter(torch.randn(self.width) * 0.02)
        self.sep = nn.Parameter(torch.randn(self.width) * 0.02)
        self.level_emb = nn.Embedding(max_levels, self.width)
        self.head = nn.Linear(self.width, self.num_bits)
        self.max_levels = max_levels

    def _text_prefix(self, text: TextEmbedding):
        B, L, _ = text.tokens.shape
        pos = _sincos(torch.arange(L, device=text.tokens.device) / 64.0, self.width)
        prefix = torch.cat([self.text_proj(text.tokens) + pos, self.soi.expand(B, 1, -1)], dim=1)
        valid = torch.cat([text.mask, text.mask.new_ones(B, 1)], dim=1)
        return prefix, valid                                              # (B, L+1, d), (B, L+1)

    def _level_inputs(self, codes: torch.Tensor, level: int) -> torch.Tensor:
        """(B, K, t, h, w) codes -> (B, t*h*w, d) input embeddings of that level."""
        grid = tuple(codes.shape[2:])
        x = self.code_proj(rearrange(codes, "b k t h w -> b (t h w) k").to(self.code_proj.weight.dtype))
        return x + self.level_emb.weight[level] + grid_positions(grid, self.width, codes.device)

    def forward(self, text: TextEmbedding, codes: Sequence[torch.Tensor]) -> PriorOutput:
        """Teacher-forced bitwise BCE of every level's tokens given text and earlier tokens."""
        _check_levels(text, codes, self.num_bits)
        if len(codes) > self.max_levels:
            raise ValueError(f"codes: {len(codes)} levels, the prior was built for at most {self.max_levels}")
        prefix, valid = self._text_prefix(text)
        B = prefix.shape[0]
        parts, sizes = [prefix], []
        for l, c in enumerate(codes):
            if l > 0:
                parts.append(self.sep.expand(B, 1, -1))
            parts.append(self._level_inputs(c, l))
            sizes.append(c[0, 0].numel())
        seq = torch.cat(parts, dim=1)                                        # (B, S, d)
        valid = torch.cat([valid, valid.new_ones(B, seq.shape[1] - valid.shape[1])], dim=1)
        hidden, _ = self._run(seq, valid, None)
        logits_all = self.head(hidden).float()                               # (B, S, K)
        logits, targets = [], []
        start = prefix.shape[1] - 1                                          # the SOI position predicts token 1
        for l, (c, n) in enumerate(zip(codes, sizes)):
            logits.append(logits_all[:, start:start + n])
            targets.append((rearrange(c, "b k t h w -> b (t h w) k") > 0).float())
            start += n + 1                                                   # skip over the SEP
        loss = F.binary_cross_entropy_with_logits(torch.cat(logits, 1), torch.cat(targets, 1))
        return PriorOutput(loss, logits, targets)

    @torch.no_grad()
    def sample(self, text: TextEmbedding, grids: Sequence[Grid], temperature: float = 0.0,
               generator: Optional[torch.Generator] = None) -> list[torch.Tensor]:
        """Generates every level's tokens after the text -> per level (B, K, t, h, w) +-1 codes.

        temperature 0 takes the most likely value of each bit; otherwise bit ~
        Bernoulli(sigmoid(logit / temperature)).
        """
        if temperature < 0:
            raise ValueError(f"temperature={temperature}: expected >= 0")
        if len(grids) == 0 or len(grids) > self.max_levels:
            raise ValueError(f"grids: expected 1..{self.max_levels} level grids, got {len(grids)}")
        prefix, valid = self._text_prefix(text)
        B = prefix.shape[0]
        hidden, past = self._run(prefix, valid, None)
        last = hidden[:, -1]                                                 # predicts the next token
        levels = []
        for l, grid in enumerate(grids):
            pos = grid_positions(tuple(grid), self.width, prefix.device) + self.level_emb.weight[l]
            n = pos.shape[0]
            bits = []
            if l > 0:
                valid = torch.cat([valid, valid.new_ones(B, 1)], dim=1)
                h, past = self._run(self.sep.expand(B, 1, -1), valid, past)
                last = h[:, -1]
            for j in range(n):
                logit = self.head(last).float()                              # (B, K)
                if temperature == 0:
                    bit = (logit > 0).float()
                else:
                    bit = torch.bernoulli(torch.sigmoid(logit / temperature), generator=generator)
                bits.append(bit)
                code = bit * 2 - 1
                if j + 1 < n or l + 1 < len(grids):
                    x = self.code_proj(code.to(self.code_proj.weight.dtype)) + pos[j]
                    valid = torch.cat([valid, valid.new_ones(B, 1)], dim=1)
                    h, past = self._run(x[:, None], valid, past)
                    last = h[:, -1]
            t, hh, w = grid
            levels.append(rearrange(torch.stack(bits, 1) * 2 - 1, "b (t h w) k -> b k t h w", t=t, h=hh, w=w))
        return levels


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, int(width * mlp_ratio)), nn.GELU(),
                                 nn.Linear(int(width * mlp_ratio), width))
        self.dropout = dropout

    def forward(self, x, key_valid, past=None):
        # x (B, S, d) new positions; past (k, v) (B, heads, P, d_h); key_valid (B, P+S)
        q, k, v = rearrange(self.qkv(self.norm1(x)), "b s (three h d) -> three b h s d", three=3, h=self.heads)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        S, P = x.shape[1], k.shape[2] - x.shape[1]
        causal = torch.ones(S, P + S, dtype=torch.bool, device=x.device).tril(P)
        mask = causal[None, None] & key_valid[:, None, None, :]              # (B, 1, S, P+S)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(rearrange(att, "b h s d -> b s (h d)"))
        x = x + self.mlp(self.norm2(x))
        return x, (k, v)


class ARPrior(_PriorBase):
    """The built-in compact causal transformer prior (config: width, depth, heads)."""

    def __init__(self, config: PriorConfig = PriorConfig()):
        super().__init__()
        if config.width % config.heads:
            raise ValueError(f"width={config.width} must be a multiple of heads={config.heads}")
        self.config = config
        self.width, self.num_bits = config.width, config.num_bits
        self._init_embeddings(config.text_dim, config.max_levels)
        self.blocks = nn.ModuleList(_Block(config.width, config.heads, config.mlp_ratio, config.dropout)
                                    for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.width)

    def _run(self, embeds, key_valid, past):
        new_past = []
        x = embeds
        for i, block in enumerate(self.blocks):
            x, kv = block(x, key_valid, None if past is None else past[i])
            new_past.append(kv)
        return self.norm(x), new_past


class HFCausalLMPrior(_PriorBase):
    """A local Hugging Face causal LM as the AR prior, fed through ``inputs_embeds``.

    The LM's own token embeddings are unused: text embeddings, SOI/SEP and the visual codes
    are projected to its hidden size; a new head predicts the K bits.  The LM's weights train
    unless ``freeze_lm=True``.
    """

    def __init__(self, path: str, num_bits: int, text_dim: int, max_levels: int = 8, freeze_lm: bool = False):
        super().__init__()
        from transformers import AutoModel

        try:
            self.lm = AutoModel.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"path: {path} is not a loadable Hugging Face causal LM folder ({err})") from None
        self.lm.requires_grad_(not freeze_lm)
        self.width, self.num_bits = self.lm.config.hidden_size, num_bits
        self._init_embeddings(text_dim, max_levels)

    def _run(self, embeds, key_valid, past):
        out = self.lm(inputs_embeds=embeds, attention_mask=key_valid.long(), past_key_values=past, use_cache=True)
        return out.last_hidden_state, out.past_key_values
