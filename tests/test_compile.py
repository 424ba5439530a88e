"""torch.compile of PyraTok.encode / decode on the CPU: one graph (0 graph breaks, fullgraph=True),
the eager tokens and video, and no recompilation across 1 + 4k frame counts once the first
recompile has made the frame axis dynamic.

The compile backend is aot_eager (Dynamo tracing, fake tensors through every custom op's fake
kernel, AOT autograd): tens of seconds on a CPU, against minutes of C++ compilation for inductor
(checked by hand: torch.compile(model.encode, fullgraph=True) with inductor gives the eager
tokens).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from pyratok.models.pyratok import PyraTok, PyraTokConfig


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PyraTok(PyraTokConfig.tiny(text_encoder=None, lora_rank=0)).eval()


def clip(frames, size=32, seed=0):
    return torch.rand(1, 3, frames, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def same_tokens(a, b) -> bool:
    return len(a.ids) == len(b.ids) and all(torch.equal(i, j) for i, j in zip(a.ids, b.ids))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
def test_encode_and_decode_have_no_graph_breaks(model):
    x = clip(5)
    explained = torch._dynamo.explain(model.encode)(x)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
    tokens = model.encode(x)
    explained = torch._dynamo.explain(model.decode)(tokens)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


@pytest.mark.slow
def test_compiled_encode_gives_the_eager_tokens_without_recompiling(model):
    counter = CompileCounterWithBackend("aot_eager")
    encode = torch.compile(model.encode, fullgraph=True, backend=counter)
    counts = []
    for frames in (5, 9, 13):
        x = clip(frames, seed=frames)
        assert same_tokens(encode(x), model.encode(x)), frames
        counts.append(counter.frame_count)
    # 5: static graph; 9: the frame axis becomes dynamic; 13: that graph again
    assert counts == [1, 2, 2]


@pytest.mark.slow
def test_compiled_decode_gives_the_eager_video(model):
    counter = CompileCounterWithBackend("aot_eager")
    decode = torch.compile(model.decode, fullgraph=True, backend=counter)
    for frames in (5, 9, 13):
        tokens = model.encode(clip(frames, seed=frames))
        torch.testing.assert_close(decode(tokens), model.decode(tokens), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 2  # 5, then one dynamic graph for 9 and 13


def test_value_check_runs_outside_the_graph(model):
    loud = clip(5) * 3  # outside [-1, 1]
    with pytest.warns(UserWarning, match="expects \\[-1, 1\\]"):
        model.vae.check_video(loud)
    with pytest.warns(UserWarning, match="expects \\[-1, 1\\]"):
        model.encode(loud)
