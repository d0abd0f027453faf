"""Parallel training on 2 gloo ranks (torchrun, one thread a rank), in one launch.

Targets, each able to fail and saying why:

* DDP, tensor-parallel and pipeline gradients equal one process on the same batch
  (max abs difference <= 1e-6; 1e-5 for tensor parallel), every parameter compared;
* the bubble estimator (1 - a rank's forward + backward time / the step's span, averaged
  over ranks) on GPipe stages that sleep instead of computing (they overlap on any
  machine): within 10% (relative) of (S-1)/(M+S-1) for every M of the sweep;
* the same on the model's stages within 20%, for M >= 2 (at M = 1 two stages that take
  turns give the formula's 1/2 as well, so it tells nothing) and only where both ranks had
  a core (the DDP part's contention probe, and CPU share in compute >= 0.9); else "not
  measurable here";
* the simulator, calibrated in the same launch, within 20% of every measured step time
  and of the bytes each strategy's busiest rank allocated (malloc's live bytes after a
  fresh model took one step);
* 2-rank DDP at most 0.75x the 1-rank step on the same global batch, where each rank had
  a core of its own (:func:`labkit.dist.lab.ddp_verdict`); else "not measurable here".

A target that is not measurable on this machine has ``met`` None and a note saying why.
Every timing is the fastest of ``reps`` calls (the least-disturbed one on a shared
machine; the simulator is calibrated the same way). The machine's load average is
recorded.
"""
from __future__ import annotations

import math
import os

from .. import measure
from ..dist import lab

BUBBLE_TOL = 0.20
SLEEP_TOL = 0.10
SIM_TOL = 0.20


def run(quick: bool = False) -> dict:
    kw = ({"size": "tiny", "seq": 32, "batch": 8, "steps": 2, "sweep_m": (1, 2, 4),
           "mb_rows": 4, "reps": 2} if quick else
          {"size": "small", "seq": 64, "batch": 16, "steps": 5, "sweep_m": tuple(range(1, 9)),
           "mb_rows": 4, "reps": 5})
    load_before = os.getloadavg()[0]
    r = lab.run(nproc=2, task="nli", **kw)
    note = f"2 gloo ranks x 1 thread, {kw['size']} encoder, seq {kw['seq']}, fastest of " \
           f"{kw['reps']}; load average {load_before:.1f} before" + \
           (" (quick: smoke run)" if quick else "")
    out = evaluate(r.result, note)
    env = {**measure.environment(), "backend": r.backend, "ranks": r.result["world_size"],
           "launch_s": round(r.seconds, 1), "loadavg": r.result["loadavg"]}
    return {"name": "parallel", **out, "env": env}


def _not_measurable(target: dict, why: str) -> dict:
    return {**target, "met": None, "note": f"not measurable here: {why}"}


def bubble_targets(bub, tol: float, what: str, note: str, need_cores: bool,
                   no_cores: list[str] = ()) -> list[dict]:
    """One target per M. ``need_cores``: stages that compute, measurable only for M >= 2,
    where both ranks had a core (``no_cores`` lists why not, from the DDP part's
    contention probe) and got >= CORE_SHARE CPU s per wall s inside compute."""
    out = []
    for row in bub.itertuples():
        err = abs(row.relative_error_vs_gpipe)
        t = {"target": f"GPipe bubble, {what}, S={row.S} M={row.M} vs (S-1)/(M+S-1)="
                       f"{row.gpipe_bubble:.3f}", "measured": row.measured_bubble,
             "required": f"within {tol:.0%}", "unit": "idle fraction"}
        detail = f"relative error {err:.2f}; " + (
            f"both ranks computing at once {row.measured_overlap:.2f} of the step (GPipe: "
            f"{row.gpipe_overlap:.2f}); CPU share inside compute "
            f"{row.cpu_share_in_compute:.2f}; " if need_cores else "") + note
        if need_cores and row.M < 2:
            out.append(_not_measurable(t, "at M = 1 two stages that take turns give the "
                                          "formula's value too; " + detail))
        elif need_cores and no_cores:
            out.append(_not_measurable(t, "; ".join(no_cores) + "; " + detail))
        elif need_cores and not row.cpu_share_in_compute >= lab.CORE_SHARE:
            out.append(_not_measurable(t, f"a rank got < {lab.CORE_SHARE} CPU s per wall s "
                                          f"inside compute (no core of its own); " + detail))
        else:
            out.append({**t, "met": err <= tol, "note": detail})
    return out


def evaluate(result: dict, note: str = "") -> dict:
    """Targets and rows from a ``lab.run`` result (no launch: testable on a stored or
    synthetic result)."""
    ranks = result["ranks"]
    exact = lab.correctness(ranks)
    targets = [{"target": f"{row.strategy} gradients == one process", "measured":
                row.grad_max_abs_diff, "required": row.tolerance, "unit": "max abs diff",
                "met": bool(row.exact),
                "note": f"gradients compared per rank {row.grads_compared}"
                        + (f"; MISSING {row.grads_missing}" if row.grads_missing else "")
                        + f"; {note}"} for row in exact.itertuples()]
    sleep = lab.bubble(ranks, "sleep_sweep")
    targets += bubble_targets(sleep, SLEEP_TOL, "sleeping stages", note, need_cores=False)
    bub = lab.bubble(ranks)
    ddp = lab.ddp_scaling(ranks)
    no_cores = lab.core_problems(ddp) if ddp else [
        "no DDP timing in this launch to tell whether each rank had a core"]
    targets += bubble_targets(bub, BUBBLE_TOL, "model stages", note, need_cores=True,
                              no_cores=no_cores)
    sim = lab.simulator_errors(result)
    for row in sim.itertuples():
        err = abs(row.relative_error)
        t = {"target": f"simulator step time: {row.label}", "measured": row.simulated_s,
             "required": f"within {SIM_TOL:.0%} of measured {row.measured_s * 1e3:.2f} ms",
             "unit": "s (simulated)"}
        if not math.isfinite(row.relative_error):
            targets.append({**t, "met": False, "note": "the calibration could not be "
                            "fitted: see the simulator rows"})
        else:
            targets.append({**t, "met": err <= SIM_TOL, "note": f"relative error "
                            f"{row.relative_error:+.2f} at {row.tokens_per_row} tokens a row"})
    mem = lab.simulator_memory_errors(result)
    for row in mem.itertuples():
        err = abs(row.relative_error)
        targets.append({"target": f"simulator memory per device: {row.label}",
                        "measured": row.simulated_bytes, "required": f"within {SIM_TOL:.0%} "
                        f"of allocated {row.measured_bytes} B", "unit": "bytes (simulated)",
                        "met": err <= SIM_TOL,
                        "note": f"relative error {row.relative_error:+.3f}; allocated by "
                                f"{row.measured_by} on the busiest rank after one step "
                                f"(counted tensors {row.counted_state_bytes} B)"})
    if ddp:
        v = lab.ddp_verdict(ddp)
        targets.append({**v, "note": f"{v['note']}; verdict: {ddp['verdict']}; {note}"})
    rows = ([{"table": "bubble", **row} for row in bub.to_dict(orient="records")]
            + [{"table": "bubble_sleeping", **row} for row in sleep.to_dict(orient="records")]
            + [{"table": "simulator", **row} for row in sim.to_dict(orient="records")]
            + [{"table": "simulator_memory", **row} for row in mem.to_dict(orient="records")]
            + [{"table": "ddp", **ddp}]
            + [{"table": "memory", **row} for row in lab.memory(ranks).to_dict(orient="records")])
    return {"rows": rows, "targets": targets}
