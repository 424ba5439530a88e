"""The text_code alignment term with a process group: 2 gloo processes (torch.multiprocessing.spawn,
CPU) give the single-process value on the concatenated batch, and each rank's gradient w.r.t. its
own text-head logits is WORLD times its slice of the single-process gradient (data parallelism
averages the ranks' gradients).  Unequal per-rank batches, so the clip count matters."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyratok.models.lapq import LaPQOutput
from pyratok.models.losses import LossConfig, codebook_terms

WORLD = 2
SPLIT = [2, 3]                                   # clips per rank
CFG = LossConfig(commitment=0.0, entropy=0.0, hierarchy=0.0, text_token=0.0, text_code=1.0)


def full_batch():
    g = torch.Generator().manual_seed(0)
    B, K = sum(SPLIT), 6
    codes = torch.where(torch.rand(B, K, 2, 3, 3, generator=g) > 0.3, 1.0, -1.0)
    text_logits = torch.randn(B, K, 1, 1, 1, generator=g, dtype=torch.float64) * 2
    return codes, text_logits


def term(codes, text_logits, process_group=None):
    r = text_logits.detach().clone().requires_grad_()
    out = LaPQOutput(None, [codes], None, [codes * 0.7], [r], None, None)
    value = codebook_terms(out, CFG, process_group)["text_code"]
    value.backward()
    return value.detach(), r.grad


def _worker(rank, init_file, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        start = sum(SPLIT[:rank])
        codes, text_logits = full_batch()
        rows = slice(start, start + SPLIT[rank])
        torch.save(term(codes[rows], text_logits[rows], dist.group.WORLD), os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built into this torch")
def test_two_ranks_equal_one_rank_on_the_union_batch():
    codes, text_logits = full_batch()
    want_value, want_grad = term(codes, text_logits)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]
    for rank, (value, grad) in enumerate(ranks):
        torch.testing.assert_close(value, want_value, rtol=0, atol=1e-12)
        torch.testing.assert_close(grad / WORLD, want_grad.split(SPLIT)[rank], rtol=0, atol=1e-12)
    local_value, _ = term(codes[:SPLIT[0]], text_logits[:SPLIT[0]])   # a local mean differs: the test can tell
    assert abs(local_value - want_value) > 1e-3


# -- the whole model under a process group -------------------------------------------------------

def _model_and_batch():
    from pyratok.models.pyratok import PyraTok, PyraTokConfig

    torch.manual_seed(0)
    model = PyraTok(PyraTokConfig.tiny(text_encoder=None)).eval()
    g = torch.Generator().manual_seed(1)
    return model, torch.rand(sum(SPLIT), 3, 5, 32, 32, generator=g) * 2 - 1


def _forward_worker(rank, init_file, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model, video = _model_and_batch()
        start = sum(SPLIT[:rank])
        with torch.no_grad():
            _, losses = model(video[start:start + SPLIT[rank]], process_group=dist.group.WORLD)
        torch.save(losses.terms, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built into this torch")
def test_model_forward_passes_its_process_group_to_the_codebook_terms():
    """PyraTok.forward(process_group=...) computes the entropy term's batch usage over all ranks:
    each of 2 gloo ranks gets the single-process value of the union batch."""
    model, video = _model_and_batch()
    with torch.no_grad():
        want = model(video)[1].terms["entropy"]
        local = model(video[:SPLIT[0]])[1].terms["entropy"]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_forward_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]
    for terms in ranks:
        torch.testing.assert_close(terms["entropy"], want, rtol=1e-5, atol=1e-6)
    assert abs(local - want) > 1e-4                           # a rank's own batch differs: the test can tell
