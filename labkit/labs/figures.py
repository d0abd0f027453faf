"""The figures the labs draw (notebooks 01-03), in the one style of :mod:`labkit.figures`
(a colour per series everywhere, one legend, log axes where values span decades).

* :func:`latency_board`, :func:`spectrum_board`, :func:`error_board`: attention latency and
  memory against ``n``; singular values and rank-k errors of attention maps (Linformer,
  Wang et al. 2020); kernel-attention error against ``m`` and denominator instability
  (Performer, Choromanski et al. 2021).
* :func:`spectrum_figure`, :func:`size_figure`: trained FFN spectra and SVD truncation;
  latency and bytes against model size (factorized FFN, ALBERT sharing).
"""
from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..figures import style
from ..ui import LiveBoard


def latency_board(rows, title: str = "one attention op vs n"):
    """Latency and peak memory against ``n`` on log-log axes, a series per method."""
    board = LiveBoard(panels=["latency ms", "peak MB"], title=title, live=False,
                      xaxis={"latency ms": "n", "peak MB": "n"})
    for r in rows:
        board.log("latency ms", r["method"], r["n"], r["median_ms"])
        board.log("peak MB", r["method"], r["n"], r["peak_bytes"] / 2 ** 20)
    for c in (1, 2):
        board.fig.update_xaxes(type="log", row=1, col=c)
        board.fig.update_yaxes(type="log", row=1, col=c)
    style(board.fig)
    return board


def spectrum_board(spec, err, ks):
    """Singular values per layer (log) and the rank-k error of each method, mean over
    layers."""
    board = LiveBoard(panels=["singular values", "rank-k error"], title="attention spectrum",
                      live=False, xaxis={"singular values": "index i", "rank-k error": "k"},
                      yaxis={"singular values": "sigma_i / sigma_1 (log)",
                             "rank-k error": "||P - A_k|| / ||P||"})
    for r in spec:
        board.log("singular values", f"layer {r['layer']}", r["index"], r["sigma_rel"])
    for method in ("svd", "linformer_jl", "random_subspace"):
        for kk in ks:
            vals = [r["rel_error"] for r in err if r["method"] == method and r["k"] == kk]
            if vals:
                board.log("rank-k error", method, kk, sum(vals) / len(vals))
    board.fig.update_yaxes(type="log", row=1, col=1)
    style(board.fig)
    return board


def error_board(err, inst, m_grid):
    """Kernel-attention error against ``m`` (ELU+1 as a flat reference) and the fraction of
    non-positive denominators against the q, k scale."""
    board = LiveBoard(panels=["error vs m", "trig instability"], live=False,
                      title="kernel attention vs exact softmax",
                      xaxis={"error vs m": "m", "trig instability": "q, k scale"},
                      yaxis={"error vs m": "relative error (log)",
                             "trig instability": "fraction of denominators <= 0"})
    for r in err.itertuples():
        if r.feature_map == "elu":  # ELU+1 has no m: drawn flat
            for m in m_grid:
                board.log("error vs m", "elu (no m)", m, r.rel_error)
        else:
            board.log("error vs m", r.feature_map, r.m, r.rel_error)
    for r in inst.itertuples():
        board.log("trig instability", r.feature_map, r.scale, r.nonpositive_frac)
    board.fig.update_xaxes(type="log", row=1, col=1)
    board.fig.update_yaxes(type="log", row=1, col=1)
    board.fig.update_xaxes(type="log", row=1, col=2)
    style(board.fig)
    return board


def spectrum_figure(spectrum: list[dict], svd_rows: list[dict]):
    """Singular values of every trained FFN matrix (log), and the SVD-truncation weight
    error and eval loss against rank, with the dense eval loss as a reference line."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=[
        "singular values of trained FFN weights (sigma_i / sigma_1)",
        "SVD truncation vs rank (no fine-tuning)"], specs=[[{}, {"secondary_y": True}]])
    by_matrix: dict = {}
    for r in spectrum:
        by_matrix.setdefault(r["matrix"], []).append(r)
    for name, rs in by_matrix.items():
        fig.add_trace(go.Scatter(x=[r["index"] for r in rs], y=[r["sigma_rel"] for r in rs],
                                 name=name, mode="lines"), 1, 1)
    low = [r for r in svd_rows if r["rank"] != "dense"]
    dense_loss = next(r["eval_loss"] for r in svd_rows if r["rank"] == "dense")
    fig.add_trace(go.Scatter(x=[r["rank"] for r in low], y=[r["weight_error"] for r in low],
                             mode="lines+markers", name="weight error ||W-W_r||/||W||"), 1, 2)
    fig.add_trace(go.Scatter(x=[r["rank"] for r in low], y=[r["eval_loss"] for r in low],
                             mode="lines+markers", name="eval loss (SVD-truncated)"), 1, 2,
                  secondary_y=True)
    fig.add_hline(y=dense_loss, line_dash="dot", annotation_text="dense eval loss", row=1,
                  col=2, secondary_y=True)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_xaxes(title_text="index i", row=1, col=1)
    fig.update_xaxes(title_text="rank r", type="log", row=1, col=2)
    fig.update_layout(height=380, legend={"orientation": "h", "y": -0.25})
    return style(fig)


def size_figure(size_rows: list[dict]):
    """Latency, weight bytes and peak activation bytes against preset size, a colour per
    variant and one legend."""
    fig = make_subplots(rows=1, cols=3, subplot_titles=["latency (ms)", "weight bytes (MB)",
                                                        "peak activation bytes (MB)"])
    names = list(dict.fromkeys(r["variant"] for r in size_rows))
    for variant in names:
        rs = [r for r in size_rows if r["variant"] == variant]
        for col, key, scale in ((1, "latency_ms", 1), (2, "weight_bytes", 1e-6),
                                (3, "peak_activation_bytes", 1e-6)):
            fig.add_trace(go.Scatter(x=[r["size"] for r in rs], y=[r[key] * scale for r in rs],
                                     name=variant, legendgroup=variant, showlegend=col == 1,
                                     mode="lines+markers"), 1, col)
    fig.update_layout(height=360, legend={"orientation": "h", "y": -0.2})
    return style(fig)


__all__ = ["error_board", "latency_board", "size_figure", "spectrum_board", "spectrum_figure"]
