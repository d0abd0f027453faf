"""Attention benchmark: dense SDPA vs kernel attention (ELU+1) vs Linformer, side by side.

Papers: Katharopoulos et al. 2020, "Transformers are RNNs: Fast Autoregressive Transformers
with Linear Attention" (ELU+1 feature map, ``O(n d^2)``); Wang et al. 2020, "Linformer:
Self-Attention with Linear Complexity" (``E K``, ``F V`` projected to ``k`` rows,
``O(n k d)``); against softmax attention through SDPA (``O(n^2 d)``).

One attention op, 8 heads of dim 64, batch 1, fp32, CPU, at n = 512 ... 4096; every method
timed side by side by :func:`labkit.measure.paired` (``torch.utils.benchmark`` medians, in
rounds with a rotated order), so the speedups are the median over rounds of the per-round
ratio. The full run sweeps one thread and the
current thread count (see :func:`run`).

Two scopes, both reported:

* ``op``: the attention given ``q, k, v`` (B, H, N, 64). For Linformer this *includes* the
  ``E K`` and ``F V`` sequence projections (they are part of the algorithm and cost as much
  as its attention); the ``linformer-core`` row leaves them out (``E K``, ``F V`` given).
  For kernel attention it includes the feature map and the denominator check.
* ``module``: the whole attention module from ``x`` (B, N, 512), i.e. plus the Q/K/V/O
  linear layers every method shares (``8 n D^2`` FLOPs), which bound the end-to-end gain.

Targets (op scope): kernel ELU+1 >= 10x faster than SDPA at n=4096 and not slower at
n=512; Linformer k=128 >= 8x faster at n=4096. The crossover length is the smallest ``n``
of the sweep from which a method stays faster than SDPA.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .. import measure
from .. import validate as V
from ..model import Attention
from ..techniques.kernel_attention import KernelAttention
from ..techniques.low_rank_attention import LinformerAttention
from . import peak as P

NAME = "attention"
METHODS = ("sdpa", "kernel-elu", "linformer", "linformer-core")


def make_modules(d_model: int, n_heads: int, n: int, k: int = 128,
                 feature_map: str = "elu", num_features: int = 64, seed: int = 0) -> dict:
    """The attention modules compared, sharing one set of Q/K/V/O weights."""
    torch.manual_seed(seed)
    dense = Attention(d_model, n_heads).eval()
    mods = {"sdpa": dense,
            "kernel-elu" if feature_map == "elu" else f"kernel-{feature_map}":
                KernelAttention.like(dense, feature_map=feature_map, num_features=num_features,
                                     seed=seed).eval()}
    if k <= n:
        mods["linformer"] = LinformerAttention.like(dense, k=k, seq_len=n).eval()
    return mods


def _op_fn(name: str, mod, q, k, v):
    if name == "linformer-core":
        e, f = mod.projections(k.shape[-2])
        kp, vp = torch.matmul(e, k).contiguous(), torch.matmul(f, v).contiguous()
        return lambda: F.scaled_dot_product_attention(q, kp, vp)
    return lambda: mod.attend(q, k, v)


def sweep(ns=(512, 1024, 2048, 4096), n_heads: int = 8, head_dim: int = 64, batch: int = 1,
          k: int = 128, feature_map: str = "elu", num_features: int = 64,
          scopes=("op", "module"), min_run_time: float = 0.5, memory: bool = True,
          seed: int = 0, rounds: int = 3, threads: int | None = None,
          peak: dict | None = None) -> list[dict]:
    """Tidy rows ``{scope, method, n, median_ms, min_ms, max_ms, runs, peak_bytes, ...}``.

    Each round times every method once (``torch.utils.benchmark`` median), in an order
    rotated between rounds; ``median_ms`` is the median over rounds (min/max: the spread) and
    ``speedup`` the median over rounds of the per-round ratio SDPA / method at the same
    ``n`` and scope, so a burst of load from other processes hits both sides of a ratio.
    ``threads``: intra-op threads for the sweep (default: the current setting). Each row
    also has its counted FLOPs and the machine's fp32 peak beside it
    (:func:`labkit.benchmarks.peak.with_peak`; ``peak`` default: measured at the sweep's
    thread count)."""
    with measure.num_threads(threads):
        return _sweep(ns, n_heads, head_dim, batch, k, feature_map, num_features, scopes,
                      min_run_time, memory, seed, rounds,
                      peak if peak is not None else P.bench_peaks(False))


def _sweep(ns, n_heads, head_dim, batch, k, feature_map, num_features, scopes, min_run_time,
           memory, seed, rounds, peak):
    for n in ns:
        V.integer("n", n, 2)
    V.choice("feature_map", feature_map, ("elu", "favor", "trig"))
    V.integer("rounds", rounds, 1)
    d_model = n_heads * head_dim
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for n in ns:
        mods = make_modules(d_model, n_heads, n, k, feature_map, num_features, seed)
        x = torch.randn(batch, n, d_model, generator=gen)
        with torch.inference_mode():
            q, kk, v = (torch.randn(batch, n_heads, n, head_dim, generator=gen) for _ in "qkv")
            calls = {}
            for scope in scopes:
                V.choice("scope", scope, ("op", "module"))
                for name, mod in mods.items():
                    if scope == "op":
                        calls[scope, name] = _op_fn(name, mod, q, kk, v)
                        if name == "linformer":
                            calls[scope, "linformer-core"] = _op_fn("linformer-core", mod, q,
                                                                    kk, v)
                    else:
                        calls[scope, name] = (lambda m=mod, x=x: m(x))
            shapes = f"B={batch},H={n_heads},N={n},Dh={head_dim}"
            for scope in scopes:  # each scope's ratios against its own SDPA, side by side
                names = [name for sc, name in calls if sc == scope]
                res = measure.paired({name: calls[scope, name] for name in names}, "sdpa",
                                     rounds, min_run_time / rounds)
                counted = {name: measure.flops(calls[scope, name]) for name in names}
                for name in names:
                    fn = calls[scope, name]
                    mod = mods["linformer" if name == "linformer-core" else name]
                    row = {"scope": scope, "method": name, "n": n, **res.row(name),
                           "batch": batch, "heads": n_heads, "head_dim": head_dim,
                           "dtype": "float32", "shapes": shapes,
                           "kernel_path": getattr(mod, "kernel_path", "sdpa"),
                           "includes": _includes(scope, name)}
                    row["flops"] = counted[name]
                    P.with_peak(row, counted[name], "fp32", peak,
                                row["speedup"] if name != "sdpa" else None,
                                reference_flops=counted["sdpa"])
                    if memory:
                        row["peak_bytes"] = measure.peak_memory(fn)
                    rows.append(row)
    return rows


def _includes(scope: str, name: str) -> str:
    if scope == "module":
        return "Q/K/V/O linears + attention"
    return {"sdpa": "softmax(QK^T)V (SDPA)",
            "linformer": "E K, F V projections + SDPA on k rows",
            "linformer-core": "SDPA on k rows (E K, F V given)"}.get(
        name, "feature map + phi(Q)(phi(K)^T V) / phi(Q)(phi(K)^T 1)")


def crossover(rows, method: str, scope: str = "op") -> dict:
    """Smallest ``n`` of the sweep from which ``method`` stays faster than SDPA
    (``n=None`` if never; ``below_range`` when it is already faster at the smallest n)."""
    pts = sorted((r["n"], r["speedup"]) for r in rows
                 if r["method"] == method and r["scope"] == scope and r["speedup"])
    cross = None
    for i, (n, _) in enumerate(pts):
        if all(s > 1.0 for _, s in pts[i:]):
            cross = n
            break
    return {"method": method, "scope": scope, "crossover_n": cross,
            "below_range": bool(pts) and cross == pts[0][0]}


def _at(rows, method, n, scope="op"):
    for r in rows:
        if r["method"] == method and r["n"] == n and r["scope"] == scope:
            return r["speedup"]
    return float("nan")


def run(quick: bool = False) -> dict:
    """The benchmark contract: ``{"name", "rows", "targets", "env"}``.

    The full run sweeps one thread and the current thread count and states the targets for
    each: on a shared, oversubscribed machine every parallel region of a multi-threaded op
    waits for a descheduled thread, which costs the many small ops of kernel attention far
    more than SDPA's one fused kernel, and then dominates the ratio."""
    if quick:
        ns, min_run_time, k, rounds, thread_counts = (128, 256), 0.04, 64, 2, (1,)
    else:
        ns, min_run_time, k, rounds = (512, 1024, 2048, 4096), 1.5, 128, 5
        thread_counts = tuple(sorted({1, torch.get_num_threads()}))
    rows = []
    for th in thread_counts:
        with measure.num_threads(th):
            pk = P.bench_peaks(quick)
        rows += sweep(ns, k=k, min_run_time=min_run_time, memory=not quick, rounds=rounds,
                      threads=th, peak=pk)
    lo, hi = min(ns), max(ns)
    note = ("quick mode: small shapes, not the contract; " if quick else "") + \
        "op scope (q, k, v given), median over rounds of the per-round ratio SDPA/method, " \
        "torch.utils.benchmark medians, same process"
    targets = []
    for th in thread_counts:
        sub = [r for r in rows if r["threads"] == th]
        targets += [
            {"target": f"kernel ELU+1 speedup vs SDPA at n={hi} (threads={th})",
             "measured": _at(sub, "kernel-elu", hi), "required": 10.0, "unit": "x",
             "note": note},
            {"target": f"kernel ELU+1 not slower than SDPA at n={lo} (threads={th})",
             "measured": _at(sub, "kernel-elu", lo), "required": 1.0, "unit": "x",
             "note": note},
            {"target": f"Linformer k={k} speedup vs SDPA at n={hi}, E/F projections included "
                       f"(threads={th})",
             "measured": _at(sub, "linformer", hi), "required": 8.0, "unit": "x",
             "note": note},
        ]
        for method in ("kernel-elu", "linformer"):
            for scope in ("op", "module"):
                c = crossover(sub, method, scope)
                rows.append({"scope": scope, "method": method, "n": None, "threads": th,
                             "kind": "crossover", "crossover_n": c["crossover_n"],
                             "below_range": c["below_range"]})
    for t in targets:
        t["met"] = bool(t["measured"] >= t["required"])
    env = measure.environment()
    env["loadavg_1m"] = os.getloadavg()[0]  # other processes sharing the cores
    return {"name": NAME, "rows": rows, "targets": targets, "env": env}


__all__ = ["METHODS", "NAME", "crossover", "make_modules", "run", "sweep"]
