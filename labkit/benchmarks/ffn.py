"""FFN benchmark: a dense transformer MLP vs its factorized (low-rank) version, side by side.

Paper: low-rank factorisation of weight matrices, ``W ~= U V^T`` (Sainath et al. 2013,
"Low-rank matrix factorization for deep neural network training with high-dimensional
output targets"; Denton et al. 2014 for SVD compression); FLOPs ``2 d d_ff`` -> ``2 r (d +
d_ff)`` per token and matrix.

One BERT-style GELU MLP (``up``: d -> d_ff, ``down``: d_ff -> d), fp32, CPU, inference, on
``(T, d)`` token activations, at d=768/d_ff=3072 (BERT-base) and d=1024/d_ff=4096
(BERT-large), T = 512 and 2048 tokens, dense vs :class:`~labkit.techniques.factorized_ffn.
LowRankLinear` factors at ranks d/8, d/4, d/2. FLOPs are counted by
``torch.utils.flop_counter`` (:func:`labkit.measure.flops`), times are medians of
``torch.utils.benchmark``, measured side by side by :func:`labkit.measure.paired`.

Two scopes, both reported:

* ``ffn``: the whole MLP, ``down(gelu(up x))``. The GELU on the (T, d_ff) hidden and the
  bias adds are the same in both and are not counted as FLOPs, so they bound the gain.
* ``matmul``: the ``up`` projection alone, ``x W^T`` vs ``(x V) U^T``: how well the two thin
  GEMMs (inner dimension r) run compared with one wide one.

Side by side: each round times dense and every rank once, in an order rotated between
rounds; a speedup is the median over rounds of the per-round ratio dense / factorized, so a
burst of load from other processes hits both sides of a ratio alike.

Target: at r = d/4 the measured FFN speedup is at least 80% of the FLOP ratio
(3.2x FLOPs at d_ff = 4d, so >= 2.56x measured).

What limits it (see the ``matmul`` rows and ``gflops_per_s``): the factorized MLP runs twice
as many GEMMs, each with a thin inner or outer dimension r, which reach fewer GFLOP/s than
one wide GEMM, more so at small r and few tokens; the GELU on the (T, d_ff) hidden does not
shrink; and with several threads every GEMM pays a fork/join, which on an oversubscribed
machine (``env["loadavg_1m"]`` above the core count) costs the many small GEMMs of the
factorized MLP far more than the dense one. So the full run sweeps one thread and the
current thread count, and reports both.
"""
from __future__ import annotations

import os

import torch

from .. import measure
from .. import validate as V
from ..model import MLP
from ..techniques.factorized_ffn import LowRankLinear
from . import peak as P

NAME = "ffn"
REQUIRED_FRACTION = 0.8  # of the FLOP ratio, at r = d/4
SHAPES = ((768, 3072), (1024, 4096))
TOKENS = (512, 2048)
RANK_FRACTIONS = (1 / 8, 1 / 4, 1 / 2)


def make_pair(d_model: int, d_ff: int, rank: int, gated: bool = False, seed: int = 0):
    """A dense MLP and the same MLP with every linear factorized at ``rank`` (SVD init)."""
    torch.manual_seed(seed)
    dense = MLP(d_model, d_ff, gated=gated).eval()
    low = MLP(d_model, d_ff, gated=gated).eval()
    low.load_state_dict(dense.state_dict())
    for name in ("up", "gate", "down"):
        lin = getattr(dense, name)
        if lin is not None:
            setattr(low, name, LowRankLinear.from_linear(lin, rank, "svd").eval())
    return dense, low


def sweep(shapes=SHAPES, tokens=TOKENS, rank_fractions=RANK_FRACTIONS, scopes=("ffn", "matmul"),
          rounds: int = 3, min_run_time: float = 0.3, gated: bool = False,
          memory: bool = True, seed: int = 0, threads: int | None = None,
          peak: dict | None = None) -> list[dict]:
    """Tidy rows, one per (scope, d, d_ff, tokens, rank): times, counted FLOPs, FLOP ratio,
    paired speedup and ``efficiency`` = speedup / FLOP ratio, and the machine's fp32 peak
    beside each (:func:`labkit.benchmarks.peak.with_peak`; ``peak`` default: measured at
    the sweep's thread count). ``rank=None`` is dense.
    ``threads``: intra-op threads for the sweep (default: the current setting)."""
    with measure.num_threads(threads):
        return _sweep(shapes, tokens, rank_fractions, scopes, rounds, min_run_time, gated,
                      memory, seed, peak if peak is not None else P.bench_peaks(False))


def _sweep(shapes, tokens, rank_fractions, scopes, rounds, min_run_time, gated, memory, seed,
           peak):
    V.integer("rounds", rounds, 1)
    V.number("min_run_time", min_run_time, 0.0, lo_open=True)
    for s in scopes:
        V.choice("scope", s, ("ffn", "matmul"))
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for d, f in shapes:
        ranks = sorted({max(1, round(d * q)) for q in rank_fractions})
        pairs = {r: make_pair(d, f, r, gated, seed) for r in ranks}
        dense = pairs[ranks[0]][0]
        for t in tokens:
            x = torch.randn(t, d, generator=gen)  # (T, D)
            mods = {}
            for scope in scopes:
                for r in [None, *ranks]:
                    mlp = dense if r is None else pairs[r][1]
                    mods[scope, r] = mlp if scope == "ffn" else mlp.up
            calls = {k: (lambda m=m, x=x: m(x)) for k, m in mods.items()}
            with torch.inference_mode():
                counted = {k: measure.flops(fn) for k, fn in calls.items()}
                for scope in scopes:  # each scope against its own dense, side by side
                    keys = [r for sc, r in calls if sc == scope]
                    res = measure.paired({r: calls[scope, r] for r in keys}, None, rounds,
                                         min_run_time / rounds)
                    for r in keys:
                        fn, mod = calls[scope, r], mods[scope, r]
                        fl, fl_dense = counted[scope, r], counted[scope, None]
                        row = {"scope": scope, "d_model": d, "d_ff": f, "tokens": t,
                               "method": "dense" if r is None else "factorized",
                               "rank": r, "rank_fraction": None if r is None else r / d,
                               **res.row(r),
                               "shapes": f"T={t},d={d},d_ff={f}", "dtype": "float32",
                               "gated": gated, "flops": fl, "flop_ratio": fl_dense / fl,
                               "params": sum(p.numel() for p in mod.parameters()),
                               "kernel_path": getattr(
                                   getattr(mod, "up", mod), "kernel_path", "dense: one matmul")}
                        row["efficiency"] = row["speedup"] / row["flop_ratio"]
                        row["verdict"] = measure.speedup_verdict(
                            row["speedup"], (row["speedup_min"], row["speedup_max"]),
                            row["flop_ratio"]) if r is not None else "reference"
                        row["gflops_per_s"] = fl / (row["median_ms"] * 1e-3) / 1e9
                        P.with_peak(row, fl, "fp32", peak, row["speedup"] if r is not None
                                    else None, reference_flops=fl_dense)
                        if memory:
                            row["peak_bytes"] = measure.peak_memory(fn)
                        rows.append(row)
    return rows


def run(quick: bool = False) -> dict:
    """The benchmark contract: ``{"name", "rows", "targets", "env"}``.

    The full run sweeps at one thread and at the current thread count: on a shared machine
    an oversubscribed multi-threaded GEMM can be many times slower than a single-threaded
    one, and that, not the factorisation, then dominates the ratio."""
    if quick:  # one thread: seconds, and stable on a busy machine
        shapes, tokens, fractions, rounds, mrt = ((128, 512),), (64,), (1 / 4,), 2, 0.02
        thread_counts = (1,)
    else:
        shapes, tokens, fractions, rounds, mrt = SHAPES, TOKENS, RANK_FRACTIONS, 5, 1.0
        thread_counts = tuple(sorted({1, torch.get_num_threads()}))
    rows = []
    for th in thread_counts:
        with measure.num_threads(th):
            pk = P.bench_peaks(quick)
        rows += sweep(shapes, tokens, fractions, rounds=rounds, min_run_time=mrt,
                      memory=not quick, threads=th, peak=pk)
    note = ("quick mode: small shapes, not the contract; " if quick else "") + \
        "whole GELU MLP (GELU and bias adds included, not counted as FLOPs); paired median " \
        "over rounds of dense/factorized, torch.utils.benchmark medians"
    targets = []
    for r in rows:
        if r["scope"] != "ffn" or r["rank"] is None or r["rank"] != max(1, round(r["d_model"] / 4)):
            continue
        need = REQUIRED_FRACTION * r["flop_ratio"]
        targets.append({
            "target": (f"FFN speedup at r=d/4={r['rank']} >= {REQUIRED_FRACTION:.0%} of the "
                       f"FLOP ratio {r['flop_ratio']:.2f}x (d={r['d_model']}, "
                       f"d_ff={r['d_ff']}, T={r['tokens']}, threads={r['threads']})"),
            "measured": r["speedup"], "required": need, "unit": "x",
            "met": bool(r["speedup"] >= need),
            "note": f"speedup/FLOP ratio = {r['efficiency']:.2f}; " + note})
    env = measure.environment()
    env["loadavg_1m"] = os.getloadavg()[0]  # other processes sharing the cores
    return {"name": NAME, "rows": rows, "targets": targets, "env": env}


__all__ = ["NAME", "RANK_FRACTIONS", "SHAPES", "TOKENS", "make_pair", "run", "sweep"]
