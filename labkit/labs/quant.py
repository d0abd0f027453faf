"""The quantization lab's steps, shared by notebook 06, its widgets and the report.

Each function does one measured step and returns tidy rows (dicts): simulate a config on
the labkit encoder (PTQ or QAT) or on all-MiniLM-L6-v2, sweep bit-widths, rank layers by
Hessian sensitivity and compare mixed precision with uniform bit-widths at the same bytes,
time fp32 / bf16 / INT8 / accelerated side by side, and count bytes per parameter.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch.nn.utils import parametrize

from .. import accelerate as A
from .. import figures as F
from .. import measure, train
from .. import validate as V
from ..data import batches
from ..model import build
from ..techniques import apply_, swap_modules
from ..techniques import hessian as H
from ..techniques import int8 as I
from ..techniques import quant as Q
from . import common as C

MODES = ("ptq", "qat")


# --------------------------------------------------------------------------- simulate

def fake_config(bits=8, granularity="channel", group_size=1, symmetric=True,
                activations=False, act_bits=8, calibration="minmax", bits_by_layer=()):
    return Q.FakeQuantConfig(bits=bits, granularity=granularity, group_size=group_size,
                             symmetric=symmetric, activations=activations, act_bits=act_bits,
                             calibration=calibration, bits_by_layer=tuple(bits_by_layer))


def quantized_copy(base, config: Q.FakeQuantConfig, calib=(), forward=None):
    """A fake-quantized copy of ``base``; activation ranges calibrated on ``calib``."""
    model = copy.deepcopy(base)
    apply_(model, config)
    if config.activations:
        Q.calibrate(model, calib, forward)
    return model


def evaluate_nli(model, task) -> dict:
    with parametrize.cached():
        return train.evaluate(model, task.eval)


def simulate_nli(base, task, config: Q.FakeQuantConfig, mode: str = "ptq",
                 qat_steps: int = 50, lr: float = 3e-4, batch_size: int = 32,
                 calib_batches: int = 4, seed: int = 0) -> tuple:
    """PTQ (calibrate, evaluate) or QAT (calibrate, fine-tune through the STE, evaluate)
    of the labkit encoder on a pair task. Returns ``(model, row)``."""
    V.choice("mode", mode, MODES)
    it = batches(task.train, batch_size, seed=seed + 1)
    calib = [next(it) for _ in range(calib_batches)]
    model = quantized_copy(base, config, calib)
    if mode == "qat":
        train.fit(model, it, qat_steps, lr=lr, progress=False, seed=seed)
    q = Q.quantized_bytes(model)
    return model, {"model": "labkit", "mode": mode, "bits": config.bits,
                   "granularity": config.granularity, "group_size": config.group_size,
                   "symmetric": config.symmetric, "activations": config.activations,
                   **evaluate_nli(model, task), "bytes": q["total"],
                   "quantized_ratio": q["quantized_ratio"]}


# --------------------------------------------------------------------------- MiniLM

class MiniLM:
    """all-MiniLM-L6-v2 with a fixed batch of real sentences and its fp32 embeddings."""

    def __init__(self, n_sentences: int | None = None, max_len: int = 64):
        from .. import pretrained as PT

        self.PT = PT
        self.model, self.tok = PT.load_minilm()
        self.batch = PT.encode(self.tok, PT.sentences(n_sentences), max_len)
        with torch.no_grad():
            self.ref = PT.embed(self.model, self.batch)

    def cosine(self, model) -> dict:
        with torch.no_grad(), parametrize.cached():
            return self.PT.cosine_to(self.ref, self.PT.embed(model, self.batch))

    def simulate(self, config: Q.FakeQuantConfig) -> tuple:
        fwd = (lambda m, b: m(**b))
        model = quantized_copy(self.model, config, [self.batch], fwd)
        q = Q.quantized_bytes(model)
        return model, {"model": "minilm", "bits": config.bits,
                       "granularity": config.granularity, "group_size": config.group_size,
                       "symmetric": config.symmetric, "activations": config.activations,
                       **self.cosine(model), "bytes": q["total"],
                       "quantized_ratio": q["quantized_ratio"]}

    def hessian_loss(self):
        """Loss whose Hessian at the fp32 weights measures embedding sensitivity:
        ``sum ||e(W) - e(W0)||^2`` (Gauss-Newton ``2 J^T J``, PSD), on an eager-attention
        copy (double backward)."""
        eager, _ = self.PT.load_minilm(attn_implementation="eager")
        ref = self.ref

        def loss():
            return (self.PT.embed(eager, self.batch) - ref).pow(2).sum()

        return eager, loss


# --------------------------------------------------------------------------- Hessian

BITS = tuple(range(2, 9))  # candidate widths for mixed precision


def sensitivity(model, loss_fn, samples=8, eig_iters=0, bits=BITS,
                granularity="channel", group_size=1, symmetric=True,
                trace_group=None) -> list[dict]:
    return H.sensitivity(model, loss_fn, samples, eig_iters, bits, granularity, group_size,
                         symmetric, trace_group=trace_group)


def layer_shapes(model) -> dict:
    return {n: tuple(w.shape) for n, w in H.linear_weights(model).items()}


def mixed_assignment(rows, shapes, budget_bits: int, bits=BITS,
                     granularity="channel", group_size=1, symmetric=True) -> tuple:
    """Bits per layer under the byte budget of uniform ``budget_bits`` (same metadata)."""
    Q.check_bits("budget_bits", budget_bits)
    budget = H.budget_bytes(rows, budget_bits, granularity, group_size, symmetric, shapes)
    assign = H.assign_bits(rows, budget, bits, shapes, granularity, group_size, symmetric)
    used = sum(Q.weight_bytes(shapes[k], b, granularity, group_size, symmetric)["total"]
               for k, b in assign.items())
    return assign, budget, used


# --------------------------------------------------------------------------- accelerate

def latency_rows(model, inputs: tuple, min_run_time=0.1, label="labkit",
                 accelerate=True, kwargs=None, rounds: int = 3) -> list[dict]:
    """fp32, bf16, torchao INT8 (dynamic, weight-only), torch's deprecated dynamic INT8 and
    accelerate (per-layer fastest of all of them), timed side by side in rotated rounds
    (:func:`labkit.measure.paired`, speedup = median of per-round fp32 / variant)."""
    kwargs = kwargs or {}
    variants = {"fp32": model, "bf16": copy.deepcopy(model).to(torch.bfloat16),
                "int8_dynamic": apply_(copy.deepcopy(model), I.Int8Config("dynamic")),
                "int8_weight_only": apply_(copy.deepcopy(model), I.Int8Config("weight_only"))}
    td = copy.deepcopy(model)
    swap_modules(td, Q.linear_selector(td, exact=True),
                 lambda n, m: I.AcceleratedLinear(m, "torch_dynamic"))
    variants["torch_dynamic"] = td
    notes = {"torch_dynamic": "; ".join(sorted({w for m in td.modules()
                                                for w in getattr(m, "labkit_warnings", ())}))}
    chosen = None
    if accelerate:
        acc = copy.deepcopy(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = I.accelerate_(acc, inputs, min_run_time=min_run_time / 5, kwargs=kwargs)
        variants["accelerated"] = acc
        summary = A.summary(report)
        chosen = summary["chosen"] + " (reverted)" if summary["reverted"] else "+".join(
            sorted({r["chosen"] for r in report if r["layer"] != A.MODEL}))
        notes["accelerated"] = "; ".join(sorted({str(w.message)[:160] for w in caught}))

    times = C.timed(variants, inputs, "fp32", rounds=rounds, min_run_time=min_run_time,
                    kwargs=kwargs)
    shape = ",".join(str(tuple(x.shape)) for x in inputs if torch.is_tensor(x)) or \
        ",".join(f"{k}{tuple(v.shape)}" for k, v in kwargs.items() if torch.is_tensor(v))
    rows = []
    for t in times:
        k = t["variant"]
        path = I.kernel_path_of(k) if k != "accelerated" else f"per layer: {chosen}"
        rows.append({"model": label, "variant": k, "input": shape, "latency_ms": t["median_ms"],
                     "min_ms": t["min_ms"], "max_ms": t["max_ms"],
                     "speedup_vs_fp32": t["speedup"], "speedup_min": t["speedup_min"],
                     "speedup_max": t["speedup_max"], "rounds": rounds, "verdict": t["verdict"],
                     "bytes": measure.model_bytes(variants[k])["total"], "kernel_path": path,
                     "warnings": notes.get(k, "")})
    return rows


# --------------------------------------------------------------------------- memory

def memory_rows(shapes: dict, bits_list=(8, 4, 3, 2), granularity="channel", group_size=1,
                symmetric=True) -> list[dict]:
    """Bytes per parameter of the selected linears at each bit-width, metadata counted,
    and INT8 with 50% sparsity (structured rows, 2:4 with indices)."""
    n = sum(a * b for a, b in shapes.values())
    rows = [{"variant": "fp32", "bytes": 4 * n, "bytes_per_param": 4.0, "ratio_vs_fp32": 1.0}]
    for b in bits_list:
        tot = sum(Q.weight_bytes(s, b, granularity, group_size, symmetric)["total"]
                  for s in shapes.values())
        rows.append({"variant": f"{b}-bit {granularity}", "bytes": tot,
                     "bytes_per_param": tot / n, "ratio_vs_fp32": tot / (4 * n)})
    for structure in ("row", "nm"):
        tot = sum(I.int8_weight_bytes(s, structure, 0.5)["total"] for s in shapes.values())
        name = "int8 + 50% rows removed" if structure == "row" else "int8 + 2:4 (+2-bit idx)"
        rows.append({"variant": name, "bytes": tot, "bytes_per_param": tot / n,
                     "ratio_vs_fp32": tot / (4 * n)})
    return rows


# --------------------------------------------------------------------------- notebook 06

def baseline(task: str, source: str, vocab_size: int, preset: str, steps: int, lr: float,
             batch_size: int, n_train: int, n_eval: int, seed: int):
    """The trained fp32 encoder every quantized variant copies (cached per machine)."""
    from .pruning import nli_baseline

    return nli_baseline(task, source, vocab_size, steps, n_train, n_eval, seed, preset=preset,
                        lr=lr, batch_size=batch_size)


def bit_sweep(base, task, granularity, group_size, symmetric, activations, calibration,
              seed=0, bits=(8, 4, 3, 2), board=None) -> list[dict]:
    """PTQ at each bit-width (same granularity); quality against bits on ``board``."""
    out = []
    for b in bits:
        c = fake_config(b, granularity, group_size, symmetric, activations,
                        calibration=calibration)
        _, r = simulate_nli(base, task, c, "ptq", seed=seed)
        out.append(r)
        if board is not None:
            board.log("quality vs bits", "eval loss (PTQ)", b, r["loss"])
            board.log("quality vs bits", "eval accuracy (PTQ)", b, r["accuracy"], flush=True)
    return out


def sensitivity_figure(sens: list[dict]):
    import plotly.graph_objects as go  # noqa: F401  (plotly is the figure library)
    from plotly.subplots import make_subplots

    fig = make_subplots(1, 2, subplot_titles=["avg Hessian trace per layer", "bits assigned"])
    names = [r["layer"] for r in sens]
    fig.add_bar(x=names, y=[r["avg_trace"] for r in sens], name="trace / n", row=1, col=1)
    fig.add_bar(x=names, y=[r["bits"] for r in sens], name="bits", row=1, col=2)
    F.layout(fig)
    fig.update_layout(showlegend=False)
    return fig


def latency_figure(lat: list[dict], preset: str):
    """Grouped bars: median latency per variant and batch, min-max over rounds as error."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for v in dict.fromkeys(r["variant"] for r in lat):
        rs = [r for r in lat if r["variant"] == v]
        fig.add_bar(x=[f"batch {r['batch']}" for r in rs], y=[r["latency_ms"] for r in rs],
                    name=v, error_y={"type": "data", "symmetric": False,
                                     "array": [r["max_ms"] - r["latency_ms"] for r in rs],
                                     "arrayminus": [r["latency_ms"] - r["min_ms"] for r in rs]})
    fig.update_layout(barmode="group")
    return F.style(F.layout(fig, title=f"latency, {preset} encoder (ms, median of paired "
                            "rounds, bars min-max; lower is better)"))


def memory_figure(mem: list[dict]):
    import plotly.graph_objects as go

    fig = go.Figure(go.Bar(x=[r["variant"] for r in mem], y=[r["bytes_per_param"] for r in mem]))
    return F.layout(fig, title="bytes per parameter (block linears)")


def memory_metrics(mem: list[dict], granularity: str) -> dict:
    mm = {r["variant"]: r["ratio_vs_fp32"] for r in mem}
    int8 = mm[f"8-bit {granularity}"]
    rows = mm["int8 + 50% rows removed"]
    return {"int8_bytes_ratio": int8, "int8_sparse_rows_bytes_ratio": rows,
            "int8_nm_bytes_ratio": mm["int8 + 2:4 (+2-bit idx)"],
            "sparse_vs_int8_dense": rows / int8}


def hessian_study(base, task, budget_bits: int, samples: int, eig_iters: int,
                  granularity: str, hessian_batch: int, seed: int = 0):
    """Per-layer Hessian trace / top eigenvalue of the training loss on one batch (per-head
    traces of q/k/v: Q-BERT's groups), bits assigned under the bytes of uniform
    ``budget_bits``, and mixed vs uniform evaluated. Returns (sensitivity rows, tidy rows,
    metrics)."""
    hb = {k: v[:hessian_batch] for k, v in task.train.items()}
    sens = sensitivity(base, lambda: base.loss(hb), samples, eig_iters,
                       granularity=granularity if granularity != "group" else "channel",
                       trace_group=base.cfg.head_dim)
    assign, budget, used = mixed_assignment(sens, layer_shapes(base), budget_bits)
    rows = []
    for r in sens:
        r["bits"] = assign[r["layer"]]
        rows.append({"section": "sensitivity", "model": "labkit",
                     **{k: v for k, v in r.items() if k != "group_traces"},
                     "group_traces": str([round(t, 6) for t in (r["group_traces"] or [])])})
    _, mixed = simulate_nli(base, task, fake_config(budget_bits, "channel",
                                                    bits_by_layer=assign.items()), seed=seed)
    _, uniform = simulate_nli(base, task, fake_config(budget_bits, "channel"), seed=seed)
    rows += [{"section": "mixed_vs_uniform", "model": "labkit", "variant": "mixed", **mixed},
             {"section": "mixed_vs_uniform", "model": "labkit", "variant": "uniform",
              **uniform}]
    metrics = {"budget_bytes": budget, "mixed_bytes": used, "mixed_eval_loss": mixed["loss"],
               "uniform_eval_loss": uniform["loss"], "mixed_eval_accuracy": mixed["accuracy"],
               "uniform_eval_accuracy": uniform["accuracy"],
               "mixed_beats_uniform_loss": mixed["loss"] < uniform["loss"]}
    return sens, rows, metrics


def minilm_study(n_sentences: int, group_size: int, symmetric: bool, budget_bits: int,
                 hessian_samples: int, min_run_time: float):
    """all-MiniLM-L6-v2: cosine to fp32 at 8/4/3/2 bits (per channel and group-wise),
    Hessian mixed precision vs uniform at two budgets, and fp32/bf16/INT8 latency. Returns
    (table rows, tidy rows, metrics)."""
    lm = MiniLM(n_sentences)
    table, rows, metrics = [], [], {}
    for b in (8, 4, 3, 2):
        for gran, gs in (("channel", 1), ("group", group_size)):
            _, r = lm.simulate(fake_config(b, gran, gs, symmetric))
            table.append(r)
            rows.append({"section": "minilm", **r})
    eager, loss = lm.hessian_loss()
    sens = sensitivity(eager, loss, hessian_samples)
    shapes = layer_shapes(eager)
    for bb in (budget_bits, budget_bits + 1):  # a hard budget and an easier one
        if bb > 8:
            continue
        assign, budget, used = mixed_assignment(sens, shapes, bb)
        _, mixed = lm.simulate(fake_config(bb, "channel", bits_by_layer=assign.items()))
        _, uni = lm.simulate(fake_config(bb, "channel"))
        rows += [{"section": "mixed_vs_uniform", "variant": "mixed", "budget_bits": bb,
                  "budget_bytes": budget, "used_bytes": used,
                  "bits_used": str(sorted(assign.values())), **mixed},
                 {"section": "mixed_vs_uniform", "variant": "uniform", "budget_bits": bb,
                  "budget_bytes": budget, **uni}]
        metrics.update({f"minilm_mixed_cosine_b{bb}": mixed["cosine_mean"],
                        f"minilm_uniform_cosine_b{bb}": uni["cosine_mean"]})
    by = {(r["bits"], r["granularity"]): r["cosine_mean"] for r in table}
    metrics.update({f"minilm_cosine_{b}bit": by[(b, "channel")] for b in (8, 4, 3, 2)})
    lat = latency_rows(lm.model, (), min_run_time, label="minilm", accelerate=False,
                       kwargs=lm.batch)
    rows += [{"section": "latency", **r} for r in lat]
    metrics["minilm_int8_speedup"] = {r["variant"]: r for r in lat}["int8_dynamic"][
        "speedup_vs_fp32"]
    return table, rows, metrics


def latency_study(preset: str, batch: int, ids, min_run_time: float, seed: int = 0):
    """The ``preset`` encoder (untrained: speed does not depend on the weights) at batch
    ``batch`` and 1, every variant side by side. Returns (rows, metrics)."""
    model = build(preset, kind="encoder", seed=seed).eval()
    lat = []
    for bsz in (batch, 1):
        x = ids[:1].repeat(bsz, 1).clamp_max(model.cfg.vocab_size - 1)  # (B, N)
        lat += [{"batch": bsz, **r} for r in latency_rows(model, (x,), min_run_time)]
    metrics = {f"speedup_b{r['batch']}_{r['variant']}": r["speedup_vs_fp32"] for r in lat}
    metrics["kernel_path_int8"] = I.kernel_path_of("int8_dynamic")
    return lat, metrics


__all__ = [
    "MODES",
    "MiniLM",
    "baseline",
    "bit_sweep",
    "evaluate_nli",
    "fake_config",
    "hessian_study",
    "latency_figure",
    "latency_rows",
    "latency_study",
    "layer_shapes",
    "memory_figure",
    "memory_metrics",
    "memory_rows",
    "minilm_study",
    "mixed_assignment",
    "quantized_copy",
    "sensitivity",
    "sensitivity_figure",
    "simulate_nli",
]
