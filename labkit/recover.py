"""Recovery: fine-tune a compressed model by distilling it from the dense model it came from.

Published compression results are never one-shot. Magnitude and movement pruning and the
Optimal BERT Surgeon prune, then fine-tune with knowledge distillation (Sanh, Wolf, Rush,
*Movement Pruning: Adaptive Sparsity by Fine-Tuning*, 2020; Kurtic et al., *The Optimal BERT
Surgeon*, 2022); Q8BERT trains INT8 with fake quantization and the straight-through
estimator (Zafrir et al., *Q8BERT: Quantized 8Bit BERT*, 2019); CQIL recovers with LoRA and
distillation. :func:`recover` is that step for every labkit technique, one call.

The loss (Hinton, Vinyals, Dean, *Distilling the Knowledge in a Neural Network*, 2015), for
student logits ``s``, teacher logits ``t``, labels ``y`` and temperature ``T``::

    L = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)
        [+ hidden * MSE(h_s, h_t)]            (final hidden states, when asked for)

``T^2`` keeps the soft-target gradients on the scale of the hard-label ones. An early-exit
model's internal classifiers get the same loss, weighted as Shallow-Deep Networks weight
them (:func:`labkit.techniques.early_exit.sdn_weights`).

What keeps each technique's constraint while it trains: nothing here, by design. Masks are
``torch.nn.utils.parametrize`` parametrizations (``W * M``: a pruned weight's gradient is
zero and it stays pruned), fake quantization is a parametrization with a straight-through
gradient (so recovery of a fake-quantized model *is* quantization-aware training, per-layer
bits included), removed blocks are skipped by the model's executor, compacted modules are
smaller, LoRA freezes its base. Only parameters with ``requires_grad`` train. What cannot
train is refused: a model already on accelerated kernels (packed INT8, CSR/BSR, baked dense
copies) must be recovered before :mod:`labkit.accelerate` places those kernels.
Gradual pruning during recovery: pass the sparsity config (``method="gradual"``) as
``prune=``; its cubic schedule runs over the recovery steps.

Cost: one student forward + backward per step, plus one teacher forward per batch, which
a :class:`TeacherCache` computes once per batch and serves to every later recovery on the
same batches (the planner recovers many candidates from one teacher).
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import train as T
from . import validate as V


@dataclass(frozen=True)
class RecoverConfig:
    """How a compressed model is fine-tuned from its teacher.

    ``steps`` of ``batch`` rows drawn from the workload's training rows (seed ``seed``), AdamW
    at ``lr`` with ``warmup`` (a fraction of the steps) of linear warm-up then linear decay,
    ``weight_decay`` on weights (not biases and norms). ``alpha`` weighs distillation against
    the task loss (1: distillation only), ``temperature`` softens both distributions,
    ``hidden`` weighs an MSE between the final hidden states (0: off).
    ``freeze_embeddings`` keeps the word embeddings fixed (as labkit's BERT fine-tuning does:
    with a few thousand rows they barely move, and their update costs a quarter of a step).
    """

    steps: int = 200
    lr: float = 1e-4
    alpha: float = 0.5
    temperature: float = 2.0
    hidden: float = 0.0
    warmup: float = 0.1
    weight_decay: float = 0.01
    freeze_embeddings: bool = True
    seed: int = 0

    def __post_init__(self):
        V.integer("steps", self.steps, 0)
        V.number("lr", self.lr, 0.0, 1.0, lo_open=True)
        V.number("alpha", self.alpha, 0.0, 1.0)
        V.number("temperature", self.temperature, 0.0, 100.0, lo_open=True)
        V.number("hidden", self.hidden, 0.0)
        V.number("warmup", self.warmup, 0.0, 1.0)
        V.number("weight_decay", self.weight_decay, 0.0, 1.0)
        V.integer("seed", self.seed, 0)


def _checksum(ids: torch.Tensor) -> str:
    return hashlib.blake2b(ids.contiguous().numpy().tobytes(), digest_size=8).hexdigest()


class TeacherCache:
    """The teacher's outputs per batch of a seeded batch stream, computed once.

    Keyed by ``(seed, step)``; each entry keeps a checksum of the batch's ids, so a
    different stream under the same key is recomputed (and counted in ``misses``), never
    served stale. ``max_bytes`` caps what is kept (hidden states are large)."""

    def __init__(self, teacher: nn.Module, max_bytes: int = 2 << 30):
        self.teacher = teacher
        self.max_bytes = V.integer("max_bytes", max_bytes, 0)
        self.store: dict = {}
        self.bytes = self.hits = self.misses = 0

    def __call__(self, key, batch: dict, hidden: bool) -> tuple:
        sum_ = _checksum(batch["input_ids"])
        got = self.store.get(key)
        if got is not None and got[0] == sum_ and (got[2] is not None or not hidden):
            self.hits += 1
            return got[1], got[2]
        self.misses += 1
        logits, h = teacher_outputs(self.teacher, batch, hidden)
        size = logits.numel() * 4 + (h.numel() * 4 if h is not None else 0)
        if self.bytes + size <= self.max_bytes:
            self.store[key] = (sum_, logits, h)
            self.bytes += size
        return logits, h


def _forward_args(batch: dict) -> tuple:
    return batch["input_ids"], batch.get("padding_mask"), batch.get("token_type_ids")


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, batch: dict, hidden: bool = False) -> tuple:
    """``(logits, final hidden states or None)`` of the teacher on ``batch``, in eval mode."""
    was = teacher.training
    teacher.eval()
    try:
        if hidden:
            h = teacher.features(*_forward_args(batch))
            logits = teacher.logits(h)
            return logits.float(), h.float()
        return teacher(*_forward_args(batch)).float(), None
    finally:
        teacher.train(was)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """``T^2 KL(softmax(t/T) || softmax(s/T))``, averaged over predictions (rows for a
    classifier, tokens for a language model: the last dimension holds the classes)."""
    c = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, c).float() / temperature, -1)
    t = F.log_softmax(teacher_logits.reshape(-1, c).float() / temperature, -1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def task_loss(model, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if model.cfg.kind == "encoder":
        return F.cross_entropy(logits, labels)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


class DistillStep(T.StepStrategy):
    """The step of :func:`recover`: distillation plus task loss (see the module docstring);
    the teacher's outputs come from ``cache`` keyed by ``(seed, step)``."""

    def __init__(self, config: RecoverConfig, cache: TeacherCache):
        self.config, self.cache = config, cache
        self.parts: dict[str, float] = {}

    def loss(self, model, batch, state):
        c = self.config
        want_hidden = c.hidden > 0
        zt, ht = self.cache((c.seed, state.step), batch, want_hidden)
        if want_hidden:
            hs = model.features(*_forward_args(batch))
            zs = model.logits(hs)
        else:
            zs = model(*_forward_args(batch))
        y = batch["labels"]
        kd, ce = kd_loss(zs, zt, c.temperature), task_loss(model, zs, y)
        total = c.alpha * kd + (1.0 - c.alpha) * ce
        if want_hidden:
            total = total + c.hidden * F.mse_loss(hs.float(), ht)
        exits = _exit_losses(model, zt, y, c, state.step)
        if exits is not None:
            total = total + exits
        self.parts = {"kd": float(kd.detach()), "ce": float(ce.detach())}
        return total


def _exit_losses(model, zt, y, c: RecoverConfig, step: int):
    """Shallow-Deep Networks' weighted internal-classifier losses, each distilled like the
    final head, when the model has an early-exit executor."""
    ex = getattr(model, "executor", None)
    internal = getattr(ex, "internal", None)
    if not internal:
        return None
    from .techniques.early_exit import sdn_weights

    w = sdn_weights(ex.exits, ex.n_layers, step / max(1, c.steps))
    return sum(wk * (c.alpha * kd_loss(z, zt, c.temperature)
                     + (1.0 - c.alpha) * task_loss(model, z, y)) for wk, z in zip(w, internal))


@dataclass
class RecoverResult:
    """What one recovery did: its training history, steps and seconds, the teacher cache's
    hits and misses in this run, and the metrics before and after on ``eval_set``."""

    train: T.TrainResult | None
    steps: int
    seconds: float
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    teacher_hits: int = 0
    teacher_misses: int = 0
    trainable: int = 0

    def row(self) -> dict:
        return {"recover_steps": self.steps, "recover_seconds": self.seconds,
                "trainable_params": self.trainable, "teacher_hits": self.teacher_hits,
                "teacher_misses": self.teacher_misses,
                **{f"before_{k}": v for k, v in self.before.items()},
                **{f"after_{k}": v for k, v in self.after.items()}}


def check_teacher(model: nn.Module, teacher: nn.Module) -> None:
    """The teacher must predict what the student predicts: same kind, vocabulary and
    labels (its logits are the student's targets)."""
    s, t = getattr(model, "cfg", None), getattr(teacher, "cfg", None)
    if s is None or t is None:
        raise V.LabkitConfigError("teacher", type(teacher).__name__,
                                  "a labkit Transformer, like the model being recovered")
    for name in ("kind", "vocab_size", "num_labels"):
        if getattr(s, name) != getattr(t, name):
            raise V.LabkitConfigError(
                "teacher", f"{name}={getattr(t, name)}",
                f"a teacher with the student's {name}={getattr(s, name)} (its logits are the "
                "student's targets)")


def frozen_paths(model: nn.Module) -> list[str]:
    """Names of modules on an accelerated kernel path, which training cannot update."""
    from .kernels.base import DenseLinear, SparseLinearBase
    from .techniques.int8 import AcceleratedLinear

    frozen = (SparseLinearBase, DenseLinear, AcceleratedLinear)
    out = [n for n, m in model.named_modules() if isinstance(m, frozen)]
    out += [n for n, p in model.named_parameters()
            if type(p) is not nn.Parameter and type(p.data) is not torch.Tensor]
    return out


def _optimizer(model, c: RecoverConfig):
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise V.LabkitConfigError("model", type(model).__name__,
                                  "a model with trainable parameters (every one is frozen)")
    no_decay = [p for n, p in params if n.endswith("bias") or "norm" in n]
    ids = {id(p) for p in no_decay}
    decay = [p for _, p in params if id(p) not in ids]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=c.lr)
    return opt, sum(p.numel() for _, p in params)


def recover(model: nn.Module, teacher: nn.Module, workload, config: RecoverConfig = RecoverConfig(),
            *, cache: TeacherCache | None = None, prune=None, eval_set=None,
            callbacks=(), progress: bool = False) -> RecoverResult:
    """Fine-tune ``model`` in place for ``config.steps`` steps of ``workload``'s training
    batches (``workload.make_batches(config.seed)``), distilled from ``teacher``.

    ``cache``: a :class:`TeacherCache` of ``teacher`` shared across recoveries (one is made
    otherwise); ``prune``: a gradual :class:`~labkit.techniques.sparsity.SparsityConfig`
    whose schedule runs during recovery (the model must already carry its masks, i.e. the
    config was applied); ``eval_set``: metrics before and after (default: none measured).
    Returns a :class:`RecoverResult`; the model is left in eval mode."""
    if not isinstance(config, RecoverConfig):
        raise V.LabkitConfigError("config", type(config).__name__, "a labkit RecoverConfig")
    check_teacher(model, teacher)
    if cache is None:
        cache = TeacherCache(teacher)
    elif cache.teacher is not teacher:
        raise V.LabkitConfigError("cache", "a TeacherCache of another teacher",
                                  "a cache made for this teacher (TeacherCache(teacher))")
    frozen = frozen_paths(model)
    if frozen:
        raise V.LabkitConfigError(
            "model", f"{frozen[0]} is on an accelerated kernel path",
            "a model in its simulate stage (masks, fake quantization, swapped modules): "
            "recover first, then accelerate")
    evaluate = (lambda: T.evaluate(model, eval_set)) if eval_set is not None else None
    before = evaluate() if evaluate else {}
    teacher.eval()
    if config.steps == 0:
        return RecoverResult(None, 0, 0.0, before, dict(before))
    embed = getattr(model, "embed", None)
    was_frozen = None
    if config.freeze_embeddings and embed is not None:
        was_frozen = not embed.weight.requires_grad
        embed.weight.requires_grad_(False)
    opt, trainable = _optimizer(model, config)
    from .baselines import WarmupLinear

    cbs = [WarmupLinear(opt, config.lr, config.steps, math.ceil(config.warmup * config.steps)),
           *_pruning_callbacks(model, prune), *callbacks]
    hits, misses = cache.hits, cache.misses
    start = time.perf_counter()
    try:
        res = T.fit(model, workload.make_batches(config.seed), config.steps, lr=config.lr,
                    callbacks=cbs, seed=config.seed, progress=progress, optimizer=opt,
                    strategy=DistillStep(config, cache))
    finally:
        if was_frozen is False:
            embed.weight.requires_grad_(True)
    seconds = time.perf_counter() - start
    after = evaluate() if evaluate else {}
    return RecoverResult(res, res.steps, seconds, before, after, cache.hits - hits,
                         cache.misses - misses, trainable)


def _pruning_callbacks(model, prune) -> list:
    if prune is None:
        return []
    from .techniques.pruning import GradualPruning
    from .techniques.sparsity import SparsityConfig, masked_linears

    if not isinstance(prune, SparsityConfig) or prune.method != "gradual":
        raise V.LabkitConfigError("prune", prune, "a SparsityConfig with method='gradual' "
                                  "(its cubic schedule runs during recovery)")
    if not masked_linears(model):
        raise V.LabkitConfigError("prune", prune.label, "a config already applied to the "
                                  "model (apply_(model, config) attaches the masks)")
    return [GradualPruning(model, prune)]


__all__ = ["DistillStep", "RecoverConfig", "RecoverResult", "TeacherCache", "check_teacher",
           "frozen_paths", "kd_loss", "recover", "teacher_outputs"]
