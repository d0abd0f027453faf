"""Static INT8's accuracy cost and speed on a trained classifier, against fp32 on the same
rows: the study the lead runs on real text (MiniLM fine-tuned on QNLI).

    python -m labkit.labs.quant_static --model minilm --task qnli \\
        --source <glue folder> --calibration-rows 512 --batch 32 --out static.json

Steps (each a labkit call): the cached fine-tuned classifier
(:func:`labkit.classifiers.classifier`); calibration batches drawn from its *training*
rows (``calibration_rows`` rows, stated); :func:`labkit.techniques.static_int8.static_int8`
and the same fp32 graph compiled alike (:func:`~labkit.techniques.static_int8.compiled_fp32`)
and torchao's dynamic INT8 (:class:`~labkit.techniques.int8.Int8Config`) beside fp32 eager;
accuracy of each on the eval split with its binomial standard error and the paired
difference to fp32 on the same rows (its standard error and an exact McNemar test on the
discordant rows); paired latency on one eval batch of ``batch`` rows (rotated rounds,
:func:`labkit.measure.paired`), static INT8 against fp32 compiled (like with like).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import warnings

import torch

from .. import measure
from .. import validate as V
from ..techniques import apply_
from ..techniques import int8 as I
from ..techniques import static_int8 as SI


def _batches(eval_set, batch_size: int = 64):
    """The eval split as batch dicts (a list of batches, or one dict of tensors)."""
    if isinstance(eval_set, list):
        return eval_set
    n = len(eval_set["input_ids"])
    return [{k: v[i: i + batch_size] for k, v in eval_set.items()}
            for i in range(0, n, batch_size)]


def predictions(model, eval_set) -> tuple[torch.Tensor, torch.Tensor]:
    """``(predicted labels, true labels)`` over the eval split, in its row order."""
    preds, labels = [], []
    for b in _batches(eval_set):
        with torch.inference_mode():
            logits = model(*SI.as_args(b))
        preds.append(logits.argmax(-1))
        labels.append(b["labels"])
    return torch.cat(preds), torch.cat(labels)


def paired_accuracy(pred: torch.Tensor, ref_pred: torch.Tensor, labels: torch.Tensor) -> dict:
    """Accuracy with its binomial standard error, and the paired difference to the
    reference on the same rows (points, positive = lost): its standard error
    ``sqrt((b + c - (b - c)^2 / n) / n^2)`` from the discordant counts (b: only the
    reference right, c: only this right) and an exact two-sided McNemar p-value."""
    from scipy.stats import binomtest

    n = len(labels)
    ok, ref_ok = pred == labels, ref_pred == labels
    acc = float(ok.float().mean())
    b, c = int((ref_ok & ~ok).sum()), int((ok & ~ref_ok).sum())
    diff = (b - c) / n
    se_diff = math.sqrt(max(b + c - (b - c) ** 2 / n, 0.0)) / n
    p = binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
    return {"accuracy": acc, "accuracy_se": math.sqrt(acc * (1 - acc) / n), "rows": n,
            "drop_points": 100 * diff, "drop_se_points": 100 * se_diff,
            "only_reference_right": b, "only_this_right": c, "mcnemar_p": p}


def study(model, calibration: list, eval_set, timed: dict, rounds: int = 5,
          min_run_time: float = 0.5, timer=None, keep_fp32=()) -> dict:
    """Every variant's accuracy on ``eval_set`` paired with fp32, and latency on ``timed``
    (a batch dict) side by side. ``calibration``: batches from the training rows;
    ``keep_fp32``: linears a ``static_int8_mixed`` variant leaves in fp32 (none: no such
    variant)."""
    args = SI.as_args(timed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        variants = {"fp32": model, "fp32_compiled": SI.compiled_fp32(model, args),
                    "static_int8": SI.static_int8(model, calibration, args)}
        if keep_fp32:
            variants["static_int8_mixed"] = SI.static_int8(model, calibration, args,
                                                           keep_fp32=keep_fp32)
        variants["int8_dynamic"] = apply_(copy.deepcopy(model), I.Int8Config())
    ref_pred, labels = predictions(model, eval_set)
    rows = []
    for k, m in variants.items():
        pred, _ = predictions(m, eval_set)
        rows.append({"variant": k, **paired_accuracy(pred, ref_pred, labels),
                     "kernel_path": getattr(m, "kernel_path", "fp32 eager"),
                     **{f: m.info[f] for f in ("calibration_rows", "calibration_tokens",
                                               "keep_fp32", "compile_seconds")
                        if hasattr(m, "info")
                        and f in m.info},
                     "bytes": measure.model_bytes(m)["total"]})

    def run(m):
        def fn():
            with torch.inference_mode():
                m(*args)
        return fn

    p = measure.paired({k: run(m) for k, m in variants.items()}, reference="fp32_compiled",
                       rounds=rounds, min_run_time=min_run_time, timer=timer)
    for r in rows:
        k = r["variant"]
        r.update(latency_ms=p.seconds[k] * 1e3, speedup_vs_fp32_compiled=p.ratio[k],
                 speedup_min=p.ratio_spread[k][0], speedup_max=p.ratio_spread[k][1],
                 speedup_vs_fp32=p.seconds["fp32"] / p.seconds[k])
    st = next(r for r in rows if r["variant"] == "static_int8")
    env = {**measure.environment(), "loadavg_1m": os.getloadavg()[0],
           "int8_isa": I.cpu_int8_isa(), "timed_batch": list(args[0].shape)}
    head = {"static_speedup_vs_fp32_compiled": st["speedup_vs_fp32_compiled"],
            "static_accuracy_drop_points": st["drop_points"],
            "static_accuracy_drop_se_points": st["drop_se_points"],
            "calibration_rows": st["calibration_rows"]}
    mixed = next((r for r in rows if r["variant"] == "static_int8_mixed"), None)
    if mixed is not None:
        head.update(mixed_speedup_vs_fp32_compiled=mixed["speedup_vs_fp32_compiled"],
                    mixed_accuracy_drop_points=mixed["drop_points"],
                    mixed_accuracy_drop_se_points=mixed["drop_se_points"],
                    mixed_keep_fp32=mixed["keep_fp32"])
    return {"rows": rows, "env": env, "headline": head}


def calibration_batches(workload, rows: int, seed: int = 0) -> list:
    """Batches from the training rows (the workload's own batch stream, another seed than
    training's) holding at least ``rows`` rows."""
    V.integer("calibration_rows", rows, 1)
    it, out, n = workload.make_batches(seed + 12345), [], 0
    while n < rows:
        b = next(it)
        out.append(b)
        n += len(b["input_ids"])
    return out


CHECK_ROWS, CHECK_SEED = 1024, 777  # the training rows the fp32-fallback ranking reads


def timed_batch(task, batch: int) -> dict:
    """The first ``batch`` eval rows, padding columns they all share dropped."""
    from ..pretrained import trim

    V.integer("batch", batch, 1)
    return trim({k: v[:batch] for k, v in task.eval.items()})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m labkit.labs.quant_static",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="minilm", choices=["tiny", "minilm"])
    ap.add_argument("--task", default="qnli")
    ap.add_argument("--source", default="synthetic")
    ap.add_argument("--calibration-rows", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=None,
                    help="fine-tuning steps of the classifier (default: its recipe; cached)")
    ap.add_argument("--holdout", type=float, default=0.1,
                    help="the classifier's dev fraction of train (as labkit plan: one cache)")
    ap.add_argument("--kl-fraction", type=float, default=0.5,
                    help="a mixed variant keeps the fewest FFN down projections fp32 that "
                         "cut all-INT8's logit KL from fp32 to this fraction, on training "
                         "rows the calibration did not use (0: no mixed variant)")
    ap.add_argument("--out", default="", help="a new JSON file (an existing one is kept)")
    a = ap.parse_args(argv)
    if a.out and os.path.exists(a.out):
        ap.error(f"--out={a.out!r} exists: give a new file (results are never overwritten)")
    from ..classifiers import classifier

    with measure.num_threads(a.threads):
        clf = classifier(a.model, a.task, a.source, steps=a.steps, holdout=a.holdout,
                         progress=True)
        cal = calibration_batches(clf.workload, a.calibration_rows)
        timed = timed_batch(clf.task, a.batch)
        ranking, keep, tried = [], [], []
        if a.kl_fraction:  # chosen on training rows the calibration did not see
            check = calibration_batches(clf.workload, CHECK_ROWS, seed=CHECK_SEED)
            ranking = SI.rank_fp32_fallback(clf.model, cal, check, SI.as_args(timed))
            keep, tried = SI.choose_fp32_fallback(clf.model, cal, check, SI.as_args(timed),
                                                  ranking, kl_fraction=a.kl_fraction)
        res = study(clf.model, cal, clf.workload.eval_set, timed, rounds=a.rounds,
                    keep_fp32=keep)
    res["fp32_fallback_ranking"], res["fp32_fallback_tried"] = ranking, tried
    res["args"] = vars(a)
    text = json.dumps(res, indent=1, default=str)
    if a.out:
        from ..notebook import write_json_atomic

        write_json_atomic(a.out, json.loads(text))  # text: every value made printable
    import pandas as pd

    with pd.option_context("display.max_columns", None, "display.width", 200):
        print(pd.DataFrame(res["rows"]).drop(columns=["kernel_path"]).to_string(index=False))
    print(json.dumps(res["headline"], indent=1), "\n", res["env"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
