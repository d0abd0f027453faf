"""Hessian-aware mixed precision (Q-BERT, Shen et al. 2020; trace-weighted as in HAWQ-V2).

Idea: a layer whose loss surface is sharp (large Hessian spectrum) is hurt more by the
rounding noise of quantization, so it keeps more bits. The Hessian is never formed: a
Hessian-vector product costs one extra backward pass (double backward, Pearlmutter):

    Hv = d/dW (g . v),  g = dL/dW  (autograd.grad with create_graph=True)

* Hutchinson's trace estimator, per layer ``l`` (and per group of rows)::

      tr(H_ll) = E_v[v_l^T (H v)_l],  v ~ Rademacher

  one HVP with ``v`` over all layers gives every layer's estimate at once (the diagonal
  blocks of ``E[v v^T] = I``); the estimate is unbiased, with variance falling as 1/samples.
  Its standard error decides how many probes run: they double until layers adjacent in the
  ranking are more than ``z`` standard errors apart, else the rows say the order is noise.
* The top eigenvalue of each diagonal block ``H_ll`` by power iteration:
  ``v <- H_ll v / ||H_ll v||``, ``lambda = v^T H_ll v`` (Q-BERT's sensitivity).

Sensitivity of layer ``l`` at ``b`` bits (HAWQ-V2): ``Omega_l(b) = tr(H_ll)/n_l *
||Q_b(W_l) - W_l||^2``, the second-order loss increase of the quantization perturbation.
:func:`assign_bits` minimises ``sum_l Omega_l(b_l)`` under a byte budget (counted with
scales, :func:`labkit.techniques.qmath.weight_bytes`) by greedy upgrades (to any wider
width) with the best loss decrease per byte, starting from all-minimum bits.

Complexity: each HVP ~ 2x a backward pass; trace: ``samples`` HVPs; eigenvalues:
``layers x iters`` HVPs (each one only reads its block).
"""
from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable

import torch
from torch import nn

from .. import validate as V
from . import qmath as Q
from .registry import linear_selector


def _sdpa_math():
    """Double backward needs the math SDPA kernel (the fused CPU kernels are once
    differentiable)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def linear_weights(model: nn.Module, layers: tuple = (),
                   parts: tuple = ("attn", "ffn")) -> dict[str, nn.Parameter]:
    """The weights whose precision is chosen: ``{layer name: weight}``."""
    sel = linear_selector(model, layers, parts)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and sel(name, m):
            out[name] = m.weight
    return out


def hvp(loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor],
        vs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Hessian-vector product of ``loss_fn()`` w.r.t. ``params`` with ``vs``."""
    with _sdpa_math():
        loss = loss_fn()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vs))
        return list(torch.autograd.grad(dot, params))


class HessianWarning(UserWarning):
    """A Hessian trace ranking the probes did not resolve (the order of some layers is noise)."""


def _rademacher(params, g):
    return [torch.randint(0, 2, p.shape, generator=g).to(p.dtype) * 2 - 1 for p in params]


def _draw_probes(loss_fn, names, params, g, count, group_size, per, groups):
    """``count`` more Hutchinson probes: append ``v_l^T (Hv)_l`` per layer to ``per``."""
    for _ in range(count):
        vs = _rademacher(params, g)
        hv = hvp(loss_fn, params, vs)
        for n, v, h in zip(names, vs, hv):
            vh = (v * h).detach()
            per[n].append(vh.sum().item())
            if group_size and vh.shape[0] % group_size == 0:
                rows = vh.reshape(vh.shape[0], -1).sum(1)
                groups[n].append(rows.reshape(-1, group_size).sum(1))


def _summarise(names, per, groups) -> dict:
    out = {}
    for n in names:
        t = torch.tensor(per[n])
        k = len(t)
        out[n] = {"trace": t.mean().item(),
                  "std": t.std().item() / math.sqrt(k) if k > 1 else float("nan"),
                  "groups": torch.stack(groups[n]).mean(0).tolist() if groups[n] else None,
                  "probes": k}
    return out


def hutchinson_trace(loss_fn, weights: dict[str, torch.Tensor], samples: int = 16,
                     group_size: int | None = None, seed: int = 0) -> dict:
    """Per-layer Hessian trace estimates: ``{name: {"trace", "std", "groups", "probes"}}``
    (``std``: the standard error of the trace, NaN for one probe).

    ``groups`` (when ``group_size`` divides the layer's rows, else None) is the trace over
    each block of ``group_size`` consecutive rows (e.g. one attention head)."""
    V.integer("samples", samples, 1)
    names, params = list(weights), list(weights.values())
    per, groups = {n: [] for n in names}, {n: [] for n in names}
    _draw_probes(loss_fn, names, params, torch.Generator().manual_seed(seed), samples,
                 group_size, per, groups)
    return _summarise(names, per, groups)


def unresolved_pairs(traces: dict, sizes: dict[str, int], z: float = 2.0) -> list[tuple]:
    """Pairs ``(higher, lower)`` of layers adjacent in the ranking by trace per parameter
    whose gap is not more than ``z`` standard errors of the difference (a NaN error, from a
    single probe, never resolves)."""
    avg = {n: (t["trace"] / sizes[n], t["std"] / sizes[n]) for n, t in traces.items()}
    order = sorted(avg, key=lambda n: -avg[n][0])
    return [(a, b) for a, b in itertools.pairwise(order)
            if not avg[a][0] - avg[b][0] > z * math.hypot(avg[a][1], avg[b][1])]


def ranked_traces(loss_fn, weights: dict[str, torch.Tensor], samples: int = 4,
                  max_samples: int = 64, z: float = 2.0, group_size: int | None = None,
                  seed: int = 0) -> tuple[dict, list[tuple]]:
    """Hutchinson traces with probes doubled (``samples``, 2x, 4x, ... up to
    ``max_samples``) until the ranking by trace per parameter is resolved: every two
    adjacent layers more than ``z`` standard errors apart (:func:`unresolved_pairs`).
    With 4 probes a small trace's estimate is often negative, and the ranking (so which
    layers get the fewest bits) would be decided by the probes' noise.

    Returns (traces as :func:`hutchinson_trace`, the pairs still unresolved; a
    :class:`HessianWarning` names them)."""
    V.integer("samples", samples, 1)
    V.integer("max_samples", max_samples, samples)
    V.number("z", z, 0.0)
    names, params = list(weights), list(weights.values())
    sizes = {n: p.numel() for n, p in weights.items()}
    g = torch.Generator().manual_seed(seed)
    per, groups = {n: [] for n in names}, {n: [] for n in names}
    count = samples
    while True:
        _draw_probes(loss_fn, names, params, g, count - len(per[names[0]]), group_size,
                     per, groups)
        traces = _summarise(names, per, groups)
        open_pairs = unresolved_pairs(traces, sizes, z)
        if not open_pairs or count >= max_samples:
            break
        count = min(2 * count, max_samples)
    if open_pairs:
        shown = ", ".join(f"{a} ~ {b}" for a, b in open_pairs[:4])
        more = f" and {len(open_pairs) - 4} more" if len(open_pairs) > 4 else ""
        warnings.warn(f"Hessian trace ranking not resolved after {count} probes: {shown}{more} "
                      f"are within {z:g} standard errors, so their order (and which of them "
                      "gets fewer bits) is noise; rows say rank_stable=False",
                      HessianWarning, stacklevel=3)
    return traces, open_pairs


def top_eigenvalue(loss_fn, weights: dict[str, torch.Tensor], iters: int = 10,
                   seed: int = 0, tol: float = 1e-3) -> dict[str, float]:
    """Top eigenvalue of each diagonal Hessian block by power iteration."""
    V.integer("iters", iters, 1)
    names, params = list(weights), list(weights.values())
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, n in enumerate(names):
        v = torch.randn(params[i].shape, generator=g)
        v /= v.norm()
        lam = 0.0
        for _ in range(iters):
            vs = [v if j == i else torch.zeros_like(p) for j, p in enumerate(params)]
            hv = hvp(loss_fn, params, vs)[i].detach()
            new = float((v * hv).sum())
            v = hv / hv.norm().clamp_min(1e-30)
            if abs(new - lam) <= tol * max(abs(lam), 1e-12):
                lam = new
                break
            lam = new
        out[n] = lam
    return out


def exact_hessian(loss_fn, param: torch.Tensor) -> torch.Tensor:
    """Dense Hessian of a (small) parameter, for tests: (n, n)."""
    n = param.numel()
    rows = []
    for i in range(n):
        e = torch.zeros(n)
        e[i] = 1
        rows.append(hvp(loss_fn, [param], [e.reshape(param.shape)])[0].reshape(-1))
    return torch.stack(rows)


def sensitivity(model: nn.Module, loss_fn, samples: int = 16, eig_iters: int = 0,
                bits=(2, 3, 4, 8), granularity: str = "channel", group_size: int = 1,
                symmetric: bool = True, layers: tuple = (), seed: int = 0,
                trace_group: int | None = None, max_samples: int | None = None,
                z: float = 2.0) -> list[dict]:
    """One row per layer: Hessian trace (and top eigenvalue), parameter count, and
    ``omega_<b>`` = trace/n * ||Q_b(W) - W||^2 for each candidate bit-width, ranked.
    ``trace_group``: also the trace per block of that many rows (``group_traces``).

    The traces start from ``samples`` probes and double up to ``max_samples`` (default
    ``4 * samples``) until the ranking is resolved (:func:`ranked_traces`); ``trace_probes``
    says how many ran and ``rank_stable`` whether the row is more than ``z`` standard errors
    from both neighbours (a :class:`HessianWarning` when some row is not). A negative
    estimate counts as a flat layer (``omega`` 0)."""
    weights = linear_weights(model, layers)
    if not weights:
        raise V.LabkitConfigError("layers", layers, "a selection that contains nn.Linear layers")
    V.integer("samples", samples, 1)
    top = 4 * samples if max_samples is None else max_samples
    tr, open_pairs = ranked_traces(loss_fn, weights, samples, top, z, group_size=trace_group,
                                   seed=seed)
    unstable = {n for pair in open_pairs for n in pair}
    eig = top_eigenvalue(loss_fn, weights, eig_iters, seed=seed) if eig_iters else {}
    rows = []
    for n, w in weights.items():
        row = {"layer": n, "params": w.numel(), "trace": tr[n]["trace"],
               "trace_std": tr[n]["std"], "avg_trace": tr[n]["trace"] / w.numel(),
               "trace_probes": tr[n]["probes"], "rank_stable": n not in unstable,
               "top_eig": eig.get(n, float("nan")), "group_traces": tr[n]["groups"]}
        with torch.no_grad():
            for b in bits:
                err = (Q.fake_quant_tensor(w, b, symmetric, granularity, group_size) - w)
                row[f"omega_{b}"] = max(row["avg_trace"], 0.0) * float(err.pow(2).sum())
        rows.append(row)
    rows.sort(key=lambda r: -r["avg_trace"])
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
    return rows


def budget_bytes(rows, bits: int, granularity="channel", group_size=1, symmetric=True,
                 shapes: dict | None = None) -> int:
    """Bytes of all layers at a uniform bit-width (metadata counted)."""
    return sum(Q.weight_bytes(shapes[r["layer"]] if shapes else (r["params"],), bits,
                              granularity, group_size, symmetric)["total"] for r in rows)


def assign_bits(rows: list[dict], budget: int, bits=(2, 3, 4, 8), shapes: dict | None = None,
                granularity: str = "channel", group_size: int = 1,
                symmetric: bool = True) -> dict[str, int]:
    """Bit-width per layer minimising sum of ``omega`` with total bytes <= ``budget``.

    ``shapes`` maps layer -> weight shape (for exact metadata bytes); rows need
    ``omega_<b>`` for each ``b`` in ``bits`` (see :func:`sensitivity`)."""
    bits = sorted(bits)
    for b in bits:
        Q.check_bits("bits", b)
    cost = {r["layer"]: {b: Q.weight_bytes(shapes[r["layer"]] if shapes else (r["params"],),
                                           b, granularity, group_size, symmetric)["total"]
                         for b in bits} for r in rows}
    floor = sum(c[bits[0]] for c in cost.values())
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < floor:
        raise V.LabkitConfigError(
            "budget", budget, f"at least {floor} bytes (every layer at {bits[0]} bits)")
    choice = {r["layer"]: bits[0] for r in rows}
    omega = {r["layer"]: r for r in rows}
    used = floor
    while True:
        best, best_gain = None, 0.0
        for layer, b in choice.items():
            for nb in bits[bits.index(b) + 1:]:  # any higher width, not only the next
                extra = cost[layer][nb] - cost[layer][b]
                if used + extra > budget:
                    continue
                gain = (omega[layer][f"omega_{b}"] - omega[layer][f"omega_{nb}"]) / max(extra, 1)
                if best is None or gain > best_gain:
                    best, best_gain = (layer, nb, extra), gain
        if best is None:
            return choice
        layer, nb, extra = best
        choice[layer] = nb
        used += extra


__all__ = [
    "HessianWarning",
    "assign_bits",
    "budget_bytes",
    "exact_hessian",
    "hutchinson_trace",
    "hvp",
    "linear_weights",
    "ranked_traces",
    "sensitivity",
    "top_eigenvalue",
    "unresolved_pairs",
]
