"""What notebook 04 (sparsity and pruning) runs, so the notebook is a thin driver.

:class:`PruningLab` holds the two workloads (the decoder LM trained from scratch, and the
encoder on a sentence-pair task started from a trained, cached dense baseline) and the
knobs; its methods build a validated :class:`~labkit.techniques.sparsity.SparsityConfig`
(:meth:`config`), run one method (:meth:`run`), compare methods at one sparsity
(:meth:`compare_methods`), run the survey's curve study (:meth:`curves`) and put claimed vs
measured next to the kernel path ``accelerate`` chose (:meth:`claimed_vs_measured`).
Figures and the headline metrics come from here too.

The NLI side is any dense classifier of :func:`labkit.classifiers.classifier` (the tiny
encoder or MiniLM, on synthetic or real text): every method's accuracy cost is measured
against that baseline's own accuracy, next to the speed and bytes of section 4.
"""
from __future__ import annotations

import torch

from .. import accelerate as A
from .. import figures as F
from .. import measure, ui
from .. import validate as V
from ..techniques import expected
from ..techniques import sparsity as S
from . import common as C
from . import sparsity as L
from .workloads import TASKS

MLP_STRUCTURES = ("unstructured", "nm", "block", "row", "column", "neuron")
AUTO = "auto"


def method_for(structure: str, method: str) -> str:
    """``method`` itself, or for ``"auto"`` a method valid for the structure: gradual
    pruning everywhere except N:M, whose fixed pattern a schedule cannot step through
    (one-shot magnitude there)."""
    V.choice("method", method, (AUTO, *S.METHODS))
    if method != AUTO:
        return method
    return "magnitude" if structure == "nm" else "gradual"


def _board(task: str, title: str, live: bool):
    """Train and eval loss, sparsity (and NLI accuracy) of one task's runs, shown now when
    live (a static board is shown once its runs are done)."""
    board = ui.LiveBoard(panels=["loss", "sparsity"] + (["accuracy"] if task == "nli" else []),
                         live=live, title=title)
    if board.live:
        board.show()
    return board


HEADLINE = ("claimed_nonzero", "counted_nonzero", "my_actual_sparsity", "accelerate_speedup",
            "nli_magnitude_accuracy_cost")


class PruningLab:
    """The knobs of notebook 04 (``p``: its validated parameters) and the workloads they run
    on: the decoder LM from scratch and the trained classifier ``clf``
    (:class:`labkit.classifiers.Classifier`)."""

    def __init__(self, p: dict, clf):
        for k in ("method_steps", "curve_steps", "accel_rounds"):
            V.integer(k, p[k], 1, 100_000)
        V.number("finetune_lr", p["finetune_lr"], 0.0, 1.0, lo_open=True)
        V.number("lm_lr", p["lm_lr"], 0.0, 1.0, lo_open=True)
        self.p, self.baseline = p, clf
        self.work = {"lm": L.workload("lm", "tiny", p["batch_size"], p["seq_len"],
                                      n_train=p["n_train"], n_eval=min(p["n_eval"], 256),
                                      seed=p["seed"]),
                     "nli": clf.workload}

    @staticmethod
    def config_of(p: dict, steps: int, structure=None, sparsity=None, method=None,
                  l1_lambda=None) -> S.SparsityConfig:
        """The validated config for the notebook's knobs ``p`` (a bad structure, sparsity,
        method, N:M pattern or block fails here, naming the knob), before any training."""
        V.choice("workload", p["workload"], TASKS)
        structure = structure or p["structure"]
        return L.sparsity_config(steps, p["sparsity"] if sparsity is None else sparsity,
                                 structure, method_for(structure, method or p["method"]),
                                 p["l1_lambda"] if l1_lambda is None else l1_lambda,
                                 n=p["n"], m=p["m"], block=p["block"], scope=p["scope"])

    def config(self, steps: int, structure=None, sparsity=None, method=None,
               l1_lambda=None) -> S.SparsityConfig:
        """:meth:`config_of` this lab's knobs."""
        return self.config_of(self.p, steps, structure, sparsity, method, l1_lambda)

    def run(self, task: str, config, steps: int, board=None, label: str = "") -> dict:
        """LM: a fresh model trained for ``steps`` (dense, or pruned by ``config``). NLI:
        the trained baseline (``config=None``) or a pruned copy fine-tuned ``steps``."""
        p = self.p
        if task == "nli":
            return L.prune_from(self.work[task], self.baseline.model, config, steps,
                                p["finetune_lr"], p["eval_every"], p["seed"], board, label)
        return L.train_one(self.work[task], config, steps, p["lm_lr"], p["eval_every"],
                           p["seed"], board, label)

    def settings(self, structure, sparsity, method, l1_lambda, workload, live) -> tuple:
        """Section 1 (and its widget): dense and your pruned run on ``workload``, curves on
        a board of loss, sparsity (and accuracy). Returns (config, dense run, pruned run)."""
        cfg = self.config(self.p["steps"], structure, sparsity, method, l1_lambda)
        V.choice("workload", workload, TASKS)
        board = _board(workload, f"{workload}: {cfg.method} {cfg.label}", live)
        dense = self.run(workload, None, self.p["steps"], board, "dense")
        run = self.run(workload, cfg, self.p["steps"], board, f"{cfg.method} {cfg.label}")
        if not board.live:
            board.show()
        return cfg, dense, run

    def compare_methods(self, live: bool = False) -> list[dict]:
        """Dense and every method valid for the structure, same seed, batches and steps;
        one board per task (LM and NLI losses differ in scale: never one axis)."""
        rows, steps = [], self.p["method_steps"]
        for t in TASKS:
            board = _board(t, f"{t}: methods at {self.config(steps).label}", live)
            for meth in [None, *S.METHODS]:
                if meth == "gradual" and self.p["structure"] == "nm":
                    continue  # N:M has one fixed sparsity: nothing to schedule
                c = None if meth is None else self.config(steps, method=meth)
                o = self.run(t, c, steps, board, meth or "dense")
                rows.append({"task": t, "method": meth or "dense",
                             "label": "dense" if c is None else f"{meth} {c.label}",
                             "eval_loss": o["final"]["loss"],
                             "accuracy": o["final"].get("accuracy"),
                             "actual_sparsity": o["sparsity"],
                             "warnings": o.get("warnings", "")})
            if not board.live:
                board.show()
        return rows

    def verdict(self, rows: list[dict]) -> list[dict]:
        """Did gradual / L1 beat one-shot magnitude (lower eval loss)? With the NLI
        accuracy change vs dense and its binomial standard error sqrt(p(1-p)/n)."""
        n_eval = self.n_eval
        out = []
        for t in TASKS:
            by = {r["method"]: r for r in rows if r["task"] == t}
            for meth in ("gradual", "l1"):
                if meth not in by or "magnitude" not in by:
                    continue
                r, one = by[meth], by["magnitude"]
                acc = r["accuracy"]
                out.append({"task": t, "method": meth,
                            "eval loss vs one-shot": r["eval_loss"] - one["eval_loss"],
                            "accuracy vs dense": (acc - by["dense"]["accuracy"])
                            if t == "nli" else None,
                            "accuracy s.e.": C.binomial_se(acc, n_eval)
                            if t == "nli" else None,
                            "beats one-shot (lower eval loss)":
                            bool(r["eval_loss"] < one["eval_loss"])})
        return out

    @property
    def n_eval(self) -> int:
        """Examples in the NLI eval set (a dict of tensors, or trimmed batches)."""
        ev = self.work["nli"].eval_set
        return len(ev["labels"]) if isinstance(ev, dict) else sum(len(b["labels"]) for b in ev)

    def curves(self, structures, sparsities, board=None):
        """The survey's loss curves (see :func:`labkit.labs.sparsity.curve_study`)."""
        p = self.p
        return L.curve_study(self.work["lm"], structures, sorted(sparsities), p["curve_steps"],
                             p["lm_lr"], max(1, min(p["eval_every"], p["curve_steps"] // 3)),
                             p["seed"], block=p["block"], board=board)

    def claimed_vs_measured(self, run: dict, config, task: str,
                            dense: dict | None = None) -> tuple[list, list, dict]:
        """``expected`` next to the counted non-zeros, then ``accelerate`` on the task's
        sample, and (NLI) the accuracy cost against ``dense`` next to speed and bytes:
        (claim rows, accelerate rows, numbers for the metrics)."""
        model = run["model"]
        claim = expected(model.cfg, config)["detail"]
        nonzero = sum(int(x.weight.detach().count_nonzero())
                      for x in S.masked_linears(model).values())
        sample = self.work[task].sample
        with torch.no_grad():
            ref = model(*sample)
        rounds = self.p["accel_rounds"]
        acc = S.accelerate(model, *sample, rounds=rounds, min_run_time=0.01,
                           verify_rounds=max(2, rounds))
        with torch.no_grad():
            err = float((model(*sample) - ref).abs().max())
        whole = A.summary(acc)
        table = [
            {"quantity": "MLP/attn weights pruned (non-zero)",
             "claimed": claim["weights_nonzero"], "measured": nonzero},
            {"quantity": "sparsity", "claimed": claim["sparsity"], "measured": run["sparsity"]},
            {"quantity": "weight bytes in the structure's format",
             "claimed": claim.get("bytes_sparse"), "measured": None},
            {"quantity": "dense fp32 bytes of those weights", "claimed": claim["bytes_dense"],
             "measured": None},
            {"quantity": "model bytes after accelerate (all tensors)", "claimed": None,
             "measured": measure.model_bytes(model)["total"]},
            {"quantity": "speedup of the model after accelerate vs dense kernels (whole "
                         "model; 1 when reverted: it runs the dense kernels)",
             "claimed": None, "measured": whole["speedup"]},
            {"quantity": "speedup the per-layer choice was measured at (whole model)",
             "claimed": None, "measured": whole.get("choice_speedup")},
            {"quantity": "reverted to dense (the choice was slower)", "claimed": None,
             "measured": whole["reverted"]},
            {"quantity": "max |output change| after accelerate", "claimed": 0.0,
             "measured": err}]
        if dense is not None and "accuracy" in run["final"]:
            table.append({"quantity": f"eval accuracy cost vs dense ({self.baseline.backbone}"
                          f" {dense['final']['accuracy']:.3f}, s.e. "
                          f"{C.binomial_se(dense['final']['accuracy'], self.n_eval):.3f})",
                          "claimed": None,
                          "measured": dense["final"]["accuracy"] - run["final"]["accuracy"]})
        nums = {"claimed_nonzero": claim["weights_nonzero"], "counted_nonzero": nonzero,
                "accelerate_speedup": whole["speedup"], "accelerate_reverted": whole["reverted"],
                "accelerate_choice_speedup": whole.get("choice_speedup"),
                "accelerate_max_err": err, "paths": S.chosen_paths(acc)}
        return table, acc, nums

    def metrics(self, my_cfg, dense_run, my_run, method_rows, summary, claim) -> dict:
        """The headline numbers notebook 04 writes (tests and the report read them)."""
        m = {"my_eval_loss": my_run["final"]["loss"],
             "my_dense_eval_loss": dense_run["final"]["loss"],
             "my_actual_sparsity": my_run["sparsity"],
             "my_target_sparsity": my_cfg.target_sparsity, "my_method": my_cfg.method,
             "my_label": my_cfg.label,
             **{k: v for k, v in claim.items() if k != "paths"},
             "n_layers_accelerated": len(claim["paths"]),
             "nli_baseline_steps": self.baseline.steps,
             "nli_baseline_cached": self.baseline.cached,
             "nli_baseline_accuracy": float(self.baseline.metrics["accuracy"]),
             "nli_backbone": self.baseline.backbone,
             "nli_vocab": self.baseline.model.cfg.vocab_size}
        dense_acc = {r["task"]: r["accuracy"] for r in method_rows if r["method"] == "dense"}
        for r in method_rows:
            m[f"{r['task']}_{r['method']}_eval_loss"] = float(r["eval_loss"])
            m[f"{r['task']}_{r['method']}_sparsity"] = float(r["actual_sparsity"])
            if r["task"] == "nli":
                m[f"nli_{r['method']}_accuracy"] = float(r["accuracy"])
                m[f"nli_{r['method']}_accuracy_cost"] = float(dense_acc["nli"] - r["accuracy"])
        m.update({f"curve_{r['run']}_eval_loss": r["eval_loss"] for r in summary})
        return m


def curve_figure(curves: list[dict], sparsities, structures):
    """One panel per sparsity: eval loss against step, a colour per structure, dense and
    small-dense dotted."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    spars = sorted(sparsities)
    fig = make_subplots(rows=1, cols=max(1, len(spars)),
                        subplot_titles=[f"MLP sparsity {s:.0%}" for s in spars])
    for i, s in enumerate(spars, start=1):
        runs: dict = {}
        for r in curves:
            if r["target"] == s or r["structure"] == "dense":
                runs.setdefault(r["run"], []).append(r)
        for name, pts in runs.items():
            st = pts[0]["structure"]  # a colour and one legend entry per structure
            fig.add_trace(go.Scatter(
                x=[q["step"] for q in pts], y=[q["eval_loss"] for q in pts], name=st,
                hovertext=name, mode="lines", legendgroup=st, showlegend=i == 1,
                line={"color": F.color(st),
                      "dash": "dot" if st in ("dense", "small-dense") else None}), 1, i)
    fig.update_yaxes(title_text="eval loss", row=1, col=1).update_xaxes(title_text="step")
    return F.layout(fig)


__all__ = ["AUTO", "HEADLINE", "MLP_STRUCTURES", "TASKS", "PruningLab", "curve_figure",
           "method_for"]
