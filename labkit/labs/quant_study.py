"""Notebook 06's studies on :mod:`labkit.labs.quant`'s steps, so the notebook is a thin
driver: the knob check, the bit sweep, Q-BERT's Hessian study (Shen et al. 2020, *Q-BERT:
Hessian Based Ultra Low Precision Quantization of BERT*: per-layer trace, bits under a byte
budget, mixed vs uniform), the MiniLM study, side-by-side latency, each technique's accuracy
cost next to its speed and bytes, the figures and the headline metrics.
"""
from __future__ import annotations

from .. import figures as F
from .. import validate as V
from ..model import PRESETS, build, preset
from ..techniques import expected
from ..techniques import int8 as I
from ..techniques import quant as Q
from .quant import (
    MODES,
    MiniLM,
    fake_config,
    latency_rows,
    layer_shapes,
    mixed_assignment,
    sensitivity,
    simulate_nli,
)

HEADLINE = ("int8_sparse_rows_bytes_ratio", "int8_bytes_ratio", "int8_speedup",
            "int8_sim_accuracy_delta", "mixed_beats_uniform_loss")


def check(p: dict, config: Q.FakeQuantConfig) -> None:
    """Notebook 06's own knobs (``p``), checked before any training; the quantization
    fields were checked by ``config`` itself. A group size must divide the tiny encoder's
    layers (MiniLM's are checked when its copy is quantized)."""
    from ..classifiers import MODELS

    V.choice("model", p["model"], MODELS)
    V.choice("mode", p["mode"], MODES)
    V.choice("latency_preset", p["latency_preset"], PRESETS)
    Q.check_bits("budget_bits", p["budget_bits"])
    for k, lo in (("qat_steps", 1), ("hessian_samples", 1), ("eig_iters", 0),
                  ("hessian_batch", 1), ("minilm_hessian_samples", 1), ("latency_batch", 1)):
        V.integer(k, p[k], lo, 100_000)
    V.integer("n_sentences", p["n_sentences"], 2, 32)
    V.integer("peak_n", p["peak_n"], 64, 4096)
    V.integer("calibration_rows", p["calibration_rows"], 1, 100_000)
    ints("roofline_shape", p["roofline_shape"], 2)
    ints("roofline_batches", p["roofline_batches"])
    V.number("qat_lr", p["qat_lr"], 0.0, 1.0, lo_open=True)
    V.number("baseline_lr", p["baseline_lr"], 0.0, 1.0)  # 0: the backbone's recipe
    if p["model"] == "tiny":
        expected(preset("tiny", kind="encoder"), config)


def ints(name: str, text: str, n: int | None = None) -> tuple[int, ...]:
    """Positive integers from a notebook parameter ``"1,4,16"`` (``n`` of them if given)."""
    try:
        out = tuple(int(x) for x in str(text).replace(" ", "").split(",") if x)
    except ValueError:
        out = ()
    if not out or any(v < 1 for v in out) or (n is not None and len(out) != n):
        raise V.LabkitConfigError(name, text, f"{n or 'one or more'} positive integers, "
                                  "comma-separated (e.g. '768,3072')")
    return out


def latency_target(clf, latency_preset: str) -> tuple:
    """What section 5 times: MiniLM's fine-tuned classifier itself on its sample (with the
    padding mask), or, for the tiny backbone (too small to time usefully), the untrained
    ``latency_preset`` encoder on the workload's ids. Returns (model or preset, sample,
    label)."""
    if clf.backbone == "minilm":
        return clf.model, clf.workload.sample, "minilm classifier"
    return latency_preset, (clf.workload.sample[0], None), f"{latency_preset} encoder"



def bit_sweep(base, work, granularity, group_size, symmetric, activations, calibration,
              seed=0, bits=(8, 4, 3, 2), board=None) -> list[dict]:
    """PTQ at each bit-width (same granularity); quality against bits on ``board``."""
    out = []
    for b in bits:
        c = fake_config(b, granularity, group_size, symmetric, activations,
                        calibration=calibration)
        _, r = simulate_nli(base, work, c, "ptq", seed=seed)
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


def latency_figure(lat: list[dict], label: str):
    """Grouped bars: median latency per variant (a colour each) and batch, min-max over
    rounds as error; a log axis, so batch 1 stays readable beside the large batch."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for v in dict.fromkeys(r["variant"] for r in lat):
        rs = [r for r in lat if r["variant"] == v]
        fig.add_bar(x=[f"batch {r['batch']}" for r in rs], y=[r["latency_ms"] for r in rs],
                    name=v, marker_color=F.color(v),
                    error_y={"type": "data", "symmetric": False,
                             "array": [r["max_ms"] - r["latency_ms"] for r in rs],
                             "arrayminus": [r["latency_ms"] - r["min_ms"] for r in rs]})
    fig.update_layout(barmode="group")
    fig.update_yaxes(type="log", title_text="ms (log)")
    return F.layout(fig, title=f"latency, {label} (ms, median of paired rounds, bars min-max; "
                    "lower is better)")


def roofline_figure(rows: list[dict], peak: dict):
    """GFLOP/s (GOP/s for int8) of every path against batch size, log-log, with the
    machine's measured peaks as flat lines and each kind's memory roof (intensity x copy
    bandwidth) as a dotted curve: a path on its kind's memory roof is memory-bound, far
    below both roofs dispatch-bound, on the flat line compute-bound (hover: the regime)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    batches = sorted({r["batch"] for r in rows})
    for k in dict.fromkeys(r["path"] for r in rows):
        rs = sorted((r for r in rows if r["path"] == k), key=lambda r: r["batch"])
        fig.add_scatter(x=[r["batch"] for r in rs], y=[r["gflops"] for r in rs],
                        mode="lines+markers", name=k, line={"color": F.color(k)},
                        text=[f"{r['regime']}, {r['fraction_of_peak'] or 0:.0%} of the "
                              f"{r['peak_kind']} peak" for r in rs],
                        hovertemplate="%{x}: %{y:.1f} GFLOP/s, %{text}<extra>" + k
                        + "</extra>")
    for kind, g in peak["gflops"].items():
        if g:
            fig.add_scatter(x=[batches[0], batches[-1]], y=[g, g], mode="lines",
                            name=f"{kind} peak (measured)",
                            line={"dash": "dash", "color": F.color(f"{kind} peak")})
    for kind in ("fp32", "int8"):  # the memory roof at each batch: AI(batch) x bandwidth
        rs = {r["batch"]: r for r in rows if r["peak_kind"] == kind
              and not r["path"].startswith("static")}
        if rs:
            fig.add_scatter(x=batches, y=[rs[b]["intensity"] * peak["bandwidth_gbs"]
                                          for b in batches if b in rs],
                            mode="lines", name=f"{kind} memory roof",
                            line={"dash": "dot", "color": F.color(f"{kind} peak")})
    fig.update_xaxes(type="log", title_text="batch (tokens)")
    fig.update_yaxes(type="log", title_text="GFLOP/s (log)")
    return F.layout(fig, title=f"roofline: one linear {rows[0]['shape']} on every path vs "
                    f"this machine's peaks ({peak['threads']} thread(s), copy "
                    f"{peak['bandwidth_gbs']:.0f} GB/s)")


def roofline_metrics(rows: list[dict], peak: dict) -> dict:
    """The peaks and, at the largest batch, the best INT8 and fp32 paths' fractions of
    their peaks and the regime of each path at batch 1 and at the largest batch."""
    big = max(r["batch"] for r in rows)
    at = [r for r in rows if r["batch"] == big]
    best = {kind: max((r for r in at if r["peak_kind"] == kind), key=lambda r: r["gflops"],
                      default=None) for kind in ("fp32", "int8")}
    out = {f"peak_{k}_gflops": v for k, v in peak["gflops"].items()}
    out.update(peak_int8_over_fp32=peak["ratio"]["int8/fp32"],
               peak_bandwidth_gbs=peak["bandwidth_gbs"])
    for kind, r in best.items():
        if r is not None:
            out[f"roofline_best_{kind}_path"] = r["path"]
            out[f"roofline_best_{kind}_fraction_of_peak"] = r["fraction_of_peak"]
    for r in rows:
        if r["batch"] in (1, big):
            out[f"regime_{r['path']}_b{r['batch']}"] = r["regime"]
    return out


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


def hessian_study(base, work, budget_bits: int, samples: int, eig_iters: int,
                  granularity: str, hessian_batch: int, seed: int = 0):
    """Per-layer Hessian trace / top eigenvalue of the training loss on one batch (per-head
    traces of q/k/v: Q-BERT's groups), bits assigned under the bytes of uniform
    ``budget_bits``, and mixed vs uniform evaluated. Returns (sensitivity rows, tidy rows,
    metrics)."""
    hb = {k: v[:hessian_batch] for k, v in next(work.make_batches(seed)).items()}
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
    _, mixed = simulate_nli(base, work, fake_config(budget_bits, "channel",
                                                    bits_by_layer=assign.items()), seed=seed)
    _, uniform = simulate_nli(base, work, fake_config(budget_bits, "channel"), seed=seed)
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


def latency_study(model, batch: int, sample: tuple, min_run_time: float, seed: int = 0):
    """``model`` (a preset name: that encoder untrained, since speed does not depend on the
    weights; or a trained classifier, e.g. MiniLM) at batch ``batch`` and 1 on the first row
    of ``sample`` ``(ids, padding mask or None)``, every variant side by side. Returns
    (rows, metrics)."""
    if isinstance(model, str):
        model = build(model, kind="encoder", seed=seed)
    model = model.eval()
    ids, mask = sample
    lat = []
    for bsz in (batch, 1):
        x = (ids[:1].repeat(bsz, 1).clamp_max(model.cfg.vocab_size - 1),)  # (B, N)
        if mask is not None:
            x += (mask[:1].repeat(bsz, 1),)
        lat += [{"batch": bsz, **r} for r in latency_rows(model, x, min_run_time)]
    metrics = {f"speedup_b{r['batch']}_{r['variant']}": r["speedup_vs_fp32"] for r in lat}
    metrics["kernel_path_int8"] = I.kernel_path_of("int8_dynamic")
    int8 = next(r for r in lat if r["batch"] == batch and r["variant"] == "int8_dynamic")
    metrics.update(int8_speedup=int8["speedup_vs_fp32"], int8_speed_verdict=int8["verdict"])
    return lat, metrics


def technique_costs(fp32: dict, sweep: list[dict], lat: list[dict], mem: list[dict],
                    granularity: str, batch: int) -> list[dict]:
    """Each technique's accuracy cost (fp32 accuracy minus its own, on the same eval set)
    next to its measured speedup at ``batch`` and its bytes against fp32. Fake-quantized
    widths have no kernel here: their speed is not measured and says so."""
    speed = {r["variant"]: r for r in lat if r["batch"] == batch}
    ratio = {r["variant"]: r["ratio_vs_fp32"] for r in mem}
    rows = []
    for r in sweep:
        real = r["bits"] == 8  # INT8 runs for real (torchao), lower widths only simulated
        t = speed["int8_dynamic"] if real else None
        rows.append({"technique": f"{r['bits']}-bit {granularity} PTQ",
                     "accuracy": r["accuracy"], "accuracy_cost": fp32["accuracy"] - r["accuracy"],
                     "speedup_vs_fp32": t["speedup_vs_fp32"] if t else None,
                     "speed_verdict": t["verdict"] if t else "simulated: not measured",
                     "bytes_vs_fp32": ratio.get(f"{r['bits']}-bit {granularity}")})
    return rows


__all__ = [
    "HEADLINE",
    "bit_sweep",
    "check",
    "hessian_study",
    "ints",
    "latency_figure",
    "latency_study",
    "latency_target",
    "memory_figure",
    "memory_metrics",
    "minilm_study",
    "roofline_figure",
    "roofline_metrics",
    "sensitivity_figure",
    "technique_costs",
]
