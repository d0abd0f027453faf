"""Depth benchmark: early exit (SDN + The Right Tool) and CQIL across processes.

Targets, each measured side by side in this one run, each able to fail and saying why:

1. Early exit at <= 1 point accuracy loss vs the full model: >= 1.5x fewer blocks executed
   on average. The SDN encoder (6 blocks) is trained on the pointer task
   (:func:`labkit.labs.depth.pointer_task`), where a row needs one dependent read per hop,
   so depth matters. The held-out rows are split in two: the first half fits the
   temperatures and chooses the threshold ``q`` (fewest blocks within 1 point of the final
   head there), the second half scores it with real per-sample exits
   (:func:`labkit.techniques.early_exit.predict`). Verdict
   (:func:`labkit.techniques.early_exit.verdict`): "inconclusive" unless the final head
   beats the first exit by more than two standard errors on the test half (where one block
   does as well as six, fewer blocks prove nothing), else met or not met. The measured
   latency ratio (full model without exit heads / early exit, paired rounds in rotated
   order) sits next to it, batched and at batch 1.
2. CQIL with P = 2 over the upper half of a decoder of 8 blocks at batch 1: latency cut
   >= 20% vs the sequential model on the same 2 cores, the sequential run the best of 1 and
   2 threads. Two ranks under torchrun (gloo, one thread each) hold two blocks of the group
   each; one all-reduce per step. The ideal cut ``(end - start)(1 - 1/P) / L = 25%``, the
   cost of one all-reduce measured alone and of one block (the sequential time / L) are
   beside it; when the cut falls short the note says which of them explains it. Latency does
   not depend on the weights, so the decoder is untrained (``d_model=384``, 12 heads,
   ``d_ff=1536``, 64 tokens: a block costs a few ms, well above an all-reduce).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .. import measure
from ..labs import depth as L
from ..labs import depth_summary as DS
from ..model import build
from ..techniques import cqil_dist as CD

REQ_BLOCKS = 1.5
REQ_ACC_LOSS = 0.01
REQ_CUT = 0.20
QS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99, 0.995)


def early_exit_part(quick: bool, rounds: int) -> tuple[list[dict], dict]:
    sdn = L.trained_sdn(6, 60 if quick else 1500)
    model = sdn.model
    calib, test = L.split_eval(sdn.eval_set)
    L.calibration_rows(model, calib, test)  # temperatures fitted on the calibration half
    rows = L.exit_rows(model, test, QS, calibrated=True) + \
        L.exit_rows(model, test, QS, calibrated=False)
    choice = L.exit_choice(model, calib, test, QS, calibrated=True, required=REQ_BLOCKS,
                           max_loss=REQ_ACC_LOSS)
    target = {"target": "early exit at <= 1 point accuracy loss: blocks executed, full / exit "
                        "(q chosen on the calibration half, scored on the test half)",
              "required": REQ_BLOCKS, "unit": "x", "measured": choice["blocks_ratio"],
              "met": choice["verdict"] == "met", "verdict": choice["verdict"]}
    detail = (f"first exit {choice['first_exit_accuracy']:.3f}, final head "
              f"{choice['full_accuracy']:.3f} on {choice['test_rows']} test rows")
    out = [{"part": "early_exit", **r} for r in rows] + [{"part": "early_exit_choice", **choice}]
    if choice["q"] is not None:
        lat = L.exit_latency(model, test, [choice["q"]], batch=len(test["labels"]),
                             singles=8 if quick else 32, rounds=rounds, calibrated=True)
        out += [{"part": "early_exit_latency", **r} for r in lat]
        detail += (f"; q={choice['q']} (calibrated): exit accuracy "
                   f"{choice['exit_accuracy']:.3f}, {choice['exit_blocks']:.2f} of "
                   f"{len(model.blocks)} blocks on average; measured "
                   + ", ".join(f"{r['scope']} latency speedup {r['speedup']:.2f}x "
                               f"[{r['speedup_min']:.2f}, {r['speedup_max']:.2f}]"
                               for r in lat))
    target["note"] = (f"{choice['verdict']}: {choice['why']}; {detail}"
                      + ("; quick: SDN trained 60 steps only" if quick else ""))
    return out, target


def cqil_part(quick: bool, rounds: int) -> tuple[list[dict], dict]:
    n, start, end = 8, 4, 8
    d, heads, ff, seq = (128, 4, 512, 64) if quick else (384, 12, 1536, 64)
    model = build("tiny", kind="decoder", n_layers=n, d_model=d, n_heads=heads, d_ff=ff,
                  max_len=seq, vocab_size=1024, seed=0).eval()
    ids = torch.randint(0, 1024, (1, seq))
    folder = Path(tempfile.mkdtemp(prefix="labkit-bench-cqil-"))
    CD.save_job(folder / "job.pt", model, ids)
    from ..dist import launch

    res = launch("labkit.techniques.cqil_dist:run",
                 {"model": str(folder / "job.pt"), "groups": [[start, end]], "n_layers": n,
                  "reps": 3 if quick else 5, "rounds": rounds}, nproc=2,
                 run_dir=folder / "run", validate=CD.validate, timeout=900.0)
    row = CD.summarize(res.result)[0]
    ideal = (end - start) * (1 - 1 / 2) / n
    cut = row["latency_cut"]
    load = _loadavg()
    why = DS.cqil_shortfall(row, n, REQ_CUT, load, _cores())
    target = {"target": f"CQIL P=2 over blocks [{start},{end}) of {n}, batch 1: latency cut vs "
                        f"sequential (best of 1 and 2 threads)", "required": REQ_CUT,
              "unit": "fraction", "measured": cut, "met": cut >= REQ_CUT,
              "verdict": "met" if cut >= REQ_CUT else "not met",
              "note": (f"not met: {why}; " if cut < REQ_CUT else "")
                      + f"ideal {ideal:.2f}; sequential {row['seq_1thread_ms']:.2f} ms (1 thread),"
                      f" {row['seq_2threads_ms']:.2f} ms (2 threads); CQIL {row['cqil_ms']:.2f} "
                      f"ms; one all-reduce of (1, {seq}, {d}) {row['allreduce_ms']:.3f} ms; "
                      f"cut over rounds [{row['latency_cut_min']:.2f}, "
                      f"{row['latency_cut_max']:.2f}]; d_model={d}, seq {seq}"
                      + ("; quick: small shapes, smoke run" if quick else "")}
    return [{"part": "cqil", **row, "ideal_cut": ideal, "launch_s": res.seconds}], target


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def run(quick: bool = False) -> dict:
    rounds = 1 if quick else 3
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the in-process timings; the CQIL part sets its own
    try:
        erows, etarget = early_exit_part(quick, rounds)
    finally:
        torch.set_num_threads(threads)
    crows, ctarget = cqil_part(quick, rounds)
    env = measure.environment()
    if _loadavg() is not None:
        env["loadavg_1m"] = _loadavg()
    return {"name": "depth", "quick": quick, "targets": [etarget, ctarget],
            "rows": erows + crows, "env": env,
            "note": "ratios measured side by side in this run; on a machine busier than its "
                    "core count (env.loadavg_1m) the CQIL ranks do not get a core each"}
