"""Fig. 2 of the seed paper at lab scale (:mod:`labkit.labs.paper`): convergence speed
against training-sample size. For each size ``n`` and method (dense, ours, LayerDrop, Q-BERT,
SDN in their training-time forms), a fresh model trained on the first ``n`` pairs; the
measure is the step and wall-clock second at which eval accuracy first reaches a target
(:func:`labkit.train.fit`'s steps-to-target), after which the run stops. Cost: at most
``len(sizes) x (len(methods) + 1) x steps`` training steps, fewer when targets are reached.
"""
from __future__ import annotations

import warnings

from .. import model as M
from .. import train as T
from .. import validate as V
from ..techniques import quant as Q
from .paper import METHODS, MethodUnavailable


def training_form(method: str, model: M.Transformer, s: float, bits_by_layer=()) -> list:
    """Apply ``method``'s training-time form to a fresh ``model`` in place; returns the
    callbacks training needs. ours: FFN width ``(1-s) d_ff`` and 8-bit fake quant (QAT);
    qbert: fake quant at the Hessian bit assignment; layerdrop/sdn: the depth techniques."""
    from ..techniques import apply_
    from ..techniques.sparsity import compact_neurons_

    V.choice("method", method, ("dense", *METHODS))
    if method == "ours":
        compact_neurons_(model, s)
        model.requires_grad_(True)  # compacted modules come frozen (inference kernels)
        apply_(model, Q.FakeQuantConfig(bits=8))
    elif method == "qbert":
        apply_(model, Q.FakeQuantConfig(bits=8, bits_by_layer=tuple(bits_by_layer)))
    elif method == "layerdrop":
        from ..techniques.layerdrop import LayerDropConfig

        apply_(model, LayerDropConfig(p=s))
    elif method == "sdn":
        from ..techniques.early_exit import EarlyExitConfig

        apply_(model, EarlyExitConfig())
    return []


def convergence(pairs, cfg: M.ModelConfig, methods, sizes, s: float, target: float,
                steps: int, lr: float, batch_size: int = 32, eval_every: int = 25,
                seed: int = 0, bits_by_layer=(), auto_fraction: float = 0.9) -> list[dict]:
    """Fig. 2: for each training-sample size ``n`` and method, train a fresh model of
    ``cfg`` on the first ``n`` training pairs and record the step and second at which the
    eval accuracy first reaches ``target`` (None: not within ``steps``). ``target=0``:
    ``auto_fraction`` of the way from chance to the best eval accuracy the dense model
    reaches at the largest ``n`` (run first), so the target is reachable at lab scale and
    never below chance. Every row carries ``chance`` (the eval set's majority-class rate)
    and ``chance_margin`` (two binomial standard errors of it): a target inside that band
    measures noise, and :func:`labkit.labs.paper_verdicts.verdicts` says so."""
    rows, sizes = [], sorted(sizes)
    chance, margin = chance_level(pairs.eval["labels"])
    runs = [(n, m) for n in sizes for m in ("dense", *methods)]
    if target <= 0:
        runs.remove((sizes[-1], "dense"))
        runs.insert(0, (sizes[-1], "dense"))
    for n, method in runs:
        part = {k: v[:n] for k, v in pairs.train.items()}
        model = M.build(cfg, seed=seed)
        try:
            cbs = training_form(method, model, s, bits_by_layer)
        except MethodUnavailable as e:
            warnings.warn(f"{method}: {e}", stacklevel=2)
            rows.append({"method": method, "n_train": n, "status": f"unavailable: {e}"})
            continue
        strategy = None
        if method == "sdn":
            from ..techniques.early_exit import SDNStrategy

            strategy = SDNStrategy(steps)
        goal = target if target > 0 else None
        if goal:  # steps and seconds to target are known once it is reached: stop there
            cbs = [*cbs, _StopAt(goal)]
        r = T.fit(model, _batches(part, batch_size, seed), steps=steps, lr=lr,
                  eval_fn=lambda m=model: T.evaluate(m, pairs.eval),
                  eval_every=eval_every, callbacks=cbs, seed=seed, strategy=strategy,
                  target=("accuracy", goal) if goal else None, progress=False)
        if target <= 0:  # the auto target, then where the dense run crossed it
            best = max(h["accuracy"] for h in r.history if h["split"] == "eval")
            target = chance + auto_fraction * (best - chance)
            hit = next(h for h in r.history if h["split"] == "eval" and h["accuracy"] >= target)
            r.steps_to_target, r.seconds_to_target = hit["step"], hit["seconds"]
        rows.append({"method": method, "n_train": n, "status": "measured", "target": target,
                     "chance": chance, "chance_margin": margin,
                     "steps_to_target": r.steps_to_target,
                     "seconds_to_target": r.seconds_to_target,
                     "final_accuracy": r.final.get("accuracy"), "steps": r.steps})
    return sorted(rows, key=lambda r: (r["n_train"], ("dense", *METHODS).index(r["method"])))


def chance_level(labels) -> tuple[float, float]:
    """The accuracy of always answering the eval set's most common label, and two binomial
    standard errors of an accuracy at that level on this many rows."""
    n = len(labels)
    p = float(labels.bincount().max()) / n
    return p, 2 * (p * (1 - p) / n) ** 0.5


class _StopAt(T.Callback):
    """End training at the first evaluation reaching the target accuracy (the rows'
    ``final_accuracy`` is then the accuracy there)."""

    def __init__(self, goal: float):
        self.goal = goal

    def on_eval(self, state):
        if state.metrics.get("accuracy", 0.0) >= self.goal:
            state.stop = True


def _batches(part: dict, batch_size: int, seed: int):
    from ..data import batches

    return batches(part, min(batch_size, len(part["labels"])), seed=seed)
