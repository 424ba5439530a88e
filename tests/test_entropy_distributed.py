"""lfq_entropy_loss with a process group: 2 gloo processes (torch.multiprocessing.spawn, CPU)
give the single-process loss on the concatenated batch, and each rank's gradient is WORLD times
its slice of the single-process gradient: data parallelism averages the ranks' gradients, so the
averaged gradient is the single-process one.  The ranks hold unequal batches, so the token count
matters."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyratok import ops

WORLD = 2
SPLIT = [3, 5]  # batch items per rank
CASES = [("exact", None), ("groups", 4), ("bits", None)]


def full_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(sum(SPLIT), 10, 2, 3, generator=g, dtype=torch.float64) * 0.4  # (B, K, H, W)


def per_case(x, process_group=None):
    """(loss, per-sample entropy, codebook entropy, grad) for every method."""
    out = []
    for method, group_size in CASES:
        xr = x.detach().clone().requires_grad_()
        res = ops.lfq_entropy_loss(xr, 0.6, 1.4, method, process_group, inv_temperature=1.5,
                                   group_size=group_size)
        res.loss.backward()
        out.append((res.loss.detach(), res.per_sample_entropy.detach(), res.codebook_entropy.detach(), xr.grad))
    return out


def _worker(rank, init_file, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        start = sum(SPLIT[:rank])
        local = full_batch()[start:start + SPLIT[rank]]
        torch.save(per_case(local, dist.group.WORLD), os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built into this torch")
def test_two_process_all_reduce_equals_single_process():
    x = full_batch()
    single = per_case(x)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]
    for case, (want_loss, want_sample, want_codebook, want_grad) in enumerate(single):
        slices = want_grad.split(SPLIT)
        for rank, results in enumerate(ranks):
            loss, sample, codebook, grad = results[case]
            torch.testing.assert_close(loss, want_loss, rtol=0, atol=1e-12)
            torch.testing.assert_close(sample, want_sample, rtol=0, atol=1e-12)
            torch.testing.assert_close(codebook, want_codebook, rtol=0, atol=1e-12)
            torch.testing.assert_close(grad / WORLD, slices[rank], rtol=0, atol=1e-12)
    # a local (non-reduced) loss differs: the test distinguishes the two
    local_loss = per_case(x[:SPLIT[0]])[0][0]
    assert abs(local_loss - single[0][0]) > 1e-3
