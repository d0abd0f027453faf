"""Verdicts and figures of notebook 10 (:mod:`labkit.labs.paper`): each claim of the seed
paper turned into "holds" / "does not hold" / "holds only for ..." with the numbers it rests
on, Fig. 1 / Fig. 2 in the house style of :mod:`labkit.figures`, and the metrics
the notebook reports (:func:`metrics`, the headline first)."""
from __future__ import annotations

from .. import figures as F
from .paper import METHODS


def verdict_fig1(rows: list[dict]) -> dict:
    """Does time fall with sparsity for each method, and is ``ours`` the fastest at each s?
    ``rows``: {"method", "sparsity", "median_ms", "min_ms", "max_ms"} and, when timed side
    by side with dense (:func:`labkit.labs.paper.time_variants`), "speedup_min/max"; a row
    with ``simulated`` true (Q-BERT's 2-4 bit widths run as fp32 here) makes its method's
    ``time`` "inconclusive (simulated)" (``falls`` None), and it is left out of "fastest"."""
    out = {}
    simulated = {r["method"] for r in rows if r.get("simulated")}
    for m in sorted({r["method"] for r in rows} - {"dense"}):
        if m in simulated:  # timed as fp32: its real kernels do not run here
            ms = sorted((r["sparsity"], r["median_ms"]) for r in rows if r["method"] == m)
            out[m] = {"falls": None, "time": "inconclusive (simulated)",
                      "ms_at_lowest_s": ms[0][1], "ms_at_highest_s": ms[-1][1]}
            continue
        pts = sorted((r["sparsity"], r["median_ms"], r["min_ms"], r["max_ms"],
                      r.get("speedup_min"), r.get("speedup_max")) for r in rows
                     if r["method"] == m)
        # a fall counts only when the bands separate: slowest round at the highest s faster
        # than the fastest round at the lowest s (timer noise on a shared machine). With
        # paired rows the bands are of the speedup over dense measured in the same round, so
        # a machine getting less busy between sparsities does not read as a fall
        if len(pts) > 1 and pts[0][4] is not None and pts[-1][4] is not None:
            falls = pts[-1][4] > pts[0][5]
        else:
            falls = len(pts) > 1 and pts[-1][3] < pts[0][2]
        out[m] = {"falls": falls, "time": "falls" if falls else "does not fall",
                  "ms_at_lowest_s": pts[0][1], "ms_at_highest_s": pts[-1][1]}
    by_s = {}
    for r in rows:
        if r["method"] != "dense" and r["method"] not in simulated:
            by_s.setdefault(r["sparsity"], []).append(r)
    fastest = {s: min(rs, key=lambda r: r["median_ms"])["method"] for s, rs in by_s.items()}
    out["fastest_by_sparsity"] = fastest
    out["ours_fastest_everywhere"] = all(v == "ours" for v in fastest.values())
    return out


def fig1(rows: list[dict], title: str = "Fig. 1: inference time vs sparsity"):
    """Median time per method against sparsity, the band between the fastest and slowest
    round, in the house style (:mod:`labkit.figures`: a method keeps its colour in every
    figure, one legend, the cell's width, log axes where times span decades)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for m in _measured_methods(rows):
        pts = sorted((r["sparsity"], r["median_ms"], r["min_ms"], r["max_ms"]) for r in rows
                     if r.get("method") == m and r.get("status") == "measured")
        xs = [p[0] for p in pts]
        fig.add_scatter(x=xs + xs[::-1], y=[p[3] for p in pts] + [p[2] for p in pts][::-1],
                        fill="toself", line={"width": 0}, fillcolor=F.color(m), opacity=0.2,
                        showlegend=False, hoverinfo="skip", legendgroup=m)
        fig.add_scatter(x=xs, y=[p[1] for p in pts], name=m, mode="lines+markers")
    fig.update_xaxes(title_text="sparsity s")
    fig.update_yaxes(title_text="ms per batch")
    return F.style(F.layout(fig, title=title))


def _measured_methods(rows: list[dict]) -> list[str]:
    return [m for m in ("dense", *METHODS) if any(
        r.get("method") == m and r.get("status") == "measured" for r in rows)]


def _fmt_s(values) -> str:
    return ", ".join(f"{v:g}" for v in values)


def verdict_accuracy(accs: list[dict], op: float, tolerance: float = 0.01,
                     key: str = "accuracy", how: str = "") -> dict:
    """The accuracy claim on ``accs`` (rows of "method", "sparsity", "task", "accuracy",
    "status", the dense rows with method "dense"): "holds" when every method measured at
    ``op`` is within ``tolerance`` of its task's dense accuracy, "does not hold" when none
    is, else "holds only for ..."; ``how`` says which accuracies (one-shot, recovered)."""
    dense = {r["task"]: r["accuracy"] for r in accs if r["method"] == "dense"}
    at_op = [r for r in accs if r["method"] != "dense" and r.get("status") == "measured"
             and abs(r["sparsity"] - op) < 1e-9]
    close = [r for r in at_op if dense[r["task"]] - r["accuracy"] <= tolerance]
    ev = "; ".join(f"{r['task']} {r['method']} {r['accuracy']:.3f} (dense "
                   f"{dense[r['task']]:.3f})" for r in at_op)
    v = ("inconclusive" if not at_op else "holds" if len(close) == len(at_op)
         else "does not hold" if not close
         else "holds only for " + ", ".join(f"{r['method']} on {r['task']}" for r in close))
    return {"key": key, "claim": f"every method keeps accuracy within {tolerance:.0%} of "
                                 f"dense at s={op:g}{how}", "verdict": v, "evidence": ev}


def gap_closed(dense: float, one_shot: float, recovered: float) -> float | None:
    """The fraction of the one-shot accuracy gap that recovery closed:
    (recovered - one-shot) / (dense - one-shot); None when one-shot lost nothing (no gap to
    close). 1 = back to dense, 0 = no better than one-shot, < 0 = worse."""
    gap = dense - one_shot
    return None if gap <= 0 else (recovered - one_shot) / gap


def recovery_rows(accs: list[dict], recovered_accs: list[dict], op: float) -> list[dict]:
    """Per task and method at ``op``: dense, one-shot and recovered accuracy, the gap
    closed (:func:`gap_closed`), the recovery's steps and seconds."""
    dense = {r["task"]: r["accuracy"] for r in accs if r["method"] == "dense"}
    one = {(r["task"], r["method"]): r["accuracy"] for r in accs
           if r.get("status") == "measured" and abs(r["sparsity"] - op) < 1e-9}
    out = []
    for r in recovered_accs:
        if r["method"] == "dense" or (r["task"], r["method"]) not in one:
            continue
        o = one[(r["task"], r["method"])]
        out.append({"task": r["task"], "method": r["method"], "sparsity": op,
                    "dense": dense[r["task"]], "one_shot": o, "recovered": r["accuracy"],
                    "gap_closed": gap_closed(dense[r["task"]], o, r["accuracy"]),
                    "recover_steps": r.get("recover_steps"),
                    "recover_seconds": r.get("recover_seconds")})
    return out


def recovered_gap_closed_min(rows: list[dict]) -> float | None:
    """The smallest gap closed over :func:`recovery_rows` with a gap (None: no gap)."""
    closed = [r["gap_closed"] for r in rows if r["gap_closed"] is not None]
    return min(closed) if closed else None


def verdicts(times: list[dict], accs: list[dict], mem: dict, conv: list[dict],
             op: float, tolerance: float = 0.01) -> list[dict]:
    """One row per claim: ``claim``, ``verdict`` (holds / does not hold / holds only for
    ... / inconclusive when what was measured cannot decide it), ``evidence`` (the numbers
    it rests on)."""
    out = []
    measured = [r for r in times if r.get("status") == "measured"]
    if measured:
        f1 = verdict_fig1(measured)
        every = [m for m in f1 if m not in ("fastest_by_sparsity", "ours_fastest_everywhere")]
        methods = [m for m in every if f1[m]["falls"] is not None]  # measured for real
        falling = [m for m in methods if f1[m]["falls"]]
        ev = "; ".join(f"{m}: {f1[m]['ms_at_lowest_s']:.1f} -> {f1[m]['ms_at_highest_s']:.1f} ms"
                       f" ({f1[m]['time']})" for m in every)
        ev += "; fastest by s: " + ", ".join(f"{s:g} {m}" for s, m in
                                             sorted(f1["fastest_by_sparsity"].items()))
        simulated = [m for m in every if f1[m]["falls"] is None]
        if not methods:
            v = "inconclusive (simulated)"
        elif len(falling) == len(methods) and f1["ours_fastest_everywhere"] and not simulated:
            v = "holds"
        elif not falling and not f1["ours_fastest_everywhere"]:
            v = "does not hold"
        else:
            v = ("holds only for: time falls for " + (", ".join(falling) or "no method")
                 + ("; ours fastest at every s" if f1["ours_fastest_everywhere"] else
                    "; ours not fastest at every s")
                 + "".join(f"; {m} inconclusive (simulated)" for m in simulated))
        out.append({"key": "fig1", "claim": "Fig. 1: inference time falls with sparsity for every method "
                             "and is lowest for ours", "verdict": v, "evidence": ev})
    if mem:
        r_model, r_peak = mem["model_ratio"], mem["peak_ratio"]
        ok = [n for n, r in (("whole-model bytes", r_model), ("peak inference memory", r_peak))
              if r <= 0.5]
        v = "holds" if len(ok) == 2 else ("holds only for " + ok[0] if ok else "does not hold")
        out.append({"key": "memory", "claim": f"INT8 + {op:.0%} sparsity cuts memory by 50%", "verdict": v,
                    "evidence": f"whole-model bytes x{r_model:.3f}, peak inference memory "
                                f"x{r_peak:.3f} of dense"})
    if accs:
        out.append(verdict_accuracy(accs, op, tolerance))
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
        target, chance = conv_m[0]["target"], conv_m[0].get("chance")
        if chance is not None and target <= chance + conv_m[0]["chance_margin"]:
            # reaching an accuracy chance already gives measures noise, not convergence
            v = "inconclusive"
            ev = (f"target accuracy {target:.3f} is within two standard errors of chance "
                  f"({chance:.3f} + {conv_m[0]['chance_margin']:.3f}): the dense model never "
                  f"learned beyond chance in these steps; raise conv_steps or set "
                  f"target_accuracy above chance. ({ev})")
        out.append({"key": "fig2", "claim": "Fig. 2: ours reaches the target accuracy fastest at every "
                             "training-sample size", "verdict": v, "evidence": ev})
    return out


def fig2(rows: list[dict], title: str = "Fig. 2: seconds to target vs training samples"):
    """Seconds to the target accuracy against the training-sample size (log x), one
    series per method in the house style; a gap where a method did not reach the target."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for m in _measured_methods(rows):
        pts = sorted((r["n_train"], r["seconds_to_target"]) for r in rows
                     if r["method"] == m and r["status"] == "measured")
        fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], name=m,
                        mode="lines+markers")
    fig.update_xaxes(title_text="training pairs n", type="log")
    fig.update_yaxes(title_text="seconds to target (gap: not reached)")
    return F.style(F.layout(fig, title=title))


CLAIMS = ("fig1", "memory", "accuracy", "accuracy_recovered", "fig2")
HEADLINE = ("verdict_fig1", "verdict_fig2", "verdict_memory", "verdict_accuracy",
            "verdict_accuracy_recovered")


def metrics(times: list[dict], mem: dict, claims: list[dict], dense_accuracy: dict,
            op: float, recovery: list[dict] = (), recover_steps: int = 0) -> dict:
    """Notebook 10's metrics, every one from the measured rows: the verdict of each claim
    (``verdict_<key>``, None when the claim had nothing measured), the memory ratios, the
    stack's measured speedup at the operating sparsity and each task's dense accuracy.
    :data:`HEADLINE` names the ones the report's index shows."""
    ours_op = [r for r in times if r.get("method") == "ours" and r.get("sparsity") == op
               and r.get("status") == "measured"]
    by_key = {c["key"]: c["verdict"] for c in claims}
    return {**{f"verdict_{k}": by_key.get(k) for k in CLAIMS},
            "memory_model_ratio": mem["model_ratio"], "memory_peak_ratio": mem["peak_ratio"],
            "ours_speedup_at_op": ours_op[0]["speedup"] if ours_op else None,
            **{f"dense_accuracy_{t}": a for t, a in dense_accuracy.items()},
            "recovered_gap_closed_min": recovered_gap_closed_min(list(recovery)),
            "recover_steps": recover_steps}
