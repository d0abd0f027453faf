"""What notebook 07 and ``labkit bench parallel`` share: one launch that carries every
measurement (calibration, DDP, tensor parallel, pipeline sweeps on computing and on
sleeping stages, the bytes each strategy allocates), tidy tables from its result, the
simulator fitted on it and its error per configuration, the verdicts that need a core per
rank (:func:`ddp_verdict`), and the figures (live loss/throughput per rank, the pipeline
Gantt from what ran, bubble vs M with Eq. 10 as GPipe's M = S point, the simulator's
errors, simulated scaling curves, in the house style of :mod:`labkit.figures`), and
notebook 07's parameter checks (:func:`setup`) and metrics (:func:`summary`,
:data:`HEADLINE`)."""
from __future__ import annotations

import dataclasses
import math
import os

import pandas as pd
import plotly.graph_objects as go

from .. import figures as F
from .. import validate as V
from ..measure import speedup_verdict
from . import simulator as SIM
from .launcher import launch

STRATEGIES = ("ddp", "tensor", "pipeline")
M_SWEEP = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16)
SLEEP_MS = (100.0, 200.0)  # a stage's F and B per micro-batch: the ~1 ms a send costs is < 5% at M = 8
CORE_SHARE = 0.9  # CPU s per wall s at which a one-thread rank had a core of its own
MAX_CONTENTION = 1.15  # the same step on every rank at once / on one rank alone
DDP_MAX_RATIO = 0.75  # 2 ranks with a core each: at most 0.75x one rank's step (>= 1.33x)


def setup(params: dict) -> list[int]:
    """Notebook 07's parameters past their declared types, checked before any process
    starts (each error naming the parameter): the launch knobs here, the pipeline's degrees
    by :func:`labkit.dist.pipeline.validate`. Returns the micro-batch sweep ``M <= max_m``."""
    from . import pipeline

    V.integer("threads", params["threads"], 1, 1)  # one thread per rank: per-rank timings
    for name, lo, hi in (("nproc", 1, 64), ("seq", 8, 128), ("batch", 1, 1024),
                         ("max_m", 1, 16), ("mb_rows", 1, 64), ("reps", 1, 20)):
        V.integer(name, params[name], lo, hi)
    V.number("timeout", params["timeout"], 1.0, 3600.0)
    pipeline.validate({k: params[k] for k in ("task", "size", "seq", "batch", "stages",
                                              "microbatches", "schedule")}, params["nproc"])
    return [m for m in M_SWEEP if m <= params["max_m"]]


def parts(task: str = "nli", size: str = "tiny", seq: int = 32, batch: int = 8,
          steps: int = 20, stages: int = 2, microbatches: int = 4, schedule: str = "gpipe",
          sweep_m: tuple = (1, 2, 4, 8), mb_rows: int = 4, reps: int = 3,
          strategies: tuple = STRATEGIES, sleep_ms: tuple | None = SLEEP_MS) -> list[dict]:
    """The suite: calibration, the bytes each strategy allocates, then each strategy's
    exactness check, training steps (streamed) and timings, and the GPipe sweep over M at
    S = ``stages``, on the model and (``sleep_ms``) on stages that sleep."""
    for s in strategies:
        V.choice("strategy", s, STRATEGIES)
    common = {"task": task, "size": size, "seq": seq}
    rows = sorted({1, 2, 4, 8, batch, mb_rows})  # every size the runs below use
    out = [{"name": "calibrate", "experiment": "calibrate",
            "config": {**common, "rows": rows, "reps": reps}},
           {"name": "memory", "experiment": "memory",
            "config": {**common, "batch": batch, "microbatches": microbatches,
                       "strategies": list(strategies)}}]
    if "ddp" in strategies:
        out.append({"name": "ddp", "experiment": "ddp", "config": {
            **common, "batch": batch, "steps": steps, "rounds": 1, "reps": reps}})
    if "tensor" in strategies:
        out.append({"name": "tensor", "experiment": "tensor", "config": {
            **common, "batch": batch, "steps": steps, "rounds": 1, "reps": reps}})
    if "pipeline" in strategies:
        out.append({"name": "pipeline", "experiment": "pipeline", "config": {
            **common, "batch": batch, "steps": steps, "stages": stages,
            "microbatches": microbatches, "schedule": schedule}})
        out.append({"name": "sweep", "experiment": "pipeline", "config": {
            **common, "batch": batch, "steps": 0, "check": False, "stages": stages,
            "microbatches": min(sweep_m), "schedule": "gpipe", "sweep_m": list(sweep_m),
            "mb_rows": mb_rows, "reps": reps}})
        if sleep_ms:
            out.append({"name": "sleep_sweep", "experiment": "pipeline", "config": {
                **common, "batch": batch, "steps": 0, "check": False, "stages": stages,
                "microbatches": min(sweep_m), "schedule": "gpipe", "sweep_m": list(sweep_m),
                "mb_rows": 1, "reps": 1, "sleep_ms": list(sleep_ms)}})
    return out


def run(nproc: int = 2, on_event=None, timeout: float = 120.0, **kwargs):
    """One launch of :func:`parts` on ``nproc`` ranks; returns the LaunchResult."""
    r = launch("suite", {"parts": parts(**kwargs)}, nproc=nproc, timeout=timeout,
               on_event=on_event)
    r.result["loadavg"] = os.getloadavg()  # how busy the machine was (shared box)
    return r


def board_callback(board, every: int = 1):
    """Route streamed step lines to a :class:`labkit.ui.LiveBoard` with panels ``loss``
    and ``throughput``: one series per experiment and rank."""
    current = {}

    def on_event(e):
        if e.get("event") == "part":
            current[e["rank"]] = e["name"]
        elif e.get("event") == "step" and e["step"] % every == 0:
            name = f"{current.get(e['rank'], '?')} r{e['rank']}"
            if e.get("loss") is not None:
                board.log("loss", name, e["step"], e["loss"])
            if e.get("samples_per_s"):
                board.log("throughput", name, e["step"], e["samples_per_s"])
    return on_event


# ------------------------------------------------------------------ tables

def correctness(ranks: list[dict]) -> pd.DataFrame:
    """Per strategy: the largest gradient and output/loss difference to one process over
    the ranks, how many gradients were compared (every parameter, on the rank holding
    it), and the parameters whose gradient was missing on either side (a failure)."""
    rows = []
    for key in ("ddp", "tensor", "pipeline"):
        if key in ranks[0]:
            missing = sorted({m for r in ranks for m in r[key].get("grads_missing", [])})
            rows.append({"strategy": key,
                         "grad_max_abs_diff": max(r[key]["grad_max_abs_diff"] for r in ranks),
                         "output_or_loss_diff": max(r[key].get("output_max_abs_diff",
                                                               r[key].get("loss_abs_diff", 0))
                                                    for r in ranks),
                         "grads_compared": [r[key].get("grads_compared") for r in ranks],
                         "grads_missing": ", ".join(missing),
                         "tolerance": 1e-5 if key == "tensor" else 1e-6})
    df = pd.DataFrame(rows)
    if not df.empty:
        df["exact"] = (df.grad_max_abs_diff <= df.tolerance) & \
            (df.output_or_loss_diff <= df.tolerance) & (df.grads_missing == "")
    return df


def eq10_step(t: float, S: int) -> float:
    """The seed paper's Eq. 10 step, 1 / throughput = t + (S-1)/S t, with t a stage's time
    on the whole batch: GPipe's (M+S-1)/M t at M = S."""
    return t + (S - 1) / S * t


def gpipe_bubble(S: int, M: int) -> float:
    return (S - 1) / (M + S - 1)


def bubble(ranks: list[dict], key: str = "sweep") -> pd.DataFrame:
    """Measured GPipe bubble per M (mean over ranks of 1 - busy/wall) next to
    (S-1)/(M+S-1), and the step time next to GPipe's, Eq. 10's (GPipe at M = S: bubble
    (S-1)/(2S-1) whatever M is) and the bubble-free one (the stages' work / S). ``key``:
    the sweep on the model (``"sweep"``) or on sleeping stages (``"sleep_sweep"``)."""
    if key not in ranks[0]:
        return pd.DataFrame()
    rows = []
    for i, row in enumerate(ranks[0][key]["bubble"]):
        per = [r[key]["bubble"][i] for r in ranks]
        S, M = row["S"], row["M"]
        busy = sum(p["busy_s"] for p in per)  # all stages' work of the step
        wall = max(p["wall_s"] for p in per)
        t = busy / S  # one stage's forward + backward on the whole (M micro-batch) batch
        rows.append({"S": S, "M": M, "measured_bubble": sum(p["bubble"] for p in per) / len(per),
                     "gpipe_bubble": gpipe_bubble(S, M), "eq10_bubble": gpipe_bubble(S, S),
                     "measured_overlap": overlap(per), "gpipe_overlap": _ideal_overlap(S, M),
                     "cpu_share_in_compute": min(p.get("cpu_share", float("nan"))
                                                 for p in per),
                     "measured_step_s": wall, "gpipe_step_s": t * (M + S - 1) / M,
                     "eq10_step_s": eq10_step(t, S), "no_bubble_step_s": t,
                     "tokens_per_row": row.get("tokens_per_row"),
                     "samples_per_s": row["samples_per_s"]})
    df = pd.DataFrame(rows)
    df["relative_error_vs_gpipe"] = (df.measured_bubble - df.gpipe_bubble) / df.gpipe_bubble
    return df


def overlap(per_rank: list[dict]) -> float | None:
    """Share of the step during which at least two ranks computed at once, from the traces
    (absolute times on this machine's monotonic clock); None for other rank counts."""
    if len(per_rank) != 2 or any("t0" not in p for p in per_rank):
        return None
    a, b = ([(p["t0"] + e[3], p["t0"] + e[4]) for e in p["events"]] for p in per_rank)
    both = sum(max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in a for s2, e2 in b)
    return both / max(p["wall_s"] for p in per_rank)


def _ideal_overlap(S: int, M: int) -> float | None:
    """Two equal stages under GPipe: both busy for (M - 1)/(M + 1) of the step."""
    return (M - 1) / (M + 1) if S == 2 else None


def memory(ranks: list[dict]) -> pd.DataFrame:
    """Bytes each rank held (weights, gradients, AdamW state, counted tensor by tensor)
    vs what the strategy claims."""
    rows = []
    for r in ranks:
        if "ddp" in r:
            m = r["ddp"]["memory"]
            rows.append({"strategy": "ddp", "rank": r["ddp"]["rank"],
                         "measured_state_bytes": m["state_bytes"],
                         "claimed_state_bytes": 16 * r["ddp"]["n_params"],
                         "claim": "a full replica: 16 B/param"})
        if "tensor" in r:
            t = r["tensor"]
            rows.append({"strategy": "tensor", "rank": t["rank"],
                         "measured_state_bytes": t["memory"]["state_bytes"],
                         "claimed_state_bytes": 4 * t["claimed_param_bytes"],
                         "claim": "1/T of every weight (Eq. 8-9)"})
        if "pipeline" in r:
            p = r["pipeline"]
            rows.append({"strategy": "pipeline", "rank": p["rank"],
                         "measured_state_bytes": p["memory"]["state_bytes"],
                         "claimed_state_bytes": 16 * p["claimed_params_per_rank"],
                         "claim": "1/S of the weights (Eq. 8 layer-wise)"})
    df = pd.DataFrame(rows)
    if not df.empty:
        df["measured_over_claimed"] = df.measured_state_bytes / df.claimed_state_bytes
    return df


def ddp_scaling(ranks: list[dict]) -> dict:
    t = ranks[0].get("ddp", {}).get("timing")
    if not t:
        return {}
    s = t["seconds"]
    shares = [r["ddp"]["timing"].get("cpu_share", {}) for r in ranks]
    return {"one_rank_s": s["one_rank_full_batch"], "ddp_s": s["ddp"],
            "ddp_no_sync_s": s["ddp_no_sync"], "all_reduce_s": s["all_reduce_grads"],
            "two_over_one_rank_step_ratio": s["ddp"] / s["one_rank_full_batch"],
            # N ranks computing B/N rows each at once, vs one rank alone on B rows: 1.0
            # when every rank has a core of its own; more when they share the cores
            "concurrent_compute_slowdown": s["ddp_no_sync"] * len(ranks)
            / s["one_rank_full_batch"],
            # CPU seconds per wall second: every rank computing at once (min over ranks),
            # and rank 0 alone on the whole batch (the reference)
            "cpu_share_concurrent": min(x.get("ddp_no_sync", math.nan) for x in shares),
            "cpu_share_one_rank": shares[0].get("one_rank_full_batch", math.nan),
            # the same whole-batch step on every rank at once vs on rank 0 alone: 1.0 when
            # each rank has a core (stolen or shared cores show here, not in CPU shares)
            "contention": max(r["ddp"]["timing"]["seconds"].get("all_ranks_full_batch",
                                                                 math.nan) for r in ranks)
            / s["one_rank_full_batch"],
            "cores_available": t.get("cores_available"), "threads": t.get("threads", 1),
            "ranks": len(ranks), "tokens_per_row": t.get("tokens_per_row"),
            "speedup": t["speedup_vs_one_rank"], "scaling_efficiency": t["scaling_efficiency"],
            "verdict": speedup_verdict(t["speedup_vs_one_rank"],
                                       flop_ratio=len(ranks)),  # > N ranks' worth: noise
            "all_reduce_bytes": t["all_reduce_bytes"]}


def core_problems(ddp: dict, core_share: float = CORE_SHARE,
                  max_contention: float = MAX_CONTENTION) -> list[str]:
    """Why the ranks of this launch did not each have a core of their own (empty when
    they did): too few cores in the affinity mask, the same step slower on every rank at
    once than on one alone, or a rank getting less than ``core_share`` CPU s per wall s."""
    why = []
    need = ddp["ranks"] * ddp.get("threads", 1)
    if ddp.get("cores_available") is not None and ddp["cores_available"] < need:
        why.append(f"{ddp['cores_available']} cores for {need} rank threads")
    c = ddp.get("contention", math.nan)
    if not c <= max_contention:  # NaN (not measured) is not a core either
        why.append(f"the same step took {c:.2f}x as long on every rank at once as on one "
                   f"alone (> {max_contention}: the cores are shared, stolen or busy)")
    for name, key in (("the ranks computing at once", "cpu_share_concurrent"),
                      ("one rank alone (the reference)", "cpu_share_one_rank")):
        share = ddp.get(key, math.nan)
        if not share >= core_share:  # NaN (not recorded) is not a core either
            why.append(f"{name} got {share:.2f} CPU s per wall s (< {core_share}: the "
                       f"cores were shared with other processes)")
    return why


def ddp_verdict(ddp: dict, max_ratio: float = DDP_MAX_RATIO) -> dict:
    """The 2-rank/1-rank DDP step ratio as a target that can fail: required <=
    ``max_ratio``, but only where every rank had a core of its own while timed
    (:func:`core_problems`). Elsewhere ``met`` is None and ``note`` says why it is not
    measurable here."""
    ratio = ddp["two_over_one_rank_step_ratio"]
    why = core_problems(ddp)
    out = {"target": "2-rank DDP step / 1-rank step, same global batch",
           "measured": ratio, "required": f"<= {max_ratio} where each rank has a core",
           "unit": "x"}
    if why:
        return {**out, "met": None, "note": "not measurable here: " + "; ".join(why)}
    met = ratio <= max_ratio
    return {**out, "met": met, "note": (
        f"each rank had a core (contention {ddp['contention']:.2f}, CPU share "
        f"{ddp['cpu_share_concurrent']:.2f} concurrent, {ddp['cpu_share_one_rank']:.2f} "
        f"alone); " + (
            "met" if met else f"not met: concurrent compute took "
            f"{ddp['concurrent_compute_slowdown']:.2f}x one rank's time per row, the "
            f"all-reduce {ddp['all_reduce_s'] * 1e3:.2f} ms bare, the step "
            f"{ddp['ddp_s'] * 1e3:.2f} ms vs {ddp['one_rank_s'] * 1e3:.2f} ms"))}


def calibration(result: dict) -> tuple[SIM.Calibration, SIM.Spec]:
    ranks = result["ranks"]
    cal = SIM.fit([r["calibrate"] for r in ranks], result["world_size"])
    return cal, SIM.spec_from(ranks[0]["calibrate"])


def simulator_errors(result: dict) -> pd.DataFrame:
    """The simulator on every run this launch measured, each at the sequence length it
    ran: relative error per configuration."""
    cal, spec = calibration(result)
    ranks, ws = result["ranks"], result["world_size"]
    runs = []
    sc = ddp_scaling(ranks)
    batch = ranks[0]["ddp"]["rows_per_rank"] * ws if "ddp" in ranks[0] else None
    if sc:
        n = {"tokens_per_row": sc["tokens_per_row"]} if sc["tokens_per_row"] else {}
        runs += [{"label": "1 rank, whole batch", "batch": batch,
                  "measured_s": sc["one_rank_s"], **n},
                 {"label": f"DDP x{ws}", "dp": ws, "batch": batch, "measured_s": sc["ddp_s"],
                  **n}]
    tp = ranks[0].get("tensor", {})
    if "step_s" in tp:
        runs.append({"label": f"TP x{ws}", "tp": ws, "batch": batch or 8,
                     "measured_s": tp["step_s"],
                     **({"tokens_per_row": tp["tokens_per_row"]} if "tokens_per_row" in tp
                        else {})})
    b = bubble(ranks)
    if not b.empty:
        first = ranks[0]["sweep"]["bubble"][0]
        mb = first["mb_rows"] * first["dp"]
        for _, row in b.iterrows():
            runs.append({"label": f"GPipe S={int(row.S)} M={int(row.M)}", "pp": int(row.S),
                         "microbatches": int(row.M), "batch": int(mb * row.M),
                         "schedule": "gpipe", "measured_s": row.measured_step_s,
                         "bubble": row.measured_bubble,
                         **({"tokens_per_row": int(row.tokens_per_row)}
                            if row.tokens_per_row == row.tokens_per_row
                            and row.tokens_per_row is not None else {})})
    df = pd.DataFrame(SIM.errors(cal, spec, runs))
    df["simulated"] = True
    return df


def simulator_memory_errors(result: dict) -> pd.DataFrame:
    """Simulated bytes the busiest device holds between steps (weights, gradients, AdamW
    state, a pipeline's receive buffers) vs the most any rank allocated for it in the
    ``memory`` experiment (malloc's live bytes after a fresh model took one step), per
    strategy; the tensor-by-tensor count beside it."""
    if "memory" not in result["ranks"][0]:
        return pd.DataFrame()
    cal, spec = calibration(result)
    ranks, ws = result["ranks"], result["world_size"]
    probe = ranks[0]["memory"]
    batch, m = probe["batch"], probe["microbatches"]
    run_spec = dataclasses.replace(spec, seq=probe["tokens_per_row"])
    plans = {"ddp": {"dp": ws}, "tensor": {"tp": ws},
             "pipeline": {"pp": ws, "microbatches": m}}
    rows = []
    for key, kw in plans.items():
        if key not in probe:
            continue
        got = [r["memory"][key] for r in ranks]
        measured = max(g["allocated_bytes"] for g in got)
        sim = SIM.simulate(run_spec, cal, batch=batch, **kw)
        simulated = sim["state_bytes_per_device"] + sim["pipeline_buffer_bytes"]
        rows.append({"label": f"{key} x{ws}", "measured_bytes": measured,
                     "measured_by": got[0]["allocated_by"],
                     "counted_state_bytes": max(g["state_bytes"] for g in got),
                     "simulated_bytes": simulated,
                     "relative_error": (simulated - measured) / measured, "simulated": True})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------ figures

def gantt(events_by_rank: dict, title: str = "pipeline schedule (what ran)") -> go.Figure:
    """Bars of every micro-batch's forward (F) and backward (B) per rank, from the trace
    (``(kind, stage, microbatch, start_s, end_s)`` tuples)."""
    fig = go.Figure()
    t0 = min((e[3] for evs in events_by_rank.values() for e in evs), default=0.0)
    for rank, evs in sorted(events_by_rank.items()):
        for kind in ("F", "B"):
            sel = [e for e in evs if e[0] == kind]
            fig.add_trace(go.Bar(
                y=[f"rank {rank}"] * len(sel), x=[(e[4] - e[3]) * 1e3 for e in sel],
                base=[(e[3] - t0) * 1e3 for e in sel], orientation="h",
                name={"F": "forward", "B": "backward"}[kind],
                text=[f"{kind}{e[2]}" for e in sel], textposition="inside"))
    fig.update_layout(barmode="overlay", xaxis_title="ms since the step started")
    fig = F.style(F.layout(fig, title=title), log=False)
    return fig.update_layout(height=160 + 60 * len(events_by_rank))


def simulated_gantt(cal: SIM.Calibration, size: str = "7B", **plan) -> tuple[dict, go.Figure]:
    """The simulator's run of ``size`` under ``plan`` (:func:`simulator.simulate` keywords)
    and the Gantt it played, titled as SIMULATED."""
    res = SIM.simulate(SIM.SIZES[size], cal, **plan)
    by_rank: dict = {}
    for e in res["events"]:
        by_rank.setdefault(e[1], []).append(e)
    shown = ", ".join(f"{k}={v}" for k, v in plan.items())
    return res, gantt(by_rank, title=f"SIMULATED {size} ({shown}): step {res['step_s']:.2f} s, "
                                     f"bubble {res['bubble']:.2f}")


def bubble_figure(df: pd.DataFrame, sleep: pd.DataFrame | None = None) -> go.Figure:
    """Idle fraction vs M: measured on the model's stages (and on sleeping stages, which
    overlap on any machine), GPipe's curve, and Eq. 10 as the point of that curve it is:
    M = S."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=df.M, y=df.measured_bubble, name="measured (model stages)",
                             mode="lines+markers"))
    if sleep is not None and not sleep.empty:
        fig.add_trace(go.Scatter(x=sleep.M, y=sleep.measured_bubble,
                                 name="measured (sleeping stages)", mode="lines+markers"))
    S = int(df.S.iloc[0])
    ms = list(range(1, max(int(df.M.max()), S) + 1))
    fig.add_trace(go.Scatter(x=ms, y=[gpipe_bubble(S, m) for m in ms],
                             name="GPipe (S-1)/(M+S-1)", mode="lines"))
    fig.add_trace(go.Scatter(x=[S], y=[gpipe_bubble(S, S)], mode="markers",
                             marker={"size": 14, "symbol": "star"},
                             name=f"Eq. 10 = GPipe at M = S = {S}: (S-1)/(2S-1)"))
    fig.update_layout(xaxis_title="M", yaxis_title="idle fraction")
    return F.style(F.layout(fig, title=f"pipeline bubble vs micro-batches M (S = {S})"),
                   log=False)


def error_figure(errors: pd.DataFrame, tolerance: float = 0.2) -> go.Figure:
    """The simulator's relative step-time error per configuration measured here, with the
    +-``tolerance`` band."""
    fig = go.Figure(go.Bar(x=errors.label, y=errors.relative_error * 100,
                           text=[f"{e:+.0%}" for e in errors.relative_error],
                           textposition="outside", name="simulated vs measured"))
    for y in (-tolerance * 100, tolerance * 100):
        fig.add_hline(y=y, line_dash="dot")
    fig.update_layout(yaxis_title="(simulated - measured) / measured, %", showlegend=False)
    return F.style(F.layout(fig, title="simulator step-time error per configuration "
                                       "(calibrated in the same launch)"), log=False)


def scaling_figure(rows: list[dict], title: str = "") -> go.Figure:
    """Simulated throughput and memory per device vs devices (log-log), one series per
    model x plan, the same colour in both panels."""
    df = pd.DataFrame(rows)
    panels = ["samples/s (simulated)", "memory per device, GB (simulated)"]
    fig = F.subplots(panels, title=title or "simulated scaling (calibrated on this machine)",
                     xaxis={p: "devices" for p in panels})
    for (model, plan), g in df.groupby(["model", "plan"], sort=False):
        for col, y in ((1, g.samples_per_s), (2, g.memory_bytes_per_device / 1e9)):
            fig.add_trace(go.Scatter(x=g.devices, y=y, name=f"{model} {plan}",
                                     mode="lines+markers"), row=1, col=col)
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log")
    return F.style(fig)


# ------------------------------------------------------------------ notebook 07's metrics

HEADLINE = ("bubble_gpipe_max_m", "bubble_measured_max_m", "simulator_max_abs_relative_error",
            "all_exact", "two_over_one_rank_step_ratio")


def summary(run, exact: pd.DataFrame, bub: pd.DataFrame, ddp: dict, errors: pd.DataFrame,
            mem_errors: pd.DataFrame, big: dict, threads: int,
            sleep: pd.DataFrame | None = None) -> dict:
    """Notebook 07's metrics from its tables: exactness of each strategy, the GPipe bubble
    claimed vs measured at the smallest and largest M (on the model's and on sleeping
    stages), Eq. 10's bubble, DDP's 2-over-1-rank step ratio and whether it is measurable
    here, the simulator's errors on this machine and its (labelled) 7B step."""
    diff = exact.set_index("strategy").grad_max_abs_diff
    b = bub.set_index("M")
    lo, hi = int(b.index.min()), int(b.index.max())
    S = int(bub.S.iloc[0])
    verdict = ddp_verdict(ddp) if ddp else {}
    out = {
        **{f"{k}_grad_max_abs_diff": float(diff[k]) for k in STRATEGIES if k in diff},
        "all_exact": bool(exact.exact.all()),
        "bubble_measured_m1": float(b.measured_bubble[lo]),
        "bubble_gpipe_m1": float(b.gpipe_bubble[lo]),
        "bubble_measured_max_m": float(b.measured_bubble[hi]),
        "bubble_gpipe_max_m": float(b.gpipe_bubble[hi]),
        "bubble_eq10": gpipe_bubble(S, S),
        "two_over_one_rank_step_ratio": ddp.get("two_over_one_rank_step_ratio"),
        "ddp_target_met": verdict.get("met"), "ddp_target_note": verdict.get("note"),
        "simulator_max_abs_relative_error": float(errors.relative_error.abs().max()),
        "simulator_relative_errors": dict(zip(errors.label, errors.relative_error)),
        "simulator_memory_max_abs_relative_error":
            float(mem_errors.relative_error.abs().max()) if not mem_errors.empty else None,
        "simulated_7b_step_s": big["step_s"],
        # a fit that failed (a loaded machine's times did not grow with size): named, and
        # every prediction that needs it is NaN (None in the JSON), never a number
        "simulator_calibration_problems": list(big.get("calibration_problems", [])),
        "backend": run.backend, "world_size": run.result["world_size"],
        "launch_s": run.seconds, "loadavg": run.result["loadavg"][0],
        "live_steps_streamed": len(run.steps()), "threads": threads}
    if sleep is not None and not sleep.empty:
        out["bubble_sleep_max_abs_relative_error"] = \
            float(sleep.relative_error_vs_gpipe.abs().max())
    return out


def scaling(cal: SIM.Calibration, sizes=("125M", "1.3B", "7B"), **kw) -> list[dict]:
    rows = []
    for name in sizes:
        for r in SIM.scaling(SIM.SIZES[name], cal, **kw):
            rows.append({"model": name, **r})
    return rows
