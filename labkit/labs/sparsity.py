"""Helpers for the sparsity notebooks (04 pruning, 05 sparse-structure benchmark).

* :func:`workload`: decoder LM on the synthetic corpus (``"lm"``) or the encoder classifier
  on ``synthetic-nli`` (``"nli"``): config, batches, eval set and a latency sample.
* :func:`sparsity_config`: a :class:`~labkit.techniques.sparsity.SparsityConfig` whose cubic
  schedule fits a run of ``steps`` steps (gradual pruning ends at 60% of training).
* :func:`train_one`: one fresh model (or a copy of a trained one), one pruning method,
  curves on a LiveBoard.
* :func:`curve_study`: the survey's experiment: loss curves at several MLP sparsities for
  each structure, against dense and against a small dense model with the same non-zeros.
* :func:`nm_for`: the N:M pattern nearest a sparsity (M dividing the model's dimensions).
* :func:`model_latency_sweep`: inference time of a pruned model against sparsity, one line
  per (structure, path), with quartile bands (notebook 05, the first paper's figure).
"""
from __future__ import annotations

import copy
import dataclasses
import warnings

from .. import measure
from .. import validate as V
from ..model import ModelConfig, build
from ..techniques import pruning as P
from ..techniques import sparsity as S
from ..techniques.registry import apply_
from ..train import evaluate
from . import common as C
from .workloads import TASKS, Workload, workload


def sparsity_config(steps: int, sparsity: float = 0.9, structure: str = "unstructured",
                    method: str = "magnitude", l1_lambda: float = 1e-4, n: int = 2, m: int = 4,
                    block: int = 16, scope: str = "layer",
                    parts: tuple = ("ffn",)) -> S.SparsityConfig:
    """A config whose gradual schedule (10 pruning steps) ends at 60% of ``steps``."""
    V.integer("steps", steps, 1)
    prune_steps = max(1, min(10, int(0.6 * steps)))
    every = max(1, int(0.6 * steps) // prune_steps)
    if structure == "head" and "attn" not in parts:
        parts = ("attn",)  # heads live in the attention
    return S.SparsityConfig(sparsity=sparsity, structure=structure, method=method,
                            scope=scope, parts=parts, n=n, m=m, block=block,
                            l1_lambda=l1_lambda, prune_steps=prune_steps, prune_every=every)


def nm_for(sparsity: float, dims: tuple[int, ...]) -> tuple[int, int]:
    """The N:M (N=1 or 2, M a power of two dividing every dim) nearest ``sparsity``."""
    best = None
    for m in (4, 8, 2, 16, 32):  # ties go to the hardware pattern 2:4
        if any(d % m for d in dims):
            continue
        for n in range(1, m):
            err = abs((1 - n / m) - sparsity)
            if best is None or err < best[0] - 1e-12:
                best = (err, n, m)
    if best is None:
        raise V.LabkitConfigError("m", None, f"a power of two dividing {dims}")
    return best[1], best[2]


def train_one(work: Workload, config: S.SparsityConfig | None, steps: int, lr: float = 3e-3,
              eval_every: int = 10, seed: int = 0, board=None, series: str = "",
              prune_at: float = 0.5, cfg: ModelConfig | None = None, init=None) -> dict:
    """Train one fresh model (dense when ``config`` is None) and return
    ``{"model", "result", "final", "sparsity"}``; curves go to ``board`` under ``series``.

    ``init``: a trained model to start from (a deep copy is trained; ``init`` is untouched),
    e.g. the cached dense baseline: pruning then fine-tunes it for ``steps``."""
    model = copy.deepcopy(init).train() if init is not None else build(cfg or work.cfg,
                                                                          seed=seed)
    callbacks = [board.callback("loss", series)] if board is not None else []

    def ev():
        return evaluate(model, work.eval_set)

    batches = work.make_batches(seed)
    if config is None:
        from ..train import fit
        res = fit(model, batches, steps, lr=lr, eval_fn=lambda: {**ev(), "sparsity": 0.0},
                  eval_every=eval_every, callbacks=callbacks, seed=seed, progress=False)
    else:
        S.attach(model, config)  # all-ones masks; train_sparse prunes on the method's plan
        model.applied_techniques = [{"technique": type(config).__name__,
                                     **dataclasses.asdict(config)}]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = P.train_sparse(model, config, batches, steps, eval_fn=ev,
                                 eval_every=eval_every, callbacks=callbacks, lr=lr,
                                 prune_at=prune_at, seed=seed)
        for w in caught:  # recorded in the run's row, and still shown
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        notes = sorted({str(w.message).splitlines()[0][:160] for w in caught})
        return {"model": model, "result": res, "final": res.final,
                "sparsity": S.actual_sparsity(model), "warnings": "; ".join(notes)}
    return {"model": model, "result": res, "final": res.final,
            "sparsity": S.actual_sparsity(model), "warnings": ""}


def prune_from(work: Workload, init, config: S.SparsityConfig | None, steps: int,
               lr: float = 3e-4, eval_every: int = 10, seed: int = 0, board=None,
               series: str = "") -> dict:
    """Prune a copy of the trained model ``init`` by ``config.method`` and fine-tune it for
    ``steps`` (same batches, lr and steps for every method, so they compare fairly):

    * ``magnitude``: one-shot prune of the trained weights at step 0, then ``steps`` of
      fine-tuning with the mask fixed;
    * ``gradual``: the cubic schedule from the trained weights, fine-tuning throughout;
    * ``l1``: the penalty for the first half, threshold, fine-tune the second half.

    ``config=None`` evaluates ``init`` itself (the dense baseline, no extra steps). Returns
    the dict of :func:`train_one` (``result`` is None for the dense baseline)."""
    if config is None:
        final = evaluate(init, work.eval_set)
        if board is not None:
            for k, v in {**final, "sparsity": 0.0}.items():
                if k in board.panels:  # as the board's callback logs an evaluation
                    board.log(k, f"{series} eval", 0, v, flush=True)
        return {"model": init, "result": None, "final": final, "sparsity": 0.0}
    prune_at = 0.0 if config.method == "magnitude" else 0.5
    return train_one(work, config, steps, lr, eval_every, seed, board, series,
                     prune_at=prune_at, init=init)


def small_dense_cfg(cfg: ModelConfig, sparsity: float) -> ModelConfig:
    """The dense model with the same number of non-zero MLP weights as ``cfg`` pruned to
    ``sparsity`` (MLP weights are linear in d_ff)."""
    return dataclasses.replace(cfg, d_ff=max(1, round(cfg.d_ff * (1 - sparsity))))


def curve_study(work: Workload, structures, sparsities, steps: int, lr: float = 3e-3,
                eval_every: int = 10, seed: int = 0, block: int = 16, board=None,
                small_dense: bool = True) -> tuple[list[dict], list[dict]]:
    """Sparse-from-initialisation training (magnitude masks at init, ``prune_at=0``) of the
    MLPs at each sparsity for each structure, plus dense and, per sparsity, a small dense
    model with the same number of non-zero MLP weights. Returns (summary rows, curve rows)."""
    cfg = work.cfg
    summary, curves = [], []

    def record(label, structure, target, out):
        hist = out["result"].history
        for h in hist:
            if h["split"] == "eval":
                curves.append({"run": label, "structure": structure, "target": target,
                               "step": h["step"], "eval_loss": h["loss"]})
        summary.append({"run": label, "structure": structure, "target_sparsity": target,
                        "actual_sparsity": out["sparsity"],
                        "mlp_nonzero": _mlp_nonzero(out["model"]),
                        "eval_loss": out["final"].get("loss"),
                        **({"accuracy": out["final"]["accuracy"]}
                           if "accuracy" in out["final"] else {})})

    record("dense", "dense", 0.0, train_one(work, None, steps, lr, eval_every, seed, board,
                                            "dense"))
    for s in sparsities:
        if small_dense:
            scfg = small_dense_cfg(cfg, s)
            record(f"small dense d_ff={scfg.d_ff}", "small-dense", s,
                   train_one(work, None, steps, lr, eval_every, seed, board,
                             f"small dense {s:.0%}", cfg=scfg))
        for st in structures:
            kw = {}
            label = f"{st} {s:.0%}"
            if st == "nm":
                n, m = nm_for(s, (cfg.d_model, cfg.d_ff))
                kw = {"n": n, "m": m}
                label = f"nm {n}:{m} ({1 - n / m:.1%})"
            c = sparsity_config(steps, s, st, "magnitude", block=block, **kw)
            record(label, st, s, train_one(work, c, steps, lr, eval_every, seed, board,
                                           label, prune_at=0.0))
    return summary, curves


def _mlp_nonzero(model) -> int:
    total = 0
    for blk in model.blocks:
        for p in blk.ffn.parameters():
            total += int(p.detach().count_nonzero())
        for lin in blk.ffn.modules():
            if isinstance(lin, S.MaskedLinear):
                total -= int(lin.parametrizations.weight.original.detach().count_nonzero())
                total += int(lin.weight.detach().count_nonzero())
    return total


def model_latency_sweep(cfg: ModelConfig, inputs: tuple, sparsities, lines,
                        rounds: int = 5, min_run_time: float = 0.05, block: int = 32,
                        seed: int = 0) -> list[dict]:
    """Inference time of the model with its MLPs pruned, for each ``(structure, path)`` in
    ``lines`` and each sparsity, side by side with the dense model
    (:func:`labkit.measure.paired`). Rows carry the median, its min and max over rounds
    (error bands) and the paired speedup. N:M lines are simulated on CPU and say so."""
    rows = []
    dense = build(cfg, seed=seed).eval().requires_grad_(False)
    for s in sparsities:
        mods, notes = {"dense": dense}, {}
        for st, path in lines:
            kw = {}
            if st == "nm":
                n, m = nm_for(s, (cfg.d_model, cfg.d_ff))
                kw = {"n": n, "m": m}
            model = copy.deepcopy(dense)
            apply_(model, S.SparsityConfig(sparsity=s, structure=st, block=block, **kw))
            key = f"{st} / {path}"
            if path == "accelerate":
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    acc = S.accelerate(model, *inputs, rounds=2, min_run_time=0.01,
                                       verify=True, verify_rounds=3)
                notes[key] = "; ".join(sorted({str(w.message)[:160] for w in caught} | {
                    r["warnings"] for r in acc if r.get("warnings")}))
            else:
                S.convert(model, path)
            mods[key] = model
        for t in C.timed(mods, inputs, "dense", rounds=rounds, min_run_time=min_run_time):
            k = t.pop("variant")
            st, path = ("dense", "dense") if k == "dense" else k.split(" / ")
            measured = st != "nm"
            paths = sorted(set(measure.kernel_paths(mods[k]).values()))
            rows.append({"sparsity": s, "structure": st, "path": path, "line": k, **t,
                         "speed_measured": measured, "kernel_paths": ", ".join(paths),
                         "note": "" if measured else S.NM_CPU_NOTE,
                         "warnings": notes.get(k, "")})
    return rows


__all__ = [
    "TASKS",
    "Workload",
    "curve_study",
    "model_latency_sweep",
    "nm_for",
    "prune_from",
    "small_dense_cfg",
    "sparsity_config",
    "train_one",
    "workload",
]
