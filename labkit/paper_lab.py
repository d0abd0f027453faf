"""The seed paper's experiments at lab scale: its stack against LayerDrop, Q-BERT and SDN.

Paper: the LLM-optimisation paper labkit follows (architecture optimisation, sparsity and
INT8, evaluated on MNLI and QNLI against LayerDrop, Fan et al. 2019; Q-BERT, Shen et al.
2020; Shallow-Deep Networks, Kaya et al. 2019). Its claims, checked by notebook 10:

* Fig. 1: inference time falls with sparsity ``s`` in 0.1..0.5 for every method and is
  lowest for its stack;
* Fig. 2: its stack converges fastest (steps and seconds to a target accuracy) at every
  training-sample size;
* INT8 + 50% sparsity cuts memory by 50%;
* each method keeps accuracy close to the dense fine-tuned model.

Matched settings at sparsity ``s`` (a fraction of the dense model's work removed):

* ``ours``: FFN neurons pruned by weight magnitude and removed (the architecture gets
  narrower: ``d_ff -> (1-s) d_ff``), then INT8 on the block linears through labkit's
  ``accelerate`` (per layer the fastest of fp32 / torchao W8A8 / torch dynamic INT8,
  reverted when the whole model got slower; the chosen paths are recorded);
* ``layerdrop``: ``round(s L)`` of the ``L`` blocks removed, evenly spread;
* ``qbert``: Hessian-aware mixed precision (Hutchinson traces, :mod:`labkit.techniques.
  hessian`) with the weight bytes of ``ours`` at the same ``s`` as budget; simulated (the
  weights are rounded to their bit-width and stored back in fp32: CPUs have no 2-4 bit
  GEMM), so its time is the dense time and its bytes are the packed size it would need;
* ``sdn``: internal classifiers after each block, exit threshold chosen on held-out data so
  the average fraction of blocks run is ``1 - s``.

Complexity: every timing is paired with the dense model (rotated rounds, median of
per-round ratios, :func:`labkit.measure.paired`); the spread over rounds is the error band.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field

import torch

from . import measure
from . import model as M
from . import train as T
from . import validate as V
from .techniques import hessian as H
from .techniques import quant as Q

METHODS = ("ours", "layerdrop", "qbert", "sdn")
INT8_PATHS = ("fp32", "int8_dynamic", "torch_dynamic")


class MethodUnavailable(RuntimeError):
    """A method's technique is not in this labkit (the row records why)."""


@dataclass
class Variant:
    method: str
    sparsity: float
    model: torch.nn.Module
    info: dict = field(default_factory=dict)  # paths chosen, bits, bytes, notes


def check_sparsities(name: str, values) -> list[float]:
    values = list(values)
    if not values:
        raise V.LabkitConfigError(name, values, "a non-empty list of numbers in (0, 1)")
    for v in values:
        V.number(name, v, 0.0, 1.0, lo_open=True, hi_open=True)
    return values


def block_linear_shapes(model: torch.nn.Module) -> dict:
    return {n: tuple(w.shape) for n, w in H.linear_weights(model).items()}


def _ffn_fraction(cfg: M.ModelConfig) -> float:
    """Share of block-linear weights in the FFN (attention: 4 d^2, FFN: 2 d d_ff)."""
    attn, ffn = 4 * cfg.d_model ** 2, 2 * cfg.d_model * cfg.d_ff
    return ffn / (attn + ffn)


def ours(base: M.Transformer, s: float, inputs: tuple, min_run_time: float = 0.02,
         int8: str = "accelerate") -> Variant:
    """Neurons pruned and removed at ``s``, then INT8. ``int8="accelerate"``: measured
    per-layer choice (for speed); ``"torchao"``: torchao W8A8 everywhere (for bytes,
    counted by :func:`labkit.measure.model_bytes`); ``"none"``: sparsity only."""
    from .techniques import apply_
    from .techniques.int8 import Int8Config, accelerate_, compact_ffn_rows_

    V.choice("int8", int8, ("accelerate", "torchao", "none"))
    m = copy.deepcopy(base).eval()
    if s > 0:  # s = 0: INT8 alone
        compact_ffn_rows_(m, s)
    info = {"d_ff": m.blocks[0].ffn.up.out_features}
    if int8 == "accelerate":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rows = accelerate_(m, inputs, candidates=INT8_PATHS, min_run_time=min_run_time)
        info["model_check"] = rows[-1]["chosen"]
        info["paths"] = ["fp32 (reverted)"] if "reverted" in info["model_check"] else \
            sorted({r["chosen"] for r in rows if r["layer"] != "<model>"})
        info["warnings"] = [str(w.message)[:200] for w in caught]
    elif int8 == "torchao":
        apply_(m, Int8Config("dynamic"))
        info["paths"] = ["int8_dynamic"]
    return Variant("ours", s, m, info)


def qbert_sensitivity(base: M.Transformer, batch: dict, samples: int = 4,
                      bits=(2, 3, 4, 8), seed: int = 0) -> list[dict]:
    """Per block linear: Hutchinson trace of the task loss Hessian on ``batch`` and the
    HAWQ-V2 sensitivity at each bit-width (computed once per model, reused for every s)."""
    m = copy.deepcopy(base).eval()  # eval: no dropout noise in the Hessian
    with H._sdpa_math():  # double backward needs the math SDPA kernel
        return H.sensitivity(m, lambda: m.loss(batch), samples=samples, bits=bits, seed=seed)


def qbert(base: M.Transformer, s: float, rows: list[dict], bits=(2, 3, 4, 8)) -> Variant:
    """Mixed precision at the weight bytes of ``ours`` at ``s`` (simulated, see above)."""
    shapes = block_linear_shapes(base)
    int8 = H.budget_bytes(rows, 8, shapes=shapes)
    budget = int(int8 * (1 - s * _ffn_fraction(base.cfg)))
    assign = H.assign_bits(rows, budget, bits, shapes)
    m = copy.deepcopy(base).eval()
    with torch.no_grad():
        for name, b in assign.items():
            w = m.get_submodule(name).weight
            w.copy_(Q.fake_quant_tensor(w, b, True, "channel", 1))
    used = sum(Q.weight_bytes(shapes[k], b, "channel", 1, True)["total"]
               for k, b in assign.items())
    avg = sum(b * math.prod(shapes[k]) for k, b in assign.items()) / sum(
        math.prod(v) for v in shapes.values())
    return Variant("qbert", s, m, {"avg_bits": avg, "packed_bytes": used, "budget": budget,
                                   "bits": dict(assign), "paths": ["fp32 (simulated)"]})


def kept_blocks(n_layers: int, s: float) -> list[int]:
    """``n_layers - round(s n_layers)`` block indices, evenly spread, the last kept."""
    drop = round(s * n_layers)
    keep = n_layers - drop
    if keep < 1:
        raise V.LabkitConfigError("sparsity", s, f"a value that keeps a block of {n_layers}")
    return sorted({round((i + 1) * n_layers / keep) - 1 for i in range(keep)})


def layerdrop(base: M.Transformer, s: float) -> Variant:
    """Blocks removed at inference (LayerDrop's pruning): the depth technique's executor."""
    try:
        from .techniques import layerdrop as LD
    except ImportError as e:
        raise MethodUnavailable(f"LayerDrop is not in this labkit ({e})") from e
    m = copy.deepcopy(base).eval()
    keep = kept_blocks(base.cfg.n_layers, s)
    LD.prune_to(m, keep)
    return Variant("layerdrop", s, m, {"kept": keep, "paths": ["fp32"]})


def sdn(base: M.Transformer, s: float, exits=None) -> Variant:
    """Early exit at a threshold giving ``1 - s`` of the blocks on average."""
    try:
        from .techniques import early_exit as EE
    except ImportError as e:
        raise MethodUnavailable(f"Shallow-Deep Networks are not in this labkit ({e})") from e
    raise MethodUnavailable(f"SDN wiring pending ({EE.__name__})")


def _call(model, ids, mask):
    def run():
        with torch.inference_mode():
            model(ids, mask)
    return run


def time_variants(dense, variants: dict, sample: tuple, rounds: int = 3,
                  min_run_time: float = 0.05, timer=None) -> list[dict]:
    """Paired timing of every variant against ``dense`` on ``sample`` (ids, mask)."""
    fns = {"dense": _call(dense, *sample), **{k: _call(v.model, *sample)
                                               for k, v in variants.items()}}
    p = measure.paired(fns, reference="dense", rounds=rounds, min_run_time=min_run_time,
                       timer=timer)
    return p.rows()


def accuracy(model, eval_set) -> float:
    return float(T.evaluate(model, eval_set)["accuracy"])


def memory(model, sample: tuple) -> dict:
    """Whole-model bytes (parameters and buffers, packed INT8 counted with its scales) and
    peak inference memory (those bytes plus the peak of live activations)."""
    weights = measure.model_bytes(model)["total"]
    act = measure.peak_activation_bytes(model, *sample)
    return {"model_bytes": weights, "activation_peak_bytes": act,
            "inference_peak_bytes": weights + act}


def verdict_fig1(rows: list[dict]) -> dict:
    """Does time fall with sparsity for each method, and is ``ours`` the fastest at each s?
    ``rows``: {"method", "sparsity", "median_ms", "min_ms", "max_ms"}."""
    out = {}
    for m in sorted({r["method"] for r in rows} - {"dense"}):
        pts = sorted((r["sparsity"], r["median_ms"]) for r in rows if r["method"] == m)
        falls = all(b[1] < a[1] for a, b in zip(pts, pts[1:]))
        out[m] = {"falls_monotonically": falls,
                  "ms_at_lowest_s": pts[0][1], "ms_at_highest_s": pts[-1][1]}
    by_s = {}
    for r in rows:
        by_s.setdefault(r["sparsity"], []).append(r)
    fastest = {s: min((r for r in rs if r["method"] != "dense"),
                      key=lambda r: r["median_ms"])["method"] for s, rs in by_s.items()}
    out["fastest_by_sparsity"] = fastest
    out["ours_fastest_everywhere"] = all(v == "ours" for v in fastest.values())
    return out


def floats(name: str, text: str) -> list[float]:
    """A comma-separated notebook parameter ``"0.1,0.2"`` -> [0.1, 0.2] (named error)."""
    try:
        return [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise V.LabkitConfigError(name, text, "comma-separated numbers, e.g. '0.1,0.3,0.5'")


def ints(name: str, text: str, lo: int = 1) -> list[int]:
    try:
        out = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise V.LabkitConfigError(name, text, "comma-separated integers, e.g. '250,500'")
    if not out or min(out) < lo:
        raise V.LabkitConfigError(name, text, f"comma-separated integers >= {lo}")
    return out


def build(method: str, base, s: float, sample: tuple, batch: dict, cache: dict,
          min_run_time: float = 0.02) -> Variant:
    """The ``method``'s variant of ``base`` at sparsity ``s`` (see the module docstring).
    ``cache`` keeps per-model work (Hessian sensitivity) across sparsities."""
    V.choice("method", method, METHODS)
    if method == "ours":
        return ours(base, s, sample, min_run_time)
    if method == "qbert":
        if "qbert_rows" not in cache:
            cache["qbert_rows"] = qbert_sensitivity(base, batch)
        return qbert(base, s, cache["qbert_rows"])
    if method == "layerdrop":
        return layerdrop(base, s)
    return sdn(base, s, cache.get("sdn_exits"))


def sweep(base, sparsities, methods, sample: tuple, batch: dict, eval_set, task: str,
          rounds: int = 3, min_run_time: float = 0.05, timed: bool = True, timer=None):
    """Fig. 1 and the accuracy at every point on one task: for each ``s``, every method's
    variant of ``base`` evaluated on ``eval_set`` and (``timed``) timed side by side with the
    dense model. A method whose technique is missing gives an ``unavailable`` row per ``s``
    and a warning.

    Returns (timing rows, accuracy rows, variants {(method, s): Variant})."""
    times, accs, variants, cache = [], [], {}, {}
    accs.append({"method": "dense", "sparsity": 0.0, "task": task,
                 "accuracy": accuracy(base, eval_set)})
    for s in check_sparsities("sparsities", sparsities):
        built = {}
        for method in methods:
            try:
                built[method] = build(method, base, s, sample, batch, cache)
            except MethodUnavailable as e:
                warnings.warn(f"{method}: {e}")
                accs.append({"method": method, "sparsity": s, "task": task,
                             "accuracy": float("nan"), "status": f"unavailable: {e}"})
                if timed:
                    times.append({"method": method, "sparsity": s,
                                  "status": f"unavailable: {e}"})
        if timed:
            for r in time_variants(base, built, sample, rounds, min_run_time, timer):
                info = built[r["variant"]].info if r["variant"] in built else {}
                r.update(method=r["variant"], sparsity=s, status="measured",
                         paths=",".join(info.get("paths", ["fp32"])))
                times.append(r)
        for method, v in built.items():
            variants[(method, s)] = v
            accs.append({"method": method, "sparsity": s, "task": task,
                         "accuracy": accuracy(v.model, eval_set), "status": "measured"})
    return times, accs, variants


def fig1(rows: list[dict], title: str = "Fig. 1: inference time vs sparsity"):
    """Median time per method against sparsity, the band between the fastest and slowest
    round (plotly, one colour per method)."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative

    fig = go.Figure()
    methods = [m for m in ("dense", *METHODS) if any(r.get("method") == m and
                                                     r.get("status") == "measured"
                                                     for r in rows)]
    for i, m in enumerate(methods):
        pts = sorted((r["sparsity"], r["median_ms"], r["min_ms"], r["max_ms"]) for r in rows
                     if r.get("method") == m and r.get("status") == "measured")
        xs = [p[0] for p in pts]
        colour = qualitative.Plotly[i % 10]
        fig.add_scatter(x=xs + xs[::-1], y=[p[3] for p in pts] + [p[2] for p in pts][::-1],
                        fill="toself", line=dict(width=0), fillcolor=colour, opacity=0.2,
                        showlegend=False, hoverinfo="skip", legendgroup=m)
        fig.add_scatter(x=xs, y=[p[1] for p in pts], name=m, mode="lines+markers",
                        line=dict(color=colour), legendgroup=m)
    fig.update_layout(title=title, xaxis_title="sparsity s", yaxis_title="ms per batch",
                      height=380)
    return fig


def training_form(method: str, model: M.Transformer, s: float, bits_by_layer=()) -> list:
    """Apply ``method``'s training-time form to a fresh ``model`` in place; returns the
    callbacks training needs. ours: FFN width ``(1-s) d_ff`` and 8-bit fake quant (QAT);
    qbert: fake quant at the Hessian bit assignment; layerdrop/sdn: the depth techniques."""
    from .techniques import apply_
    from .techniques.int8 import compact_ffn_rows_

    V.choice("method", method, ("dense", *METHODS))
    if method == "ours":
        compact_ffn_rows_(model, s)
        apply_(model, Q.FakeQuantConfig(bits=8))
    elif method == "qbert":
        apply_(model, Q.FakeQuantConfig(bits=8, bits_by_layer=tuple(bits_by_layer)))
    elif method == "layerdrop":
        try:
            from .techniques import layerdrop as LD
        except ImportError as e:
            raise MethodUnavailable(f"LayerDrop is not in this labkit ({e})") from e
        apply_(model, LD.LayerDropConfig(p=s))
    elif method == "sdn":
        raise MethodUnavailable("Shallow-Deep Networks are not in this labkit")
    return []


def convergence(pairs, cfg: M.ModelConfig, methods, sizes, s: float, target: float,
                steps: int, lr: float, batch_size: int = 32, eval_every: int = 25,
                seed: int = 0, bits_by_layer=()) -> list[dict]:
    """Fig. 2: for each training-sample size ``n`` and method, train a fresh model of
    ``cfg`` on the first ``n`` training pairs and record the step and second at which the
    eval accuracy first reaches ``target`` (None: not within ``steps``)."""
    rows = []
    for n in sizes:
        part = {k: v[:n] for k, v in pairs.train.items()}
        for method in ("dense", *methods):
            model = M.build(cfg, seed=seed)
            try:
                cbs = training_form(method, model, s, bits_by_layer)
            except MethodUnavailable as e:
                warnings.warn(f"{method}: {e}")
                rows.append({"method": method, "n_train": n, "status": f"unavailable: {e}"})
                continue
            r = T.fit(model, _batches(part, batch_size, seed), steps=steps, lr=lr,
                      eval_fn=lambda m=model: T.evaluate(m, pairs.eval),
                      eval_every=eval_every, callbacks=cbs, seed=seed,
                      target=("accuracy", target), progress=False)
            rows.append({"method": method, "n_train": n, "status": "measured",
                         "steps_to_target": r.steps_to_target,
                         "seconds_to_target": r.seconds_to_target,
                         "final_accuracy": r.final.get("accuracy"), "steps": r.steps})
    return rows


def _batches(part: dict, batch_size: int, seed: int):
    from .data import batches

    return batches(part, min(batch_size, len(part["labels"])), seed=seed)


# --------------------------------------------------------------------------- verdicts

def _fmt_s(values) -> str:
    return ", ".join(f"{v:g}" for v in values)


def verdicts(times: list[dict], accs: list[dict], mem: dict, conv: list[dict],
             op: float, tolerance: float = 0.01) -> list[dict]:
    """One row per claim: ``claim``, ``verdict`` (holds / does not hold / holds only for
    ...), ``evidence`` (the numbers it rests on)."""
    out = []
    measured = [r for r in times if r.get("status") == "measured"]
    if measured:
        f1 = verdict_fig1(measured)
        methods = [m for m in f1 if m not in ("fastest_by_sparsity", "ours_fastest_everywhere")]
        falling = [m for m in methods if f1[m]["falls_monotonically"]]
        ev = "; ".join(f"{m}: {f1[m]['ms_at_lowest_s']:.1f} -> {f1[m]['ms_at_highest_s']:.1f} ms"
                       for m in methods)
        ev += "; fastest by s: " + ", ".join(f"{s:g} {m}" for s, m in
                                             sorted(f1["fastest_by_sparsity"].items()))
        if len(falling) == len(methods) and f1["ours_fastest_everywhere"]:
            v = "holds"
        elif not falling and not f1["ours_fastest_everywhere"]:
            v = "does not hold"
        else:
            v = ("holds only for: time falls for " + (", ".join(falling) or "no method")
                 + ("; ours fastest at every s" if f1["ours_fastest_everywhere"] else
                    "; ours not fastest at every s"))
        out.append({"claim": "Fig. 1: inference time falls with sparsity for every method "
                             "and is lowest for ours", "verdict": v, "evidence": ev})
    if mem:
        r_model, r_peak = mem["model_ratio"], mem["peak_ratio"]
        ok = [n for n, r in (("whole-model bytes", r_model), ("peak inference memory", r_peak))
              if r <= 0.5]
        v = "holds" if len(ok) == 2 else ("holds only for " + ok[0] if ok else "does not hold")
        out.append({"claim": f"INT8 + {op:.0%} sparsity cuts memory by 50%", "verdict": v,
                    "evidence": f"whole-model bytes x{r_model:.3f}, peak inference memory "
                                f"x{r_peak:.3f} of dense"})
    if accs:
        dense = {r["task"]: r["accuracy"] for r in accs if r["method"] == "dense"}
        at_op = [r for r in accs if r["method"] != "dense" and r.get("status") == "measured"
                 and abs(r["sparsity"] - op) < 1e-9]
        close = [r for r in at_op if dense[r["task"]] - r["accuracy"] <= tolerance]
        ev = "; ".join(f"{r['task']} {r['method']} {r['accuracy']:.3f} (dense "
                       f"{dense[r['task']]:.3f})" for r in at_op)
        v = ("holds" if at_op and len(close) == len(at_op) else "does not hold" if not close
             else "holds only for " + ", ".join(f"{r['method']} on {r['task']}" for r in close))
        out.append({"claim": f"every method keeps accuracy within {tolerance:.0%} of dense "
                             f"at s={op:g}", "verdict": v, "evidence": ev})
    conv_m = [r for r in conv if r.get("status") == "measured"]
    if conv_m:
        sizes = sorted({r["n_train"] for r in conv_m})
        wins = []
        for n in sizes:
            at = [r for r in conv_m if r["n_train"] == n and r["steps_to_target"] is not None]
            best = min(at, key=lambda r: r["seconds_to_target"])["method"] if at else None
            wins.append((n, best))
        ours_wins = [n for n, b in wins if b == "ours"]
        v = ("holds" if len(ours_wins) == len(sizes) else "does not hold" if not ours_wins
             else "holds only for n = " + _fmt_s(ours_wins))
        ev = "; ".join(f"n={n}: fastest {b or 'none reached the target'}" for n, b in wins)
        out.append({"claim": "Fig. 2: ours reaches the target accuracy fastest at every "
                             "training-sample size", "verdict": v, "evidence": ev})
    return out


def fig2(rows: list[dict], title: str = "Fig. 2: seconds to target vs training samples"):
    import plotly.graph_objects as go
    from plotly.colors import qualitative

    fig = go.Figure()
    for i, m in enumerate(m for m in ("dense", *METHODS)
                          if any(r["method"] == m and r["status"] == "measured" for r in rows)):
        pts = sorted((r["n_train"], r["seconds_to_target"]) for r in rows
                     if r["method"] == m and r["status"] == "measured")
        fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], name=m,
                        mode="lines+markers", line=dict(color=qualitative.Plotly[i % 10]))
    fig.update_layout(title=title, xaxis_title="training pairs n", xaxis_type="log",
                      yaxis_title="seconds to target (gap: not reached)", height=380)
    return fig
