"""What notebook 05 (the sparse-structure benchmark) runs, so the notebook is a thin driver:
its list parameters, the two figures (the per-layer sweep, and the first paper's
inference time against sparsity) and the headline metrics. The measurements themselves are
:func:`labkit.benchmarks.sparsity.sweep` and :func:`labkit.labs.sparsity.model_latency_sweep`,
both side by side through :func:`labkit.measure.paired`.
"""
from __future__ import annotations

from .. import figures as F
from .. import kernels as K
from .. import validate as V
from ..benchmarks import sparsity as B
from ..model import PRESETS
from ..techniques import sparsity as S

SWEEP_STRUCTURES = (*B.STRUCTURE_PATHS, "nm")
# The paper's claim (time falls with sparsity) first, then what the kernels gave.
HEADLINE = ("fig_time_ratio_best", "fig_time_ratio_best_line", "fig_speedup_best",
            "sweep_speedup_best", "nm_speed_measured")


def check(p: dict) -> None:
    """Notebook 05's own knobs (``p``: its parameters), named when out of range."""
    V.integer("tokens", p["tokens"], 1, 65536)
    V.integer("block", p["block"], 1, 1024)
    V.integer("fig_rounds", p["fig_rounds"], 1, 100)
    V.integer("fig_batch", p["fig_batch"], 1, 1024)
    V.integer("fig_seq", p["fig_seq"], 2, 512)
    V.choice("fig_preset", p["fig_preset"], PRESETS)


def shapes(text: str, block: int) -> list[tuple[int, int]]:
    """``"3072x768,768x3072"`` -> [(3072, 768), (768, 3072)], each tiled by ``block``."""
    try:
        out = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s.strip()]
    except ValueError:
        out = []
    if not out or any(len(s) != 2 or min(s) < 1 for s in out):
        raise V.LabkitConfigError("shapes", text, "a comma list of OUTxIN, e.g. '3072x768'")
    for s in out:
        if s[0] % block or s[1] % block:
            raise V.LabkitConfigError("block", block, f"a divisor of every shape (got {s})")
    return out


def lines(text: str) -> list[tuple[str, str]]:
    """``"unstructured/csr,neuron/accelerate"`` -> [(structure, path), ...]."""
    out = []
    for item in text.split(","):
        st, _, path = item.strip().partition("/")
        if st not in S.STRUCTURES or path not in (*K.LINEAR_PATHS, "accelerate"):
            raise V.LabkitConfigError("fig_lines", text, "a comma list of structure/path, "
                                      f"structures {S.STRUCTURES}, paths {K.LINEAR_PATHS} or "
                                      "'accelerate'")
        out.append((st, path))
    return out


def sweep_figure(sweep: list[dict]):
    """Speedup vs dense (log), useful GFLOP/s and bytes vs dense against sparsity, a colour
    per path and a dash per shape; simulated (N:M) paths have no speed panel line."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=3, subplot_titles=[
        "speedup vs dense (log)", "useful GFLOP/s (2 T nnz / time)", "bytes vs dense fp32"])
    dashes = ["solid", "dot", "dash", "dashdot"]
    for j, shp in enumerate(dict.fromkeys(r["shape"] for r in sweep)):
        groups: dict = {}
        for r in sweep:
            if r["shape"] == shp and r["path"] != "dense":
                groups.setdefault(r["path"], []).append(r)
        for path, g in groups.items():
            g = sorted(g, key=lambda r: r["sparsity"])
            name, x = f"{path} {shp}", [r["sparsity"] for r in g]
            style = {"color": F.color(path), "dash": dashes[j % len(dashes)]}
            kw = {"name": name, "legendgroup": name, "mode": "lines+markers", "line": style}
            if all(r["speed_measured"] for r in g):
                fig.add_trace(go.Scatter(x=x, y=[r["speedup"] for r in g], **kw), 1, 1)
            fig.add_trace(go.Scatter(x=x, y=[r["gflops_useful"] for r in g], showlegend=False,
                                     **kw), 1, 2)
            fig.add_trace(go.Scatter(x=x, y=[r["bytes_vs_dense"] for r in g],
                                     showlegend=False, **kw), 1, 3)
    fig.add_hline(y=1.0, line_dash="dot", row=1, col=1)
    fig.add_hline(y=1.0, line_dash="dot", row=1, col=3)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_xaxes(title_text="sparsity")
    F.layout(fig)
    return fig


def block_summary(sweep: list[dict]) -> list[dict]:
    """Per shape, at the highest swept block sparsity <= 90%: torch BSR next to labkit's
    block-gathered dense path (speedup vs dense)."""
    out = []
    for shp in dict.fromkeys(r["shape"] for r in sweep):
        at = [r for r in sweep if r["shape"] == shp and r["structure"] == "block"]
        if not at:
            continue
        below = [r["sparsity"] for r in at if r["sparsity"] <= 0.9]
        s = max(below) if below else min(r["sparsity"] for r in at)
        by = {r["path"]: r["speedup"] for r in at if r["sparsity"] == s}
        out.append({"shape": shp, "block_sparsity": s, "bsr": by.get("bsr"),
                    "block-gathered-dense": by.get("block-gathered-dense")})
    return out


def latency_figure(rows: list[dict], title: str):
    """The first paper's figure: inference time against MLP sparsity, one line per
    (structure, path), band = min-max over paired rounds; and time relative to dense."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=[
        "inference time (ms), band = min-max over rounds",
        "time relative to dense in the same round (1 / paired speedup)"])
    for line in dict.fromkeys(r["line"] for r in rows):
        g = sorted((r for r in rows if r["line"] == line), key=lambda r: r["sparsity"])
        x = [r["sparsity"] for r in g]
        color = F.color(line)  # the house colour of this series, the same in every figure
        dash = "dot" if line == "dense" else None
        name = line + ("" if all(r["speed_measured"] for r in g)
                       else " (simulated, speed not measured)")
        fig.add_trace(go.Scatter(x=x + x[::-1], y=[r["max_ms"] for r in g]
                                 + [r["min_ms"] for r in g][::-1], fill="toself",
                                 line={"width": 0}, opacity=0.2, fillcolor=color,
                                 showlegend=False, hoverinfo="skip", legendgroup=line), 1, 1)
        fig.add_trace(go.Scatter(x=x, y=[r["median_ms"] for r in g], name=name,
                                 mode="lines+markers", line={"color": color, "dash": dash},
                                 legendgroup=line), 1, 1)
        fig.add_trace(go.Scatter(x=x, y=[1 / r["speedup"] for r in g], name=name,
                                 mode="lines+markers", line={"color": color, "dash": dash},
                                 legendgroup=line, showlegend=False), 1, 2)
    F.layout(fig, title=title)
    fig.update_xaxes(title_text="MLP sparsity")
    return fig


def metrics(sweep: list[dict], be: list[dict], fig_rows: list[dict]) -> dict:
    """Headline numbers: break-even sparsities, best measured speedups, CSR bytes at 90%,
    and the figure's first/last times and last speedup per line."""
    m = {f"break_even_{r['shape']}_{r['structure']}_{r['path']}": r["break_even_sparsity"]
         for r in be}
    for r in sweep:
        if r["speed_measured"] and r["path"] != "dense":
            key = f"max_speedup_{r['shape']}_{r['path']}"
            m[key] = max(m.get(key, 0.0), float(r["speedup"]))
        if r["path"] == "csr" and abs(r["sparsity"] - 0.9) < 1e-9:
            m[f"csr_bytes_vs_dense_at_0.9_{r['shape']}"] = r["bytes_vs_dense"]
    lo, hi = min(r["sparsity"] for r in fig_rows), max(r["sparsity"] for r in fig_rows)
    for r in fig_rows:
        if r["sparsity"] in (lo, hi):
            m[f"fig_ms_{r['line']}_at_{r['sparsity']}"] = r["median_ms"]
        if r["sparsity"] == hi:
            m[f"fig_speedup_{r['line']}_at_{hi}"] = r["speedup"]
    # stable names (whatever the shapes and lines): the best measured line's time at the
    # highest figure sparsity over its time at the lowest (< 1: time fell, as claimed)
    measured = [r for r in fig_rows if r["speed_measured"] and r["line"] != "dense"]
    at = {(r["line"], r["sparsity"]): r for r in measured}
    ratios = {line: at[(line, hi)]["median_ms"] / at[(line, lo)]["median_ms"]
              for line, _ in at if (line, lo) in at and (line, hi) in at}
    best = min(ratios, key=ratios.get) if ratios else None
    m["fig_time_ratio_best"] = ratios.get(best)
    m["fig_time_ratio_best_line"] = best
    m["fig_speedup_best"] = max((r["speedup"] for r in measured if r["sparsity"] == hi),
                                default=None)
    m["sweep_speedup_best"] = max((float(r["speedup"]) for r in sweep
                                   if r["speed_measured"] and r["path"] != "dense"), default=None)
    m["nm_speed_measured"] = False  # kernels/nm.py: no N:M kernel runs on CPU
    m["n_sweep_rows"] = len(sweep)
    return m


__all__ = ["HEADLINE", "SWEEP_STRUCTURES", "block_summary", "check", "latency_figure", "lines",
           "metrics", "shapes", "sweep_figure"]
