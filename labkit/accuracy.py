"""Accuracy as a measurement: per-row predictions, the binomial standard error, and the
paired difference of two models on the same rows with McNemar's exact test.

A "within one point" claim on 1,000 rows needs the paired view: each model's accuracy has a
standard error near 1.5 points there, but two models scored on the same rows disagree on
few of them, and only those rows carry the difference. For ``n`` rows with ``b`` rows the
reference gets right and the candidate wrong and ``c`` the other way round::

    diff = (c - b) / n                      (candidate minus reference)
    SE(diff) = sqrt(b + c - (c - b)^2 / n) / n
    McNemar exact p = P(X <= min(b, c)) * 2,  X ~ Binomial(b + c, 1/2)

(McNemar, *Note on the sampling error of the difference between correlated proportions or
percentages*, Psychometrika 1947; the exact form is a binomial test on the discordant rows.)
"""
from __future__ import annotations

import math

import torch

from . import validate as V


def _batches(rows, batch_size: int):
    if isinstance(rows, list):
        return rows
    n = len(rows["input_ids"])
    return [{k: v[i: i + batch_size] for k, v in rows.items()} for i in range(0, n, batch_size)]


@torch.no_grad()
def predictions(model, rows, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(predicted class, label)`` per row of ``rows`` (a dict of tensors or a list of
    batches), in order. An early-exit model predicts with its exits
    (:func:`labkit.techniques.early_exit.predict`)."""
    from .techniques.early_exit import EarlyExitExecutor, predict

    was = model.training
    model.eval()
    exits = isinstance(getattr(model, "executor", None), EarlyExitExecutor)
    preds, labels = [], []
    try:
        for b in _batches(rows, batch_size):
            if exits:
                logits = predict(model, b["input_ids"], b.get("padding_mask"))[0]
            else:
                logits = model(b["input_ids"], b.get("padding_mask"), b.get("token_type_ids"))
            preds.append(logits.argmax(-1))
            labels.append(b["labels"])
    finally:
        model.train(was)
    return torch.cat(preds), torch.cat(labels)


def correct(model, rows, batch_size: int = 64) -> torch.Tensor:
    """(n,) bool: which rows ``model`` classifies right."""
    p, y = predictions(model, rows, batch_size)
    return p == y


def binomial_se(p: float, n: int) -> float:
    """``sqrt(p (1 - p) / n)``: the standard error of an accuracy ``p`` on ``n`` rows."""
    V.number("accuracy", p, 0.0, 1.0)
    V.integer("n", n, 1)
    return math.sqrt(p * (1.0 - p) / n)


def summary(right: torch.Tensor) -> dict:
    """``{"accuracy", "se", "n"}`` of a per-row correctness vector."""
    n = int(right.numel())
    acc = float(right.float().mean())
    return {"accuracy": acc, "se": binomial_se(acc, n), "n": n}


def paired(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    """The candidate's accuracy minus the reference's on the same rows (per-row correctness
    vectors), its standard error, the discordant counts and McNemar's exact p-value."""
    if reference.shape != candidate.shape:
        raise V.LabkitConfigError("candidate", tuple(candidate.shape),
                                  f"per-row results on the reference's rows {tuple(reference.shape)}")
    from scipy.stats import binomtest

    n = int(reference.numel())
    b = int((reference & ~candidate).sum())  # the reference right, the candidate wrong
    c = int((~reference & candidate).sum())
    diff = (c - b) / n
    se = math.sqrt(max(b + c - (c - b) ** 2 / n, 0.0)) / n
    p = 1.0 if b + c == 0 else float(binomtest(min(b, c), b + c, 0.5).pvalue)
    return {"diff": diff, "se": se, "ref_only": b, "cand_only": c, "n": n, "mcnemar_p": p}


__all__ = ["binomial_se", "correct", "paired", "predictions", "summary"]
