"""Fine-tuned baselines on real text: all-MiniLM-L6-v2 as a sentence-pair classifier.

The seed paper (architecture optimisation + sparsity + INT8 for LLMs, evaluated on MNLI and
QNLI against LayerDrop, Q-BERT and Shallow-Deep Networks) compresses *fine-tuned* BERTs. A
tiny encoder trained from scratch on a few thousand real pairs stays at chance, so on real
text labkit starts from a pretrained BERT inside its own :class:`~labkit.model.Transformer`
(:func:`labkit.pretrained.minilm_transformer`) and fine-tunes it as BERT is fine-tuned
(Devlin et al. 2019): ``[CLS] a [SEP] b [SEP]`` -> pooler -> linear head, cross-entropy,
AdamW with linear warm-up and linear decay of the learning rate, dropout 0.1.

Cost: one step is a forward and backward of the 6-layer, 384-wide model on a batch of
``B`` pairs of ``N`` tokens, about ``6 * 22M * B * N`` FLOPs; batches are trimmed to their
longest pair (:func:`labkit.pretrained.trim`). ``bf16=True`` runs forward and backward under
CPU bf16 autocast (AMX/AVX512-BF16 CPUs), weights and optimizer state stay fp32.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from . import data as D
from . import train as T
from . import validate as V


class WarmupLinear(T.Callback):
    """Linear warm-up over ``warmup`` steps to ``lr``, then linear decay to 0 at ``steps``."""

    all_ranks = True

    def __init__(self, optimizer, lr: float, steps: int, warmup: int):
        self.opt, self.lr, self.steps, self.warmup = optimizer, lr, steps, warmup
        self._set(1)

    def _set(self, step: int):
        if step <= self.warmup:
            f = step / max(1, self.warmup)
        else:
            f = max(0.0, (self.steps - step) / max(1, self.steps - self.warmup))
        for g in self.opt.param_groups:
            g["lr"] = self.lr * f

    def before_optimizer_step(self, state):
        self._set(state.step)


class AutocastStep(T.StepStrategy):
    """Forward and backward under CPU bf16 autocast (parameters and grads stay fp32)."""

    def loss(self, model, batch, state):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model.loss(batch).float()


def trimmed_batches(tensors: dict, batch_size: int, seed: int = 0, pool: int = 32):
    """Endless shuffled batches of pairs of similar length, each cut to its longest pair:
    every epoch is shuffled, cut into pools of ``pool`` batches, each pool sorted by length
    and split into batches, and the batches shuffled (the usual length bucketing; about
    half the padding compute of random batches on MNLI)."""
    from .pretrained import trim

    V.integer("batch_size", batch_size, 1)
    n = len(tensors["input_ids"])
    lengths = (~tensors["padding_mask"]).sum(1)
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=g)
        groups = []
        for i in range(0, n, batch_size * pool):
            chunk = order[i: i + batch_size * pool]
            chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
            groups += [chunk[j: j + batch_size] for j in range(0, len(chunk), batch_size)]
        groups = [b for b in groups if len(b) == batch_size] or groups  # drop ragged ones
        for k in torch.randperm(len(groups), generator=g).tolist():
            yield trim({name: v[groups[k]] for name, v in tensors.items()})


@torch.no_grad()
def evaluate(model, tensors: dict, batch_size: int = 64, bf16: bool = False) -> dict:
    """Loss and accuracy like :func:`labkit.train.evaluate`, over batches sorted by length
    and trimmed (the same numbers, a fraction of the padding compute)."""
    from .pretrained import trim

    was = model.training
    model.eval()
    lengths = (~tensors["padding_mask"]).sum(1) if "padding_mask" in tensors else None
    order = torch.argsort(lengths) if lengths is not None else torch.arange(
        len(tensors["input_ids"]))
    total, correct, n = 0.0, 0, 0
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    for i in range(0, len(order), batch_size):
        idx = order[i: i + batch_size]
        b = trim({k: v[idx] for k, v in tensors.items()})
        with ctx:
            logits = model(b["input_ids"], b.get("padding_mask"), b.get("token_type_ids"))
        logits = logits.float()
        total += float(torch.nn.functional.cross_entropy(logits, b["labels"], reduction="sum"))
        correct += int((logits.argmax(-1) == b["labels"]).sum())
        n += len(idx)
    model.train(was)
    return {"loss": total / n, "accuracy": correct / n}


@dataclass(frozen=True)
class FinetuneConfig:
    """BERT's fine-tuning recipe (see the module docstring).

    ``freeze_embeddings`` keeps the word embeddings fixed: with a few thousand pairs they
    barely move, and their dense gradient and AdamW update (30522 x 384) cost about a
    quarter of a step on a CPU. ``dev_fraction > 0``: early stopping on a seeded held-out
    part of the training rows by ``metric`` (``"accuracy"``, maximised, or ``"loss"``), after
    ``patience`` evaluations without improvement, every ``eval_every`` steps."""

    steps: int = 300
    lr: float = 5e-5
    batch_size: int = 32
    warmup: float = 0.1
    weight_decay: float = 0.01
    bf16: bool = False
    eval_every: int | None = None
    seed: int = 0
    freeze_embeddings: bool = True
    dev_fraction: float = 0.0
    patience: int = 3
    metric: str = "accuracy"

    def __post_init__(self):
        V.integer("steps", self.steps, 1)
        V.number("lr", self.lr, 0.0, 1.0, lo_open=True)
        V.integer("batch_size", self.batch_size, 1)
        V.number("warmup", self.warmup, 0.0, 1.0)
        V.number("weight_decay", self.weight_decay, 0.0)
        V.number("dev_fraction", self.dev_fraction, 0.0, 0.5)
        V.integer("patience", self.patience, 1)
        V.choice("metric", self.metric, ["accuracy", "loss"])


def finetune(model, task: D.PairTask, config: FinetuneConfig = FinetuneConfig(), *,
             progress: bool = True, time_budget: float | None = None, target=None,
             callbacks=()) -> T.TrainResult:
    """Fine-tune ``model`` on ``task`` in place by ``config``'s recipe.

    With ``config.dev_fraction > 0`` (model selection without touching the eval split) the
    best evaluation's weights on the held-out rows (:func:`split_dev`) are restored; the
    result's ``final`` is then the eval split's metrics of those weights, and
    ``best_step``/``dev`` are added to it as attributes."""
    if not isinstance(config, FinetuneConfig):
        raise V.LabkitConfigError("config", type(config).__name__, "a labkit FinetuneConfig")
    c = config
    model.embed.weight.requires_grad_(not c.freeze_embeddings)
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and
                (n.endswith("bias") or "norm" in n)]
    ids = {id(p) for p in no_decay}
    decay = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=c.lr)
    sched = WarmupLinear(opt, c.lr, c.steps, math.ceil(c.warmup * c.steps))
    train, watch, stop = task.train, task.eval, None
    if c.dev_fraction > 0:
        train, watch = split_dev(task.train, c.dev_fraction, seed=c.seed)
        stop = EarlyStopping(model, c.patience, c.metric,
                             "max" if c.metric == "accuracy" else "min")
    r = T.fit(model, trimmed_batches(train, c.batch_size, seed=c.seed), steps=c.steps,
              lr=c.lr, eval_fn=lambda: evaluate(model, watch, bf16=c.bf16),
              eval_every=c.eval_every or c.steps,
              callbacks=[sched, *callbacks, *([stop] if stop else [])], seed=c.seed,
              time_budget=time_budget, target=target, progress=progress, optimizer=opt,
              strategy=AutocastStep() if c.bf16 else None)
    if stop is not None:
        r.best_step = stop.restore()
        r.dev = {c.metric: stop.best_value}
        r.final = evaluate(model, task.eval, bf16=c.bf16)
    return r


class EarlyStopping(T.Callback):
    """Stop when the eval ``metric`` has not improved for ``patience`` evaluations, and keep
    the weights of the best evaluation (restored by :meth:`restore`). ``mode="min"`` for a
    loss, ``"max"`` for an accuracy."""

    all_ranks = True

    def __init__(self, model, patience: int = 3, metric: str = "loss", mode: str = "min"):
        V.integer("patience", patience, 1)
        V.choice("mode", mode, ["min", "max"])
        self.model, self.patience, self.metric = model, patience, metric
        self.sign = 1.0 if mode == "min" else -1.0
        self.best, self.best_step, self.bad, self.state = float("inf"), 0, 0, None

    def on_eval(self, state):
        value = self.sign * state.metrics[self.metric]
        if value < self.best:
            self.best, self.best_step, self.bad = value, state.step, 0
            self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            self.bad += 1
            state.stop = self.bad >= self.patience

    @property
    def best_value(self) -> float:
        """The best ``metric`` seen (in its own sign)."""
        return self.sign * self.best

    def restore(self) -> int:
        """Load the best weights; returns the step they are from."""
        if self.state is not None:
            self.model.load_state_dict(self.state)
        return self.best_step


def split_dev(tensors: dict, fraction: float = 0.1, seed: int = 0) -> tuple[dict, dict]:
    """A seeded held-out part of the training tensors for early stopping, so the reported
    validation accuracy is never the one training was stopped on."""
    V.number("fraction", fraction, 0.0, 0.5, lo_open=True)
    n = len(tensors["labels"])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = max(1, int(n * fraction))
    dev, train = order[:cut], order[cut:]
    return ({k: v[train] for k, v in tensors.items()}, {k: v[dev] for k, v in tensors.items()})
