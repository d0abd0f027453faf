"""The planner: the fastest (or smallest) model within an accuracy budget, measured here.

A user's question is not "what does 50% neuron pruning cost?" but "how much faster and
smaller can my model get, on my machine, for at most a point of accuracy?". The answer
depends on stacking techniques (blocks dropped, FFN neurons and heads removed, low-rank
FFNs, INT8 kernels), on how much accuracy recovery fine-tuning wins back, and on which
kernels are fast on this CPU. :func:`plan` searches that stack.

Search: successive halving (Jamieson & Talwalkar, *Non-stochastic Best Arm Identification
and Hyperparameter Optimization*, AISTATS 2016) with the accuracy budget as a constraint.
Each candidate is a stack of technique configs; training budget is what is halved:

* rung 0 (the screen): every single technique at every level, one-shot (no training):
  accuracy on the dev rows, latency measured paired with dense, bytes counted. Then stacks
  of the singles that looked recoverable, predicted first (their one-shot drops add, their
  speed-ups multiply) and the most promising measured the same way;
* rungs 1..R: the best ``keep`` candidates are recovered (:func:`labkit.recover.recover`,
  distillation from the dense model) for ``recover_steps * eta^(r-1)`` more steps and
  measured again; after each rung the best ``1/eta`` by the objective among those within
  ``budget + slack_r`` stay. The slack shrinks to 0 at the last rung, because one-shot
  accuracy understates what recovery wins back. The best candidate of every single
  technique that is still within its rung's slack is kept too, so the final comparison
  with the best single technique is made on recovered models.

Why successive halving: recovery is the expensive step (a forward and backward of the
student and a teacher forward per step); one-shot screening is cheap and ranks most of
what will never meet the budget out; halving spends the remaining time on the few that
might, and the search time (``search_minutes``) bounds how many survive each rung.

Honesty: candidates are chosen on ``workload.dev_set``, rows held out of training (never
the eval split); the final table reports the eval split once, with the binomial standard
error and the paired difference to dense (McNemar's exact test,
:mod:`labkit.accuracy`). Latency is paired with the dense model in the same rotated rounds
(:func:`labkit.measure.paired`) at the workload's timed batch; the reference is the dense
model as shipped (fp32 eager). Every candidate tried is a row, written to ``log`` as it is
measured (an interrupted search keeps them), with why it was dropped.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from . import accuracy as ACC
from . import measure
from . import validate as V
from .recover import RecoverConfig, TeacherCache, check_teacher, recover
from .techniques import (
    EarlyExitConfig,
    FactorizedFFNConfig,
    LayerPruneConfig,
    LowRankAttentionConfig,
    SparsityConfig,
    apply_,
    expected,
)
from .techniques import int8 as I8
from .techniques import sparsity as S
from .techniques.embedding_int8 import EmbeddingInt8Config
from .techniques.importance import calibration_batches

OBJECTIVES = ("latency", "bytes")
FAMILIES = ("blocks", "neurons", "heads", "rank", "attention", "exits", "embeddings", "int8",
            "static_int8")
DEFAULT_FAMILIES = ("blocks", "neurons", "heads", "exits", "embeddings", "int8")
# families that act on the same modules: never stacked together
EXCLUSIVE = ({"neurons", "rank"}, {"heads", "attention"}, {"int8", "static_int8"},
             {"exits", "static_int8"})  # a compiled graph has no per-sample exits
# the order a stack is applied in: blocks go first (the others act on what is left)
ORDER = ("blocks", "rank", "attention", "heads", "neurons", "exits", "embeddings", "int8",
         "static_int8")
# the dense reference runs on its fastest fp32 kernels, chosen by the same autotuner, so a
# candidate's speed-up is never a better fp32 GEMM taken for compression
REFERENCE_CANDIDATES = ("fp32", "fp32_onednn")
SCREEN_SHARE = 0.5  # at most this share of the search time goes to the one-shot screen


@dataclass(frozen=True)
class PlanConfig:
    """What the planner searches for and how long.

    ``budget``: accuracy points (of 100) the choice may lose against dense on the dev rows;
    ``objective``: ``"latency"`` (measured speed-up) or ``"bytes"`` (model bytes);
    ``search_minutes``: the search's time budget (the final measurement comes on top);
    ``families``: technique families to stack (:data:`FAMILIES`); ``rungs``, ``keep``,
    ``eta``, ``recover_steps``, ``recover_lr``: successive halving's shape; ``slack``:
    points beyond the budget a one-shot candidate may be and still be recovered;
    ``stacks``: stacks measured in the screen; ``calibration_rows``: training rows the
    activation-aware techniques calibrate on; ``rounds``/``min_run_time``: paired timing at
    ``threads`` intra-op threads (the deployment's); ``eval_threads``: threads for
    accuracy and training, which are not timed (0: every core)."""

    budget: float = 1.0
    objective: str = "latency"
    search_minutes: float = 10.0
    families: tuple = DEFAULT_FAMILIES
    rungs: int = 2
    keep: int = 6
    eta: int = 2
    recover_steps: int = 100
    recover_lr: float = 1e-4
    slack: float = 15.0
    stacks: int = 8
    calibration_rows: int = 256
    rounds: int = 3
    min_run_time: float = 0.1
    threads: int = 1
    eval_threads: int = 0
    seed: int = 0

    def __post_init__(self):
        V.number("budget", self.budget, 0.0, 50.0)
        V.choice("objective", self.objective, OBJECTIVES)
        V.number("search_minutes", self.search_minutes, 0.0, 24 * 60, lo_open=True)
        fams = tuple(self.families.replace(" ", "").split(",")) if isinstance(
            self.families, str) else tuple(self.families)
        if not fams or len(set(fams)) != len(fams):
            raise V.LabkitConfigError("families", self.families,
                                      "distinct names from " + ", ".join(FAMILIES))
        for f in fams:
            V.choice("families", f, FAMILIES)
        object.__setattr__(self, "families", fams)
        V.integer("rungs", self.rungs, 0, 6)
        V.integer("keep", self.keep, 1, 64)
        V.integer("eta", self.eta, 2, 8)
        V.integer("recover_steps", self.recover_steps, 1)
        V.number("recover_lr", self.recover_lr, 0.0, 1.0, lo_open=True)
        V.number("slack", self.slack, 0.0, 100.0)
        V.integer("stacks", self.stacks, 0, 256)
        V.integer("calibration_rows", self.calibration_rows, 1)
        V.integer("rounds", self.rounds, 1, 100)
        V.number("min_run_time", self.min_run_time, 0.0, 60.0, lo_open=True)
        V.integer("threads", self.threads, 1, 256)
        V.integer("eval_threads", self.eval_threads, 0, 256)
        V.integer("seed", self.seed, 0)


@dataclass(frozen=True)
class Candidate:
    """A stack: ``steps`` ``(family, label, technique config or None)`` in :data:`ORDER`;
    ``int8`` is the accelerate step's INT8 (a per-site autotune over labkit's paths)."""

    steps: tuple

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(f for f, _, _ in self.steps)

    @property
    def configs(self) -> list:
        return [c for _, _, c in self.steps if c is not None]

    @property
    def int8(self) -> bool:
        return "int8" in self.families

    @property
    def static_int8(self) -> bool:
        return "static_int8" in self.families

    @property
    def name(self) -> str:
        return " + ".join(label for _, label, _ in self.steps) or "dense"

    def stacked(self, other: Candidate) -> Candidate:
        steps = sorted(self.steps + other.steps, key=lambda s: ORDER.index(s[0]))
        return Candidate(tuple(steps))


def levels(model_cfg, family: str) -> list[Candidate]:
    """The single-technique candidates of ``family`` on a model of ``model_cfg``."""
    L, H = model_cfg.n_layers, model_cfg.n_heads
    out = []
    if family == "blocks":  # drop the top blocks: what stays is the pretrained bottom
        out = [("blocks", f"drop top {k} of {L} blocks", LayerPruneConfig(keep=tuple(range(L - k))))
               for k in range(1, max(1, L // 2) + 1) if L - k >= 1]
    elif family == "neurons":
        out = [("neurons", f"FFN neurons -{s:.0%}", SparsityConfig(
            sparsity=s, structure="neuron", parts=("ffn",), score="activation",
            compensate=model_cfg.kind == "encoder")) for s in (0.25, 0.5, 0.7)]
    elif family == "heads":
        fracs = sorted({k / H for k in range(1, H) if k / H in (0.25, 0.5) or
                        (H < 4 and k == 1)})
        out = [("heads", f"heads -{s:.0%}", SparsityConfig(
            sparsity=s, structure="head", parts=("attn",), score="activation",
            compensate=model_cfg.kind == "encoder")) for s in fracs]
    elif family == "rank":
        from .techniques.factorized_ffn import break_even_rank

        be = break_even_rank(model_cfg.d_model, model_cfg.d_ff)
        out = [("rank", f"FFN rank {r}", FactorizedFFNConfig(rank=r, init="svd"))
               for r in sorted({max(1, round(be * f)) for f in (0.5, 0.3)}, reverse=True)]
    elif family == "attention":
        k = max(4, model_cfg.max_len // 4)
        out = [("attention", f"Linformer k={k}", LowRankAttentionConfig(k=k))]
    elif family == "exits":  # the threshold is chosen on the dev rows (Planner.tune_exits)
        out = [("exits", "early exits", EarlyExitConfig(exits=None, q=1.0))]
    elif family == "embeddings":
        out = [("embeddings", "INT8 embeddings", EmbeddingInt8Config())]
    elif family == "int8":
        out = [("int8", "INT8 (per-layer autotuned)", None)]
    elif family == "static_int8":
        out = [("static_int8", "static INT8 (whole model, compiled)", None)]
    else:
        V.choice("family", family, FAMILIES)
    return [Candidate((s,)) for s in out]


EXIT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)


def exit_threshold(logits, labels, exits, n_layers: int, floor: float, temps=None) -> float:
    """The threshold ``q`` of :data:`EXIT_THRESHOLDS` that runs the fewest blocks while the
    accuracy of the exit rule on ``(logits (K+1, n, C), labels)`` stays at or above
    ``floor``; 1.0 (never exit) when none does."""
    from .techniques.early_exit import simulate

    best = (float(n_layers), 1.0)
    for q in EXIT_THRESHOLDS:
        r = simulate(logits, labels, q, exits, n_layers, temps)
        if r["accuracy"] >= floor and r["blocks"] < best[0]:
            best = (r["blocks"], q)
    return best[1]


def compatible(a: Candidate, b: Candidate) -> bool:
    fa, fb = set(a.families), set(b.families)
    if fa & fb:
        return False
    return not any(len((fa | fb) & ex) > 1 for ex in EXCLUSIVE)


# ------------------------------------------------------------------------ build and measure

def materialize(dense: nn.Module, cand: Candidate, calibration) -> nn.Module:
    """A copy of ``dense`` with the candidate's techniques applied (the simulate stage)."""
    m = copy.deepcopy(dense)
    for c in cand.configs:
        apply_(m, c, calibration=calibration if getattr(c, "needs_data", False) else None)
    return m.eval()


def accelerated(simulated: nn.Module, cand: Candidate, inputs: tuple, plans: dict,
                timer=None, calibration=None) -> tuple[nn.Module, list[list[dict]]]:
    """A copy on real kernels: masked structures compacted where that is faster
    (:func:`labkit.techniques.sparsity.accelerate`), then INT8 per layer
    (:func:`labkit.techniques.int8.accelerate_`) for an ``int8`` candidate. Returns the
    copy and the rows of each stage, in order (what :func:`labkit.save` replays)."""
    m = copy.deepcopy(simulated).eval()
    rows = []
    ex = getattr(m, "executor", None)
    if hasattr(ex, "exiting"):
        ex.exiting = True  # timed as it runs: samples leave at their exits
    if S.masked_linears(m):
        rows.append(S.accelerate(m, *inputs, paths=("compacted-dense",), timer=timer))
    if cand.int8:
        rows.append(I8.accelerate_(m, inputs, plans=plans, timer=timer))
    if cand.static_int8:  # the whole graph: exported, calibrated, compiled
        from .techniques.static_int8 import static_int8

        m = static_int8(m, [_static_args(m, b, len(inputs)) for b in calibration], inputs)
    return m, rows


def _static_args(model: nn.Module, batch: dict, n: int) -> tuple:
    """A calibration batch as the ``n`` positional inputs the model is timed (and
    exported) with (segment ids derived as the model derives them when the batch has none)."""
    ids = batch["input_ids"]
    tt = batch.get("token_type_ids")
    if n == 3 and tt is None:
        tt = model.token_types(ids)
    return (ids, batch.get("padding_mask"), tt)[:n]


def timed_inputs(model: nn.Module, workload) -> tuple:
    """The inputs every candidate is timed, and a compiled one exported, with: the
    workload's sample ``(ids, padding_mask)``, plus segment ids when the rows it is scored
    on carry them (a BERT-style model given ``token_type_ids``), so a graph exported from
    these inputs takes the evaluation's batches as they are."""
    ids, mask = workload.sample[:2]
    dev = workload.dev_set
    first = dev[0] if isinstance(dev, list) else dev
    if getattr(model, "token_type", None) is not None and "token_type_ids" in first:
        return (ids, mask, model.token_types(ids))
    return tuple(x for x in (ids, mask) if x is not None)


def reference(dense: nn.Module, inputs: tuple, plans: dict, timer=None,
              compiled: bool = False) -> nn.Module:
    """The dense model on its fastest fp32 kernels (per-site fp32 paths, autotuned; with
    ``compiled``, the whole graph compiled too when that is faster): what a candidate's
    speed-up is measured against."""
    m = copy.deepcopy(dense).eval()
    I8.accelerate_(m, inputs, candidates=REFERENCE_CANDIDATES, plans=plans, timer=timer)
    if not compiled:
        return m
    from .techniques.static_int8 import compiled_fp32

    c = compiled_fp32(dense, inputs)
    t = measure.paired({"eager": _runner(m, inputs), "compiled": _runner(c, inputs)},
                       "eager", 3, 0.1, timer)
    return c if t.ratio["compiled"] > 1.0 else m


def unavailable_families(families) -> dict[str, str]:
    """``{family: why}`` for the families this CPU / torch build cannot run (static INT8
    without VNNI/AMX or oneDNN): marked unavailable and not searched, never a crash after
    the screen has run, never a silent fallback."""
    out = {}
    if "static_int8" in families:
        from .techniques.static_int8 import unavailable

        why = unavailable()
        if why is not None:
            out["static_int8"] = why
    return out


def _runner(model, inputs):
    def run():
        with torch.inference_mode():
            model(*inputs)
    return run


def _flops_ratio(model_cfg, cand: Candidate, seq_len: int) -> float:
    try:
        return expected(model_cfg, *cand.configs, seq_len=seq_len)["flops_ratio"]
    except (TypeError, ValueError):
        return float("nan")


@dataclass
class Trial:
    """A candidate's state in the search: its simulate-stage model (recovered so far) and
    its latest measurement."""

    cand: Candidate
    model: nn.Module
    steps: int = 0
    row: dict = field(default_factory=dict)
    alive: bool = True
    exit_q: float | None = None
    accelerated: nn.Module | None = None  # the model its latest row measured
    acceleration: list = field(default_factory=list)


@dataclass
class PlanResult:
    """``rows``: every measurement (one per candidate per rung); ``front``: the Pareto
    front of the last measurement of each candidate (dev accuracy vs speed-up, and vs
    bytes); ``chosen``/``best_single``: the final rows (eval split, paired timing);
    ``model``: the chosen model on its kernels, ``simulated``: the same before
    acceleration (what :func:`labkit.save` stores) with ``acceleration`` its rows;
    ``metrics``: the headline numbers."""

    rows: list
    front: list
    chosen: dict
    best_single: dict | None
    final: list
    model: nn.Module
    simulated: nn.Module
    acceleration: list
    metrics: dict
    candidate: Candidate | None = None


def pareto(rows: list[dict], x: str, better_x: str = "max") -> list[dict]:
    """The rows no other row beats on both dev accuracy (higher) and ``x`` (``better_x``)."""
    sign = 1.0 if better_x == "max" else -1.0
    pts = [r for r in rows if r.get(x) is not None and r.get("dev_accuracy") is not None]
    front = []
    for r in pts:
        dominated = any(o is not r and o["dev_accuracy"] >= r["dev_accuracy"]
                        and sign * o[x] >= sign * r[x]
                        and (o["dev_accuracy"] > r["dev_accuracy"] or sign * o[x] > sign * r[x])
                        for o in pts)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: sign * r[x])


class _Log:
    """Rows appended to a JSON-lines file as they are measured (nothing lost on a crash)."""

    def __init__(self, path):
        self.path = path
        if path:
            from pathlib import Path

            p = Path(path)
            if p.exists():
                raise V.LabkitConfigError("log", str(path), "a file that does not exist yet "
                                          "(an earlier search's rows are never overwritten)")
            p.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict) -> None:
        if self.path:
            from .notebook import _clean

            with open(self.path, "a") as f:
                f.write(json.dumps(_clean(row)) + "\n")


class Planner:
    """One search (see the module docstring); :func:`plan` runs it."""

    def __init__(self, model, workload, config: PlanConfig, teacher=None, timer=None,
                 clock=time.perf_counter, on_row=None, log=None, progress=False):
        if not isinstance(config, PlanConfig):
            raise V.LabkitConfigError("config", type(config).__name__, "a labkit PlanConfig")
        if getattr(workload, "dev_set", None) is None:
            raise V.LabkitConfigError(
                "workload.dev_set", None, "rows held out of training to choose on (e.g. "
                "labkit.classifiers.classifier(..., holdout=0.1)); the eval split is only "
                "reported on, never chosen on")
        if getattr(model, "cfg", None) is None or model.cfg.kind != "encoder":
            raise V.LabkitConfigError("model", type(model).__name__,
                                      "a labkit encoder classifier (Transformer, kind='encoder')")
        self.dense, self.work, self.c = model.eval(), workload, config
        self.teacher = (teacher or model).eval()
        check_teacher(model, self.teacher)
        self.unavailable = unavailable_families(config.families)
        self.cache = TeacherCache(self.teacher)
        self.timer, self.clock, self.on_row = timer, clock, on_row or (lambda r: None)
        self.log = _Log(log)
        for family, why in self.unavailable.items():  # said in the log, a warning, metrics
            self.log.write({"event": "family unavailable", "family": family, "why": why})
            warnings.warn(f"planner family {family!r} is unavailable here and is not "
                          f"searched: {why}", stacklevel=3)
        self.progress = progress
        self.inputs = timed_inputs(model, workload)
        self.plans: dict = {}
        self.calibration = calibration_batches(workload.make_batches(config.seed + 7919),
                                               config.calibration_rows)
        self.rows: list[dict] = []
        self.start = clock()
        self.dense_dev = ACC.correct(self.dense, workload.dev_set)
        self.dense_bytes = measure.model_bytes(self.dense)["total"]
        with measure.num_threads(config.threads):
            self.reference = reference(self.dense, self.inputs, self.plans, timer,
                                       compiled="static_int8" in config.families
                                       and "static_int8" not in self.unavailable)
        self.seq_len = int(self.inputs[0].shape[1])
        self.step_seconds = None  # measured on the first recovery, per unit of FLOPs
        self.exit_heads: dict = {}  # block -> exit head state trained on the dense backbone

    # --------------------------------------------------------------- measure one trial
    def elapsed(self) -> float:
        return self.clock() - self.start

    def measure(self, trial: Trial, rung: int, note: str = "") -> dict:
        with measure.num_threads(self.c.threads):  # kernels chosen and timed as deployed
            acc_model, accel_rows = accelerated(trial.model, trial.cand, self.inputs,
                                                self.plans, self.timer, self.calibration)
            t = measure.paired({"dense": _runner(self.reference, self.inputs),
                                "candidate": _runner(acc_model, self.inputs)}, "dense",
                               self.c.rounds, self.c.min_run_time, self.timer)
        trial.accelerated, trial.acceleration = acc_model, accel_rows
        right = ACC.correct(acc_model, self.work.dev_set)
        diff = ACC.paired(self.dense_dev, right)
        nbytes = measure.model_bytes(acc_model)["total"]
        row = {"candidate": trial.cand.name, "families": ",".join(trial.cand.families),
               "exit_q": trial.exit_q,
               "rung": rung, "recover_steps": trial.steps,
               "dev_accuracy": float(right.float().mean()),
               "dev_dense_accuracy": float(self.dense_dev.float().mean()),
               "dev_drop_points": -100 * diff["diff"], "dev_drop_se": 100 * diff["se"],
               "speedup": t.ratio["candidate"], "speedup_min": t.ratio_spread["candidate"][0],
               "speedup_max": t.ratio_spread["candidate"][1],
               "latency_ms": t.seconds["candidate"] * 1e3,
               "dense_latency_ms": t.seconds["dense"] * 1e3, "bytes": nbytes,
               "bytes_ratio": nbytes / self.dense_bytes,
               "flops_ratio_claimed": _flops_ratio(self.dense.cfg, trial.cand, self.seq_len),
               "kernel_paths": sorted(set(measure.kernel_paths(acc_model).values())),
               "reverted": any(r.get("reverted") for stage in accel_rows for r in stage),
               "status": "measured", "note": note, "seconds": self.elapsed()}
        trial.row = row
        self.rows.append(row)
        self.log.write(row)
        self.on_row(row)
        return row

    def objective(self, row: dict) -> float:
        """Higher is better: the speed-up, or the bytes saved (dense / candidate)."""
        return row["speedup"] if self.c.objective == "latency" else 1.0 / row["bytes_ratio"]

    def within(self, row: dict, slack: float) -> bool:
        return row["dev_drop_points"] <= self.c.budget + slack

    # --------------------------------------------------------------- the search
    def screen(self) -> list[Trial]:
        trials = []
        for f in self.c.families:
            if f in self.unavailable:
                continue
            for cand in levels(self.dense.cfg, f):  # built and measured one at a time
                t = self._trial(cand)
                self.measure(t, 0, "one-shot single technique")
                trials.append(t)
        stacks = self._stacks([t for t in trials if self.within(t.row, self.c.slack)])
        for i, cand in enumerate(stacks):
            if self.elapsed() > SCREEN_SHARE * self.c.search_minutes * 60:
                self.log.write({"event": "screen stopped", "unmeasured": [c.name for c in
                                                                          stacks[i:]]})
                break  # recovery needs the rest of the time
            t = self._trial(cand)
            self.measure(t, 0, "one-shot stack")
            trials.append(t)
        return trials

    def _trial(self, cand: Candidate) -> Trial:
        t = Trial(cand, materialize(self.dense, cand, self.calibration))
        if "exits" not in cand.families:
            return t
        ex = t.model.executor
        if self.exit_heads and all(b in self.exit_heads for b in ex.exits):
            for k, b in enumerate(ex.exits):  # heads trained on the dense backbone, reused
                ex.heads[k].load_state_dict(self.exit_heads[b])
            self.tune_exits(t)
        else:  # untrained exits say nothing: train them first
            self.train_exits(t)
            self.exit_heads = {b: copy.deepcopy(ex.heads[k].state_dict())
                               for k, b in enumerate(ex.exits)}
        return t

    def train_exits(self, trial: Trial) -> None:
        """Shallow-Deep Networks' first stage: the internal classifiers alone learn from the
        frozen backbone (distilled from the teacher) for ``recover_steps`` steps."""
        from .techniques.early_exit import freeze_backbone_

        m = trial.model
        trainable = {n for n, p in m.named_parameters() if p.requires_grad}
        freeze_backbone_(m)
        recover(m, self.teacher, self.work, RecoverConfig(
            steps=self.c.recover_steps, lr=max(self.c.recover_lr, 1e-3), seed=self.c.seed),
            cache=self.cache, progress=self.progress)
        for n, p in m.named_parameters():
            p.requires_grad_(n in trainable)
        trial.steps += self.c.recover_steps
        self.tune_exits(trial)

    def slack(self, rung: int) -> float:
        """Points beyond the budget a candidate may be after ``rung`` (0 at the last)."""
        return self.c.slack * (self.c.rungs - rung) / max(1, self.c.rungs)

    def tune_exits(self, trial: Trial, rung: int = 0) -> None:
        """The exit threshold ``q``: the one that runs the fewest blocks on the dev rows
        while the dev accuracy stays within the rung's budget (budget + slack) of dense, or
        costs at most ``budget`` on top of the candidate without exits when that is already
        beyond it (``q = 1``: never exit)."""
        from .techniques.early_exit import exit_logits

        m, ex = trial.model, trial.model.executor
        dev = self.work.dev_set
        parts = [exit_logits(m, b) for b in (dev if isinstance(dev, list) else [dev])]
        logits = torch.cat([p[0] for p in parts], 1)
        labels = torch.cat([p[1] for p in parts])
        dense = float(self.dense_dev.float().mean())
        no_exit = float((logits[-1].argmax(-1) == labels).float().mean())
        floor = min(dense - (self.c.budget + self.slack(rung)) / 100,
                    no_exit - self.c.budget / 100)
        ex.exiting = True  # evaluated and timed as it runs, and saved so
        ex.q = trial.exit_q = exit_threshold(logits, labels, ex.exits, ex.n_layers, floor,
                                             ex.temps())

    def _stacks(self, good: list[Trial]) -> list[Candidate]:
        """Stacks of recoverable singles, predicted (drops add, speed-ups or byte savings
        multiply) and the ``stacks`` best by prediction within the slack returned."""
        preds = {}
        frontier = [(t.cand, t.row["dev_drop_points"], self.objective(t.row)) for t in good]
        current = list(frontier)
        for _ in range(2):  # pairs, then triples
            nxt = []
            for cand, drop, obj in current:
                for single, d2, o2 in frontier:
                    if not compatible(cand, single):
                        continue
                    s = cand.stacked(single)
                    if s.name in preds:
                        continue
                    pd, po = drop + max(d2, 0.0), obj * o2
                    preds[s.name] = (s, pd, po)
                    nxt.append((s, pd, po))
            current = nxt
        ok = [p for p in preds.values() if p[1] <= self.c.budget + self.c.slack]
        ok.sort(key=lambda p: -p[2])
        return [p[0] for p in ok[: self.c.stacks]]

    def select(self, trials: list[Trial], rung: int, keep: int) -> list[Trial]:
        """The ``keep`` best by the objective within this rung's slack, plus the best of each
        single family within it; the others are dropped with the reason."""
        slack = self.slack(rung)
        live = [t for t in trials if t.alive]
        ok = sorted([t for t in live if self.within(t.row, slack)],
                    key=lambda t: -self.objective(t.row))
        chosen = ok[:keep]
        for fam in self.c.families:
            best = next((t for t in ok if t.cand.families == (fam,)), None)
            if best is not None and best not in chosen:
                chosen.append(best)
        for t in live:
            if t in chosen:
                continue
            t.alive = False
            why = (f"dropped after rung {rung}: " +
                   (f"{t.row['dev_drop_points']:.1f} points lost > budget {self.c.budget} + "
                    f"slack {slack:.1f}" if not self.within(t.row, slack) else
                    f"not among the {keep} best by {self.c.objective}"))
            t.row["status"] = why
            self.log.write({**t.row, "event": "dropped"})
        return chosen

    def recover(self, trial: Trial, steps: int, rung: int) -> None:
        if not any(p.requires_grad for p in trial.model.parameters()) or trial.cand.configs == []:
            return  # INT8 alone: nothing is simulated, so nothing to train
        cfg = RecoverConfig(steps=steps, lr=self.c.recover_lr, seed=self.c.seed + rung)
        res = recover(trial.model, self.teacher, self.work, cfg, cache=self.cache,
                      progress=self.progress)
        trial.steps += res.steps
        if "exits" in trial.cand.families:
            self.tune_exits(trial, rung)
        flops = trial.row.get("flops_ratio_claimed") or 1.0
        per = res.seconds / max(1, res.steps) * (flops if math.isfinite(flops) else 1.0)
        self.step_seconds = per if self.step_seconds is None else min(self.step_seconds, per)

    def affordable(self, trials: list[Trial], steps: int, final: bool = True) -> list[Trial]:
        """As many of ``trials`` (best first) as the time left allows for ``steps`` steps
        each; the first is always kept unless ``final`` is False (then none may overrun).
        A trial left out is not recovered further, but stays a candidate for the choice
        with its last measurement (it was measured: time running out is no verdict on it)."""
        if self.step_seconds is None:
            return trials
        left = self.c.search_minutes * 60 - self.elapsed()
        out, cost = [], 0.0
        for t in trials:
            flops = t.row.get("flops_ratio_claimed") or 1.0
            c = steps * self.step_seconds / (flops if math.isfinite(flops) and flops else 1.0)
            if (out or not final) and cost + c > left:
                t.row["status"] = ("not recovered further: the search time would run out "
                                   "(its last measurement stands)")
                self.log.write({**t.row, "event": "stopped"})
                continue
            out.append(t)
            cost += c
        return out

    def search(self) -> list[Trial]:
        trials = self.screen()
        survivors = self.select(trials, 0, self.c.keep)
        steps = self.c.recover_steps
        for rung in range(1, self.c.rungs + 1):
            if self.elapsed() >= self.c.search_minutes * 60:
                break
            recovered = []
            for t in self.affordable(survivors, steps):  # re-checked before each: the
                if self.affordable([t], steps, final=False):  # step time is measured now
                    self.recover(t, steps, rung)
                    self.measure(t, rung, f"recovered {t.steps} steps")
                    recovered.append(t)
            # judged at this rung's slack only if recovered in it; the others keep their row
            survivors = [t for t in recovered if t.alive]
            keep = max(1, math.ceil(len(survivors) / self.c.eta))
            survivors = self.select(survivors, rung, keep)
            steps *= self.c.eta
        return trials


def _best(trials, rule, budget):
    ok = [t for t in trials if t.alive and t.row and t.row["dev_drop_points"] <= budget]
    return max(ok, key=rule) if ok else None


def plan(model: nn.Module, workload, config: PlanConfig = PlanConfig(), *, teacher=None,
         log=None, timer=None, on_row=None, clock=time.perf_counter,
         progress: bool = False) -> PlanResult:
    """Search technique stacks of ``model`` (a trained dense encoder classifier) on
    ``workload`` (with ``dev_set``: rows held out of training) for the best
    ``config.objective`` within ``config.budget`` accuracy points; see the module docstring.

    ``teacher``: the model recovery distils from (default ``model``); ``log``: a JSON-lines
    path the rows are appended to as they are measured (must not exist); ``on_row(row)``:
    called with every row (live plots); ``timer``/``clock``: injectable timing (tests)."""
    if not isinstance(config, PlanConfig):
        raise V.LabkitConfigError("config", type(config).__name__, "a labkit PlanConfig")
    with measure.num_threads(config.eval_threads or os.cpu_count()):
        p = Planner(model, workload, config, teacher, timer, clock, on_row, log, progress)
        trials = p.search()
        search_seconds = p.elapsed()
        chosen = _best(trials, lambda t: p.objective(t.row), config.budget)
        singles = [t for t in trials if len(t.cand.steps) == 1]
        best_single = _best(singles, lambda t: p.objective(t.row), config.budget)
        return _final(p, chosen, best_single, trials, search_seconds)


def _final(p: Planner, chosen: Trial | None, single: Trial | None, trials, search_seconds):
    """Eval-split accuracy with its SE and the paired difference to dense, and latency of
    dense, the choice and the best single technique paired in the same rounds."""
    ev = p.work.eval_set
    dense_right = ACC.correct(p.dense, ev)
    models = {"dense": (p.reference, p.dense, [])}
    trial_of = {"dense": None, "chosen": chosen}
    if single is not None and single is not chosen:
        trial_of["best single"] = single
    for label, t in trial_of.items():
        if t is not None:  # the very models the search measured last
            models[label] = (t.accelerated, t.model, t.acceleration)
    with measure.num_threads(p.c.threads):
        timing = measure.paired({k: _runner(m, p.inputs) for k, (m, _, _) in models.items()},
                                "dense", max(p.c.rounds, 5), max(p.c.min_run_time, 0.2), p.timer)
    final = []
    for label, (m, _, _) in models.items():
        right = ACC.correct(m, ev)
        s, d = ACC.summary(right), ACC.paired(dense_right, right)
        t = trial_of.get(label)
        final.append({"model": label, "candidate": t.cand.name if t else "dense",
                      "eval_accuracy": s["accuracy"], "eval_se": s["se"], "eval_n": s["n"],
                      "drop_points": -100 * d["diff"], "drop_se_points": 100 * d["se"],
                      "mcnemar_p": d["mcnemar_p"], "speedup": timing.ratio[label],
                      "speedup_min": timing.ratio_spread[label][0],
                      "speedup_max": timing.ratio_spread[label][1],
                      "latency_ms": timing.seconds[label] * 1e3,
                      "bytes_ratio": measure.model_bytes(m)["total"] / p.dense_bytes,
                      "dev_drop_points": t.row["dev_drop_points"] if t else 0.0,
                      "recover_steps": t.steps if t else 0})
    by = {r["model"]: r for r in final}
    pick = by.get("chosen", by["dense"])
    single_row = by.get("best single", by.get("chosen") if single is chosen else None)
    if chosen is None:
        pick = {**by["dense"], "candidate": "dense (no candidate met the budget)"}
    last = {}
    for r in p.rows:
        last[r["candidate"]] = r
    front = pareto(list(last.values()), "speedup" if p.c.objective == "latency" else
                   "bytes_ratio", "max" if p.c.objective == "latency" else "min")
    model, simulated, accel = models.get("chosen", models["dense"])
    metrics = {"chosen_speedup": pick["speedup"],
               "best_single_speedup": single_row["speedup"] if single_row else None,
               "chosen_bytes_ratio": pick["bytes_ratio"],
               "chosen_accuracy_drop": pick["drop_points"],
               "dense_accuracy": by["dense"]["eval_accuracy"],
               "search_seconds": search_seconds, "candidates": len(last),
               "unavailable_families": p.unavailable}
    return PlanResult(p.rows, front, pick, single_row, final, model, simulated, accel or None,
                      metrics, chosen.cand if chosen else None)


__all__ = ["DEFAULT_FAMILIES", "FAMILIES", "OBJECTIVES", "Candidate", "PlanConfig",
           "PlanResult", "Planner", "compatible", "levels", "materialize", "pareto", "plan"]
