"""What notebooks 08 (LayerDrop, SDN, The Right Tool) and 09 (CQIL) show, beside the sweeps
of :mod:`labkit.labs.depth`: their parameter checks, figures, the cross-process CQIL run,
and the claimed-vs-measured tables and metrics.

* :func:`layerdrop_setup`, :func:`cqil_setup`: the parameters past their declared types
  (:func:`labkit.notebook.declared`). Ranges come from the techniques' own checks
  (``LayerDropConfig.p``, ``EarlyExitConfig.q``, :func:`labkit.techniques.cqil.check_group`)
  and list parameters are parsed by :mod:`labkit.labs.common`, so a bad value fails in the
  first cells naming the parameter, its value and what is allowed.
* :func:`prune_figure`, :func:`exit_figure`, :func:`similarity_figure`,
  :func:`quality_figure`: in the house style of :mod:`labkit.figures`.
* :func:`cqil_process_rows`: CQIL across ``P`` torchrun ranks (gloo), checked against the
  one-process executor and timed against the sequential model (Zou et al., ACL 2024).
* :func:`layerdrop_exit_summary`, :func:`cqil_summary`: claimed vs measured (LayerDrop, Fan
  et al. 2019: ``L/k`` block FLOPs at ``k`` of ``L`` blocks; SDN, Kaya et al. 2019: blocks
  executed at the chosen exit threshold; CQIL: ideal cut ``(end-start)(1-1/P)/L``) and
  the metrics; ``HEADLINE_08`` / ``HEADLINE_09`` name the 3-5 the report's index shows.
"""
from __future__ import annotations

import copy
import os

import plotly.graph_objects as go
import torch

from .. import figures as F
from .. import validate as V
from ..notebook import config
from ..techniques import (
    CQILConfig,
    EarlyExitConfig,
    LayerDropConfig,
    LayerPruneConfig,
    apply_,
    expected,
)
from ..techniques import cqil as C
from ..techniques import early_exit as E
from ..techniques.layerdrop import evenly_spread
from .common import float_list, int_list

# ---- parameters ------------------------------------------------------------------------


def _depth(params: dict, *names_lo_hi) -> None:
    for name, lo, hi in names_lo_hi:
        V.integer(name, params[name], lo, hi)


def layerdrop_setup(params: dict) -> dict:
    """Notebook 08: ``kept_counts`` (descending, each in ``[1, n_layers]``) and ``qs`` (each
    in ``(0, 1]``) parsed; ``layerdrop_p`` and ``q`` checked by their configs."""
    _depth(params, ("n_layers", 2, 48), ("sdn_layers", 2, 48), ("lm_steps", 1, 100_000),
           ("sdn_steps", 1, 100_000), ("exit_batch", 1, 250), ("exit_singles", 1, 250))
    n = params["n_layers"]
    config(LayerDropConfig, params, p="layerdrop_p")
    config(EarlyExitConfig, params, "q")
    V.integer("blocks_kept", params["blocks_kept"], 1, n)
    counts = sorted(set(int_list("kept_counts", params["kept_counts"], 1, n)), reverse=True)
    return {"kept_counts": counts,
            "qs": list(float_list("qs", params["qs"], 0.0, 1.0, lo_open=True))}


def cqil_setup(params: dict) -> dict:
    """Notebook 09: the group ``[start, end)``, ``P`` and ``D`` checked by
    :func:`labkit.techniques.cqil.check_group`; ``starts`` and ``ps`` parsed, each start
    making a valid group with ``end`` and each P fitting the widest of those groups."""
    _depth(params, ("n_layers", 2, 48), ("lm_steps", 1, 100_000), ("sdn_steps", 1, 100_000),
           ("recovery_steps", 0, 100_000), ("lora_rank", 1, 1024), ("latency_reps", 1, 1000),
           ("sim_sentences", 1, 256))
    n, end = params["n_layers"], params["end"]
    config(LayerDropConfig, params, p="layerdrop_p")
    C.check_group(params["start"], end, params["P"], n, params["D"])
    V.number("temperature", params["temperature"], 0.0, lo_open=True)
    V.number("recovery_lr", params["recovery_lr"], 0.0, 1.0, lo_open=True)
    starts = list(int_list("starts", params["starts"], 0, end - 2))
    for s in starts:
        C.check_group(s, end, 2, n)
    ps = list(int_list("ps", params["ps"], 2, end - min(starts)))
    widths = sorted(set(int_list("widths", params["widths"], 32, 4096)))
    return {"starts": starts, "ps": ps, "widths": widths}


# ---- figures ---------------------------------------------------------------------------

def prune_figure(prune: list[dict]):
    """Eval loss and measured latency against blocks kept, one series per trained model."""
    fig = F.subplots(["eval loss", "latency ms"], title="LayerDrop: pruned to k blocks",
                     xaxis={"eval loss": "blocks kept", "latency ms": "blocks kept"},
                     yaxis={"eval loss": "eval loss", "latency ms": "ms (batch 16)"})
    for model in dict.fromkeys(r["model"] for r in prune):
        pts = sorted((r["blocks_kept"], r["eval_loss"], r["latency_ms"]) for r in prune
                     if r["model"] == model)
        for col, i in ((1, 1), (2, 2)):
            fig.add_scatter(x=[p[0] for p in pts], y=[p[i] for p in pts], name=model,
                            mode="lines+markers", row=1, col=col)
    return F.style(fig)


def exit_figure(bins: dict, curve: list[dict]):
    """Reliability of the first exit before/after temperature scaling, and accuracy
    against the mean number of blocks executed, calibrated vs not."""
    fig = F.subplots(["reliability, first exit", "accuracy vs blocks"],
                     title="early exit: calibration and the speed/accuracy curve",
                     xaxis={"reliability, first exit": "confidence",
                            "accuracy vs blocks": "mean blocks executed"},
                     yaxis={"reliability, first exit": "accuracy",
                            "accuracy vs blocks": "accuracy"})
    fig.add_scatter(x=[0, 1], y=[0, 1], name="perfect", mode="lines",
                    line={"dash": "dot"}, row=1, col=1)
    for k, rows in bins.items():
        fig.add_scatter(x=[b["confidence"] for b in rows], y=[b["accuracy"] for b in rows],
                        name=f"{k} calibration", mode="lines+markers", row=1, col=1)
    for cal in (False, True):
        pts = sorted((r["blocks"], r["accuracy"], r["q"]) for r in curve
                     if r["calibrated"] == cal)
        fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts],
                        text=[f"q={p[2]}" for p in pts], mode="lines+markers",
                        name="calibrated" if cal else "uncalibrated", row=1, col=2)
    return F.style(fig, log=False)


def similarity_figure(sims: dict):
    """One heatmap per model of the cosine similarity of block inputs (one colour scale)."""
    fig = F.subplots(list(sims), title="cosine similarity of block inputs",
                     xaxis={k: "block j" for k in sims}, yaxis={k: "block i" for k in sims})
    for i, s in enumerate(sims.values()):
        r, c = F.position(i, len(sims))
        fig.add_trace(go.Heatmap(z=s.tolist(), zmin=0, zmax=1, coloraxis="coloraxis"), r, c)
    fig.update_layout(coloraxis={"colorscale": "Viridis"})
    return F.style(fig, log=False)


def quality_figure(qual: list[dict]):
    """Eval loss against measured speedup: CQIL, CQIL + recovery and dropped blocks."""
    fig = go.Figure()
    family = {}
    for r in qual:
        if r.get("measured_speedup") is not None:
            name = "drop (" + r["variant"].split("(", 1)[1] if r["variant"].startswith(
                "drop") else r["variant"]
            family.setdefault(name, []).append(r)
    for name, rows in family.items():
        fig.add_scatter(x=[r["measured_speedup"] for r in rows],
                        y=[r["eval_loss"] for r in rows], mode="markers", name=name,
                        text=[f"start={r['start']} P={r['P']}" for r in rows])
    fig.update_xaxes(title_text="measured speedup vs sequential (batch 1)")
    fig.update_yaxes(title_text="eval loss")
    return F.style(F.layout(fig, title="CQIL: quality vs measured latency"))


# ---- CQIL across processes ---------------------------------------------------------------

def cqil_process_rows(model, ids, starts, ps, end: int, reps: int, rounds: int,
                      timeout: float = 900.0) -> list[dict]:
    """For each ``P`` in ``ps`` one torchrun launch of ``P`` gloo ranks running the groups
    ``[s, end)``: the distributed output against the one-process CQIL executor (max abs
    difference) and the latency cut measured against the sequential model
    (:func:`labkit.techniques.cqil_dist.run`)."""
    import tempfile
    from pathlib import Path

    from ..dist import launch
    from ..techniques import cqil_dist as CD

    n = len(model.blocks)
    folder = Path(tempfile.mkdtemp(prefix="labkit-cqil-"))
    CD.save_job(folder / "job.pt", model, ids[:1])
    rows = []
    for p in ps:
        groups = [[s, end] for s in starts if p <= end - s]
        if not groups:
            continue
        res = launch("labkit.techniques.cqil_dist:run",
                     {"model": str(folder / "job.pt"), "groups": groups, "n_layers": n,
                      "reps": reps, "rounds": rounds, "save_outputs": True},
                     nproc=p, run_dir=folder / f"P{p}", validate=CD.validate, timeout=timeout)
        for r in CD.summarize(res.result):
            m = apply_(copy.deepcopy(model), CQILConfig(start=r["start"], end=end, P=p))
            with torch.no_grad():
                want = m(ids[:1])
            got = torch.load(folder / f"P{p}" / f"cqil-{r['start']}-{end}-0.pt")
            rows.append({**r, "max_abs_diff_vs_one_process": float((got - want).abs().max()),
                         "ideal_cut": C.ideal_cut(n, r["start"], end, p),
                         "launch_s": res.seconds})
    return rows


def cores_available() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def cqil_shortfall(row: dict, n_layers: int, required: float, load: float | None,
                   cores: int) -> str:
    """Why a measured CQIL cut (a :func:`cqil_dist.summarize` row) is below ``required``:
    the ranks shared cores, an all-reduce costs as much as the block a step saves, the ideal
    cut less the all-reduces is already short, or else the concurrency overhead (CQIL's time
    against one block per step plus its all-reduce)."""
    p, start, end = row["P"], row["start"], row["end"]
    seq = min(row["seq_1thread_ms"], row["seq_2threads_ms"])
    block = seq / n_layers  # one block's share of the sequential forward
    steps = len(C.steps_of(start, end, p))
    expect = seq * (1 - C.ideal_cut(n_layers, start, end, p)) + steps * row["allreduce_ms"]
    why = []
    if cores < p or (load is not None and load > cores - p + 1):
        at = "unknown" if load is None else f"{load:.2f}"
        why.append(f"the {p} ranks did not get a core each (load {at} on {cores} cores)")
    if row["allreduce_ms"] >= block:
        why.append(f"one all-reduce ({row['allreduce_ms']:.3f} ms) costs as much as the block "
                   f"a step saves ({block:.3f} ms)")
    elif 1 - expect / seq < required:
        why.append(f"the ideal cut less {steps} all-reduces is {1 - expect / seq:.2f}")
    if not why:
        why.append(f"concurrency overhead: CQIL {row['cqil_ms']:.2f} ms against {expect:.2f} ms "
                   f"for one block per step plus its all-reduce")
    return "; ".join(why)


def cqil_crossing(widths, start: int, end: int, p: int, n_layers: int, seq: int = 64,
                  reps: int = 5, rounds: int = 3, timeout: float = 900.0) -> list[dict]:
    """Where CQIL pays: for each ``d_model`` in ``widths`` an untrained decoder (latency does
    not depend on the weights; ``d_model / 32`` heads, ``d_ff = 4 d_model``) at batch 1 on
    ``seq`` tokens, run by one torchrun launch of ``p`` ranks on the group ``[start, end)``
    (:func:`labkit.techniques.cqil_dist.run`). Per width: one block's cost (sequential / L)
    against one all-reduce, the measured cut with its spread over rounds, the cut expected
    from one block per step plus its all-reduce, and a verdict ("pays": every round faster;
    "does not pay": every round slower; else "noise")."""
    import tempfile
    from pathlib import Path

    from ..dist import launch
    from ..model import build
    from ..techniques import cqil_dist as CD

    C.check_group(start, end, p, n_layers)
    folder = Path(tempfile.mkdtemp(prefix="labkit-cqil-crossing-"))
    rows = []
    for d in widths:
        V.integer("widths", d, 32, 4096)
        model = build("tiny", kind="decoder", n_layers=n_layers, d_model=d,
                      n_heads=max(1, d // 32), d_ff=4 * d, max_len=seq, vocab_size=1024,
                      seed=0).eval()
        ids = torch.randint(0, 1024, (1, seq), generator=torch.Generator().manual_seed(0))
        CD.save_job(folder / f"job-{d}.pt", model, ids)
        load = _load()
        res = launch("labkit.techniques.cqil_dist:run",
                     {"model": str(folder / f"job-{d}.pt"), "groups": [[start, end]],
                      "n_layers": n_layers, "reps": reps, "rounds": rounds}, nproc=p,
                     run_dir=folder / f"d{d}", validate=CD.validate, timeout=timeout)
        r = CD.summarize(res.result)[0]
        s_ms = min(r["seq_1thread_ms"], r["seq_2threads_ms"])
        steps = len(C.steps_of(start, end, p))
        ideal = C.ideal_cut(n_layers, start, end, p)
        verdict = ("pays" if r["latency_cut_min"] > 0 else "does not pay"
                   if r["latency_cut_max"] < 0 else "noise: rounds straddle no change")
        rows.append({"d_model": d, "block_ms": s_ms / n_layers, "allreduce_ms": r["allreduce_ms"],
                     "sequential_ms": s_ms, "cqil_ms": r["cqil_ms"],
                     "measured_cut": r["latency_cut"], "cut_min": r["latency_cut_min"],
                     "cut_max": r["latency_cut_max"], "ideal_cut": ideal,
                     "expected_cut": ideal - steps * r["allreduce_ms"] / s_ms,
                     "verdict": verdict, "why": "" if verdict == "pays" else cqil_shortfall(
                         r, n_layers, 0.0, load, cores_available()),
                     "cores": cores_available(), "loadavg_1m": load, "P": p,
                     "start": start, "end": end})
    return rows


def crossing_figure(rows: list[dict]):
    """One block's cost against one all-reduce, and the measured cut (with its spread over
    rounds) against the ideal and the expected cut, each against ``d_model``."""
    fig = F.subplots(["cost ms", "latency cut"], title="CQIL: where it pays",
                     xaxis={"cost ms": "d_model", "latency cut": "d_model"},
                     yaxis={"cost ms": "ms (batch 1)", "latency cut": "1 - CQIL / sequential"})
    x = [r["d_model"] for r in rows]
    for key, name in (("block_ms", "one block"), ("allreduce_ms", "one all-reduce")):
        fig.add_scatter(x=x, y=[r[key] for r in rows], name=name, mode="lines+markers",
                        row=1, col=1)
    fig.add_scatter(x=x, y=[r["measured_cut"] for r in rows], name="measured cut",
                    mode="lines+markers", row=1, col=2, error_y={
                        "type": "data", "symmetric": False,
                        "array": [r["cut_max"] - r["measured_cut"] for r in rows],
                        "arrayminus": [r["measured_cut"] - r["cut_min"] for r in rows]})
    for key, name in (("ideal_cut", "ideal"), ("expected_cut", "ideal less all-reduces")):
        fig.add_scatter(x=x, y=[r[key] for r in rows], name=name, mode="lines",
                        line={"dash": "dot"}, row=1, col=2)
    return F.style(fig, log=False)


# ---- claimed vs measured -----------------------------------------------------------------

HEADLINE_08 = ("pruned_speedup_claimed", "pruned_speedup", "layerdrop_pruned_loss",
               "plain_pruned_loss", "blocks_ratio")
HEADLINE_09 = ("ideal_cut", "measured_cut", "max_abs_diff", "cqil_loss", "recovered_loss")


def _one(rows, **match):
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def layerdrop_exit_summary(params: dict, prune: list[dict], lat: list[dict],
                           cal_rows: list[dict], choice: dict, cfg,
                           cached: dict) -> tuple[list[dict], dict]:
    """Notebook 08's claimed-vs-measured table and metrics. ``choice``
    (:func:`labkit.labs.depth.exit_choice`): the threshold chosen on the calibration half
    (fewest blocks within 1 point of the final head there), scored on the test half, and
    its verdict ("inconclusive" unless depth matters on those rows)."""
    n, sdn_layers = params["n_layers"], params["sdn_layers"]
    k = min(r["blocks_kept"] for r in prune)
    ld_k, pl_k = _one(prune, model="LayerDrop", blocks_kept=k), _one(
        prune, model="no LayerDrop", blocks_kept=k)
    full = max(r["blocks_kept"] for r in prune)
    claim = expected(cfg, LayerPruneConfig(keep=evenly_spread(n, k)))
    b_lat = _one(lat, scope="batch", q=choice["q"]) if choice["q"] is not None else None
    table = [
        {"quantity": f"block FLOPs at {k} of {n} blocks",
         "claimed": claim["detail"]["block_flops_ratio"], "measured": None},
        {"quantity": f"params removed at {k} blocks", "claimed": claim["params_before"] - claim["params_after"],
         "measured": max(r["params"] for r in prune) - ld_k["params"]},
        {"quantity": f"latency speedup at {k} blocks (batch 16)", "claimed": n / k,
         "measured": ld_k["speedup"]},
        {"quantity": f"early exit: blocks executed, full / q={choice['q']} chosen on the "
                     f"calibration half (<= 1 point loss there)",
         "claimed": sdn_layers / choice["calib_blocks"] if choice["q"] is not None else None,
         "measured": choice["blocks_ratio"]},
        {"quantity": "early exit: accuracy loss on the test half (paired)", "claimed": None,
         "measured": choice["accuracy_loss"]},
        {"quantity": "depth gain: final head minus first exit (test half, paired)",
         "claimed": None, "measured": choice["depth_gain"]},
        {"quantity": "early exit verdict", "claimed": None,
         "measured": f"{choice['verdict']}: {choice['why']}"},
        {"quantity": "early exit: latency speedup at that q (batch)", "claimed": None,
         "measured": b_lat["speedup"] if b_lat else None}]
    mean = lambda key: sum(r[key] for r in cal_rows) / len(cal_rows)
    metrics = {
        "pruned_speedup_claimed": n / k, "pruned_speedup": ld_k["speedup"],
        "layerdrop_full_loss": _one(prune, model="LayerDrop", blocks_kept=full)["eval_loss"],
        "plain_full_loss": _one(prune, model="no LayerDrop", blocks_kept=full)["eval_loss"],
        "layerdrop_pruned_loss": ld_k["eval_loss"], "plain_pruned_loss": pl_k["eval_loss"],
        "min_blocks_kept": k, "full_accuracy": choice["full_accuracy"],
        "first_exit_accuracy": choice["first_exit_accuracy"],
        "depth_gain": choice["depth_gain"], "depth_gain_se": choice["depth_gain_se"],
        "best_q": choice["q"], "best_q_accuracy": choice["exit_accuracy"],
        "best_q_blocks": choice["exit_blocks"], "blocks_ratio": choice["blocks_ratio"],
        "exit_accuracy_loss": choice["accuracy_loss"],
        "exit_accuracy_loss_se": choice["accuracy_loss_se"],
        "exit_verdict": choice["verdict"], "exit_why": choice["why"],
        "best_q_latency_speedup": b_lat["speedup"] if b_lat else None,
        "ece_before_mean": mean("ece_before"), "ece_after_mean": mean("ece_after"),
        "lm_cached": bool(cached["lm"]), "sdn_cached": bool(cached["sdn"])}
    return table, metrics


def per_exit_rows(model, test: dict) -> list[dict]:
    """Each exit's own accuracy on ``test`` (the last row: the full model's head), and per
    hop count when ``test`` has ``hops`` (:func:`labkit.labs.depth.pointer_task`)."""
    z, y = E.exit_logits(model, test)
    after = list(model.executor.exits) + [len(model.blocks) - 1]
    hops = test.get("hops")
    rows = []
    for k, i in enumerate(after):
        right = (z[k].argmax(-1) == y).float()
        row = {"exit after block": i + 1, "accuracy": float(right.mean())}
        if hops is not None:
            row.update({f"hop{h} accuracy": float(right[hops == h].mean())
                        for h in sorted(set(hops.tolist()))})
        rows.append(row)
    return rows


def cqil_summary(params: dict, cfg, mine: dict, latency: list[dict], adjacent: list[dict],
                 minilm_note: str, crossing: list[dict] = ()) -> tuple[list[dict], dict]:
    """Notebook 09's claimed-vs-measured table for the group ``[start, end)`` with ``P``
    and ``D``, and its metrics. The measured cut is the widest width's of ``crossing``
    (:func:`cqil_crossing`: the paying side of the block / all-reduce crossing), the tiny
    trained decoder's (``latency``, the cross-process rows) beside it."""
    start, end, p, d = params["start"], params["end"], params["P"], params["D"]
    claim = expected(cfg, CQILConfig(start=start, end=end, P=p, D=d))["detail"]
    lat = _one(latency, start=start, P=p)
    wide = max(crossing, key=lambda r: r["d_model"]) if crossing else None
    diff = max((r["max_abs_diff_vs_one_process"] for r in latency), default=None)
    table = [
        {"quantity": f"latency cut [{start},{end}) P={p}, untrained decoder d_model="
                     f"{wide['d_model'] if wide else '-'} (the paying side)",
         "claimed": claim["ideal_latency_cut"],
         "measured": wide["measured_cut"] if wide else None},
        {"quantity": "  its verdict", "claimed": None,
         "measured": (wide["verdict"] + (f": {wide['why']}" if wide["why"] else ""))
         if wide else None},
        {"quantity": f"latency cut [{start},{end}) P={p}, trained tiny decoder "
                     f"(d_model={cfg.d_model})", "claimed": claim["ideal_latency_cut"],
         "measured": lat["latency_cut"] if lat else None},
        {"quantity": "all-reduces per forward", "claimed": claim["allreduce_per_forward"],
         "measured": None},
        {"quantity": "all-reduce ms (measured alone)", "claimed": None,
         "measured": lat["allreduce_ms"] if lat else None},
        {"quantity": "max |distributed - one process|", "claimed": 0.0, "measured": diff},
        {"quantity": "eval loss: sequential / CQIL / recovered", "claimed": None,
         "measured": f"{mine['sequential_loss']:.3f} / {mine['cqil_loss']:.3f} / "
                     f"{mine.get('recovered_loss', float('nan')):.3f}"}]

    def cos_mean(prefix):
        vals = [r["cos(input i, input i+1)"] for r in adjacent if r["model"].startswith(prefix)]
        return sum(vals) / len(vals) if vals else None

    metrics = {
        "ideal_cut": mine["ideal_cut"], "measured_cut": wide["measured_cut"] if wide else None,
        "measured_cut_d_model": wide["d_model"] if wide else None,
        "measured_cut_verdict": wide["verdict"] if wide else None,
        "tiny_decoder_cut": lat["latency_cut"] if lat else None,
        "crossing_pays_from_d_model": next((r["d_model"] for r in crossing
                                            if r["verdict"] == "pays"), None),
        "max_abs_diff": diff, "sequential_loss": mine["sequential_loss"],
        "cqil_loss": mine["cqil_loss"], "recovered_loss": mine.get("recovered_loss"),
        "decoder_adjacent_cos_mean": cos_mean("decoder"),
        "minilm_adjacent_cos_mean": cos_mean("all-MiniLM"), "minilm_note": minilm_note}
    return table, metrics
