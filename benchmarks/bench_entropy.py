"""Benchmark: the LFQ entropy loss, forward + backward, for huge binary codebooks.

One group per (K, N): N tokens of K bits, x of shape (N, K) in fp32, inv_temperature 1,
x ~ U(-0.01, 0.01) so that no code probability falls below vector-quantize-pytorch's 1e-5
log clamp for K <= 16 (there its loss equals the exact one; `value` is recorded for both).
Providers:
  exact, groups, bits       pyratok.ops.lfq_entropy_loss(method=...), groups of ceil(K/2) bits;
                            on CUDA also "exact (triton)"
  fp32 GEMM, bf16 GEMM      the exact path's three GEMMs alone (P_A^T P_B, P_B G^T, P_A G over
                            all N): the roofline the exact path is judged against (bf16: CUDA
                            only, the tensor-core rate for reference)
  vector-quantize-pytorch   LFQ(entropy_loss_weight=1).train() aux loss, which materialises the
                            N x 2^K softmax: ~28 bytes per N*2^K element (measured), so it is
                            skipped where that exceeds 16 GB
FLOPs (exact): 3 GEMMs of 2 * N * 2^K; groups: 3 * 2 * N * sum_g 2^g.  On the CPU, cases over
1 TFLOP per call (K = 24, N >= 32768) are skipped: minutes per call on 2 cores.

Realistic inputs (``test_entropy_realistic``): K = 16 over 2 x 32 x 32 tokens (N = 2048, a
video latent batch; the peer needs ~3.7 GB there, ~15 GB at 8192) at inv_temperature 1 and 100
(the peer's default) with x ~ N(0, 1), N(0, 0.05) (a trained encoder's scale: at tau = 100 many
code probabilities fall below FLT_MIN, the denormal case) and near +-1 (a converged quantizer:
sign +-1 plus N(0, 0.05) noise), exact path against the peer on the same input.  The README's
headline ratio is tau = 100, N(0, 0.05).

``python benchmarks/bench_entropy.py summary benchmarks/results/entropy.csv`` prints the README
table (with the skipped peer cells), checks the issue's targets and plots time vs N per method
into benchmarks/results/entropy_time_vs_n.png.
"""

from __future__ import annotations

import math

import pytest
import torch

import pyratok
from pyratok import ops
from _common import DEVICE, peak_memory_bytes, run, sync

KS = [10, 14, 16, 18, 24]
NS = [1280, 8192, 32768, 163840]
TAU = 1.0
PEER = "vector-quantize-pytorch"
PEER_BYTES_PER_ELEMENT = 28     # measured: N*2^K fp32 softmax, its log, grads (7 copies)
PEER_LIMIT_BYTES = 16 * 2**30
CPU_FLOP_LIMIT = 1e12


def group_size(K: int) -> int:
    return (K + 1) // 2


def exact_flops(K: int, N: int) -> float:
    return 3 * 2 * N * 2.0 ** K


def method_flops(method: str, K: int, N: int) -> float:
    if method == "exact":
        return exact_flops(K, N)
    g = 1 if method == "bits" else group_size(K)
    return sum(exact_flops(s, N) for s in [g] * (K // g) + ([K % g] if K % g else []))


def peer_bytes(K: int, N: int) -> float:
    return PEER_BYTES_PER_ELEMENT * N * 2.0 ** K


def make_input(K, N, device):
    g = torch.Generator().manual_seed(K * 1000003 + N)
    return ((torch.rand(N, K, generator=g) * 2 - 1) * 0.01).to(device)


def providers(device: str) -> list[str]:
    if device == "cpu":
        return ["exact", "groups", "bits", "fp32 GEMM", PEER]
    triton = ["exact (triton)"] if "triton" in pyratok.available_backends("cuda") else []
    return ["exact", "groups", "bits", *triton, "fp32 GEMM", "bf16 GEMM", PEER]


def _rounds(flops: float, device: str) -> int:
    seconds = flops / (1e11 if device == "cpu" else 2e13)
    return 5 if seconds < 0.3 else (3 if seconds < 3 else 1)


def _gemm_step(K, N, dtype, device):
    ka, kb = K // 2, K - K // 2
    probs_a = torch.rand(N, 2 ** ka, dtype=dtype, device=device)
    probs_b = torch.rand(N, 2 ** kb, dtype=dtype, device=device)
    grad = torch.rand(2 ** ka, 2 ** kb, dtype=dtype, device=device)
    return lambda: (probs_a.T @ probs_b, probs_b @ grad.T, probs_a @ grad)


def _loss_step(x, method, backend, tau=TAU):
    def step():
        xr = x.detach().requires_grad_()
        loss = ops.lfq_entropy_loss(xr, 1.0, 1.0, method, inv_temperature=tau, backend=backend,
                                    group_size=group_size(x.shape[1]) if method == "groups" else None).loss
        loss.backward()
        return loss
    return step


def _peer_step(x, tau=TAU):
    LFQ = pytest.importorskip("vector_quantize_pytorch", reason="the peer is not installed here").LFQ
    K = x.shape[1]
    lfq = LFQ(dim=K, codebook_size=2 ** K, entropy_loss_weight=1.0, diversity_gamma=1.0,
              commitment_loss_weight=0.0).to(x.device).train()

    def step():
        xr = x[None].detach().requires_grad_()  # (1, N, K): LFQ's (batch, sequence, dim)
        _, _, aux_loss = lfq(xr, inv_temperature=tau)
        aux_loss.backward()
        return aux_loss
    return step


def _available_bytes() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


@pytest.mark.parametrize("provider", ["exact", "groups", "bits", "exact (triton)", "fp32 GEMM", "bf16 GEMM", PEER])
@pytest.mark.parametrize("N", NS)
@pytest.mark.parametrize("K", KS)
def test_entropy(benchmark, K, N, provider):
    if provider not in providers(DEVICE):
        pytest.skip(f"{provider} is not run on {DEVICE}")
    method = provider.partition(" (")[0]
    flops = exact_flops(K, N) if provider.endswith("GEMM") else method_flops(method, K, N)
    if DEVICE == "cpu" and provider != PEER and flops > CPU_FLOP_LIMIT:
        pytest.skip(f"{flops / 1e12:.1f} TFLOP per call: over the CPU budget")
    x = make_input(K, N, DEVICE)
    benchmark.group = f"entropy K={K} N={N}"
    info = dict(op="entropy", provider=provider, shape=f"(N={N}, K={K})", dtype="float32", layout="(N, K)",
                peer=PEER, ours=provider not in (PEER, "fp32 GEMM", "bf16 GEMM"))
    if provider == PEER:
        need = peer_bytes(K, N)
        if need > PEER_LIMIT_BYTES:
            pytest.skip(f"the peer needs ~{need / 2**30:.0f} GB > 16 GB")
        if DEVICE == "cpu" and need > _available_bytes() - 2 * 2**30:
            pytest.skip(f"the peer needs ~{need / 2**30:.0f} GB, more than is free on this machine")
        _time_peer_once(benchmark, _peer_step(x), info)   # minutes per call at the large sizes
        return
    if provider.endswith("GEMM"):
        step = _gemm_step(K, N, torch.float32 if provider.startswith("fp32") else torch.bfloat16, DEVICE)
        run(benchmark, step, rounds=_rounds(flops, DEVICE), flops=flops, **info)
        return
    backend = provider.partition(" (")[2].rstrip(")") or None
    step = _loss_step(x, method, backend)
    run(benchmark, step, rounds=_rounds(flops, DEVICE), flops=flops, bytes=3 * x.numel() * 4, **info)
    benchmark.extra_info["value"] = float(step())


def _time_peer_once(benchmark, step, info) -> None:
    """One timed call of the peer's loss step that also records its peak memory and value."""
    value = {}

    def call():
        value["loss"] = float(step())
        sync()

    benchmark.extra_info.update(info, device=DEVICE)
    benchmark.pedantic(lambda: benchmark.extra_info.update(peak_bytes=peak_memory_bytes(call)),
                       rounds=1, warmup_rounds=0, iterations=1)
    benchmark.extra_info["value"] = value["loss"]


# ---- realistic inputs and temperatures ----------------------------------------------------------

REALISTIC_K, REALISTIC_SHAPE = 16, (2, 32, 32)
REALISTIC_INPUTS = ["N(0,1)", "N(0,0.05)", "near+-1"]
REALISTIC_TAUS = [1.0, 100.0]
HEADLINE = (100.0, "N(0,0.05)")


def realistic_input(kind: str, device) -> torch.Tensor:
    """(N, K) tokens of a latent batch, K = 16, N = 2 * 32 * 32."""
    g = torch.Generator().manual_seed(16)
    n = math.prod(REALISTIC_SHAPE)
    noise = torch.randn(n, REALISTIC_K, generator=g)
    if kind == "N(0,1)":
        x = noise
    elif kind == "N(0,0.05)":
        x = 0.05 * noise
    else:
        x = torch.where(torch.rand(n, REALISTIC_K, generator=g) > 0.5, 1.0, -1.0) + 0.05 * noise
    return x.to(device)


def realistic_group(tau: float, kind: str) -> str:
    return f"entropy realistic K={REALISTIC_K} N={math.prod(REALISTIC_SHAPE)} tau={tau:g} x~{kind}"


@pytest.mark.parametrize("provider", ["exact", PEER])
@pytest.mark.parametrize("kind", REALISTIC_INPUTS)
@pytest.mark.parametrize("tau", REALISTIC_TAUS)
def test_entropy_realistic(benchmark, tau, kind, provider):
    x = realistic_input(kind, DEVICE)
    benchmark.group = realistic_group(tau, kind)
    info = dict(op="entropy", provider=provider, shape=f"(N={x.shape[0]}, K={REALISTIC_K})", dtype="float32",
                layout="(N, K)", peer=PEER, ours=provider != PEER)
    if provider == PEER:  # GBs and seconds per call
        _time_peer_once(benchmark, _peer_step(x, tau), info)
        return
    step = _loss_step(x, "exact", None, tau)
    run(benchmark, step, rounds=5, flops=exact_flops(REALISTIC_K, x.shape[0]), **info)
    benchmark.extra_info["value"] = float(step())


# ---- few tokens, many codes: the fused path ----------------------------------------------------

FEW_TOKENS = [3, 48, 192, 768, 1536]


@pytest.mark.parametrize("provider", ["exact", "exact (counts path)"])
@pytest.mark.parametrize("N", FEW_TOKENS)
def test_entropy_few_tokens(benchmark, N, provider):
    """K = 24 over the token counts of LaPQ's levels: the exact codebook entropy's fused CPU
    path (tiles of codes, value and gradient in one pass; taken for <= FUSED_MAX_TOKENS
    tokens) against its counts path (the 2^24 soft counts in memory) on the same input."""
    if DEVICE != "cpu" or "cpu" not in pyratok.available_backends("cpu"):
        pytest.skip("the fused path is the C++ CPU backend's")
    from pyratok.ops import entropy as E

    K = 24
    x = make_input(K, N, DEVICE)
    step = _loss_step(x, "exact", "cpu")
    limit = 0 if provider.endswith("(counts path)") else E.FUSED_MAX_TOKENS

    def call():
        saved, E.FUSED_MAX_TOKENS = E.FUSED_MAX_TOKENS, limit
        try:
            return step()
        finally:
            E.FUSED_MAX_TOKENS = saved

    benchmark.group = f"entropy few tokens K={K} N={N}"
    run(benchmark, call, rounds=5, op="entropy", provider=provider, shape=f"(N={N}, K={K})", dtype="float32",
        layout="(N, K)", peer="exact (counts path)", ours=True, flops=exact_flops(K, N), bytes=3 * x.numel() * 4)
    benchmark.extra_info["value"] = float(call())


# ---- summary: README table, targets and plot from the CSV written by report.py ---------------


def _latest(rows):
    """The most recent row of each (group, provider)."""
    latest = {}
    for r in rows:
        latest[(r["group"], r["provider"])] = r
    return latest


def summary(csv_path: str, plot_path: str) -> str:
    import csv

    rows = list(csv.DictReader(open(csv_path)))
    latest = _latest(rows)
    ms = lambda K, N, p: float(latest[(f"entropy K={K} N={N}", p)]["median_ms"]) if (  # noqa: E731
        f"entropy K={K} N={N}", p) in latest else None
    lines = ["| K | N | exact ms | groups ms | bits ms | vector-quantize-pytorch ms | exact x peer | "
             "exact peak MB | exact % of fp32 GEMM |", "|---|---|---|---|---|---|---|---|---|"]
    for K in KS:
        for N in NS:
            exact = ms(K, N, "exact")
            if exact is None:
                continue
            peer = ms(K, N, PEER)
            if peer is not None:
                peer_cell = f"{peer:.0f}"
            elif peer_bytes(K, N) > PEER_LIMIT_BYTES:
                peer_cell = f"skipped (~{peer_bytes(K, N) / 2**30:.0f} GB > 16 GB)"
            else:
                peer_cell = "not run"
            r = latest[(f"entropy K={K} N={N}", "exact")]
            gemm = ms(K, N, "fp32 GEMM")
            lines.append(
                f"| {K} | {N} | {exact:.1f} | {ms(K, N, 'groups') or float('nan'):.1f} | "
                f"{ms(K, N, 'bits') or float('nan'):.1f} | {peer_cell} | "
                f"{f'{peer / exact:.0f}' if peer else '-'} | {float(r['peak_mb'] or 'nan'):.0f} | "
                f"{f'{100 * gemm / exact:.0f}' if gemm else '-'} |")
    lines += ["", "| inv_temperature | x | exact ms | vector-quantize-pytorch ms | exact x peer |",
              "|---|---|---|---|---|"]
    for tau in REALISTIC_TAUS:
        for kind in REALISTIC_INPUTS:
            group = realistic_group(tau, kind)
            if (group, "exact") in latest and (group, PEER) in latest:
                e, p = (float(latest[(group, prov)]["median_ms"]) for prov in ("exact", PEER))
                lines.append(f"| {tau:g} | {kind} | {e:.1f} | {p:.0f} | {p / e:.0f} |")
    checks = []
    headline = realistic_group(*HEADLINE)
    if (headline, "exact") in latest and (headline, PEER) in latest:
        e, p = (float(latest[(headline, prov)]["median_ms"]) for prov in ("exact", PEER))
        checks.append(f"headline (K=16, N=2048, tau=100, x ~ N(0, 0.05)): exact {e:.1f} ms vs peer "
                      f"{p / 1e3:.2f} s = {p / e:.0f}x")
    e16, p16 = ms(16, 8192, "exact"), ms(16, 8192, PEER)
    if e16 and p16:
        checks.append(f"K=16, N=8192: exact {e16:.1f} ms vs peer {p16 / 1e3:.1f} s = {p16 / e16:.0f}x "
                      f"(target >= 1000x): {'met' if p16 / e16 >= 1000 else 'NOT met'}")
    e18 = latest.get(("entropy K=18 N=32768", "exact"))
    if e18:
        t, peak = float(e18["median_ms"]), float(e18["peak_mb"] or "nan")
        checks.append(f"K=18, N=32768: exact {t / 1e3:.2f} s, peak {peak:.0f} MB (target < 1 s, < 1 GB): "
                      f"{'met' if t < 1e3 and peak < 1024 else 'NOT met'}")
    for K in KS:
        t = [(N, ms(K, N, "exact")) for N in NS if ms(K, N, "exact")]
        if len(t) >= 2:
            (n0, t0), (n1, t1) = t[0], t[-1]
            checks.append(f"K={K}: exact time x{t1 / t0:.0f} for N x{n1 // n0} (log-log slope "
                          f"{math.log(t1 / t0) / math.log(n1 / n0):.2f})")
    _plot(latest, plot_path)
    return "\n".join(lines) + "\n\n" + "\n".join(checks) + f"\n\nplot: {plot_path}\n"


def _plot(latest, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = ["exact", "groups", "bits", "exact (triton)", PEER]
    fig, axes = plt.subplots(1, len(KS), figsize=(4 * len(KS), 3.6), sharey=True)
    for ax, K in zip(axes, KS):
        for method in methods:
            pts = [(N, float(latest[(f"entropy K={K} N={N}", method)]["median_ms"]) / 1e3)
                   for N in NS if (f"entropy K={K} N={N}", method) in latest]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method, linestyle="--" if method == PEER else "-")
        ax.set(xscale="log", yscale="log", title=f"K = {K}", xlabel="tokens N")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("forward + backward, s")
    axes[0].legend(fontsize=8)
    fig.suptitle("LFQ entropy loss: time vs tokens (peer skipped where it needs > 16 GB)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    import argparse
    import os

    parser = argparse.ArgumentParser(description="README table, targets and plot from results/entropy.csv")
    parser.add_argument("command", choices=["summary"])
    parser.add_argument("csv")
    parser.add_argument("--plot", default=None, help="PNG path (default: next to the CSV)")
    args = parser.parse_args()
    plot = args.plot or os.path.join(os.path.dirname(os.path.abspath(args.csv)), "entropy_time_vs_n.png")
    print(summary(args.csv, plot))
