"""A plain training loop with callbacks, a progress bar, seeds and steps-to-target.

``fit`` runs AdamW for ``steps`` steps (or until ``time_budget`` seconds), evaluates every
``eval_every`` steps, and calls each callback's ``on_step(state)`` / ``on_eval(state)``.
The history is tidy (one dict per logged point) so it drops straight into pandas.

Seams for how a step runs. Callbacks get hooks around the backward pass and the optimizer
step (``before_backward``, ``after_backward``, ``before_optimizer_step``,
``after_optimizer_step``), and a :class:`StepStrategy` owns forward + backward, so data
parallel (a DDP-wrapped forward), pipeline schedules (``schedule.step``) or distillation
change the step without an ``if`` in the loop. ``fit`` knows its rank: only the logging
rank (``log_rank``, rank 0 by default; the last pipeline stage, say) shows progress and
runs the logging hooks ``on_step``/``on_eval`` of callbacks that are not ``all_ranks``.

"Steps to target" is the convergence measure: the first step (and wall-clock second) at
which an evaluation metric reaches the target, e.g. ``target=("accuracy", 0.9)`` or
``target=("loss", 1.5)`` (losses count as reached when at or below the target).
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import validate as V


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rank() -> int:
    """This process's rank in the default process group (0 when not distributed)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@dataclass
class TrainState:
    step: int = 0
    loss: float = float("nan")
    seconds: float = 0.0
    metrics: dict = field(default_factory=dict)  # latest evaluation
    stop: bool = False  # a callback may set this to end training early


class Callback:
    """Override what you need; every hook receives the live :class:`TrainState`.

    ``on_step``/``on_eval`` are logging hooks: they run on the logging rank only unless
    ``all_ranks`` is true. The training hooks run on every rank (gradient clipping, a
    gradient sync check, an EMA of the weights).
    """

    all_ranks: bool = False

    def on_step(self, state: TrainState) -> None: ...

    def on_eval(self, state: TrainState) -> None: ...

    def before_backward(self, state: TrainState, loss: torch.Tensor) -> None: ...

    def after_backward(self, state: TrainState) -> None: ...

    def before_optimizer_step(self, state: TrainState) -> None: ...

    def after_optimizer_step(self, state: TrainState) -> None: ...


class StepStrategy:
    """Forward and backward of one step; returns the (detached) task loss.

    The default: :meth:`loss` (``model.loss(batch)``) + ``extra_loss(model)``, the
    ``before_backward`` hooks, then ``backward``. Override :meth:`loss` for another
    objective or forward (a DDP wrapper, distillation, SDN exits); override
    ``forward_backward`` only where forward and backward are one call (a pipeline schedule).
    """

    def loss(self, model, batch: dict, state: TrainState) -> torch.Tensor:
        return model.loss(batch)

    def forward_backward(self, model, batch: dict, state: TrainState,
                         callbacks: list[Callback], extra_loss=None) -> torch.Tensor:
        loss = self.loss(model, batch, state)
        total = loss + extra_loss(model) if extra_loss is not None else loss
        for cb in callbacks:
            cb.before_backward(state, total)
        total.backward()
        return loss.detach()


@dataclass
class TrainResult:
    history: list[dict]  # {"step", "seconds", "split": "train"|"eval", metric: value, ...}
    steps: int
    seconds: float
    final: dict  # last evaluation metrics
    steps_to_target: int | None = None
    seconds_to_target: float | None = None

    def frame(self):
        import pandas as pd

        return pd.DataFrame(self.history)


@torch.no_grad()
def evaluate(model, tensors: dict, batch_size: int = 256) -> dict:
    """Mean loss, and accuracy for a classifier, over a dict of tensors (or LM batches list).

    One forward pass per batch, with the batch's padding mask and segment ids
    (``token_type_ids``, when present): the loss and the accuracy come from the same logits,
    the ones ``model.loss`` trains on."""
    was = model.training
    model.eval()
    encoder = model.cfg.kind == "encoder"
    total, n, correct = 0.0, 0, 0
    chunks = tensors if isinstance(tensors, list) else [
        {k: v[i: i + batch_size] for k, v in tensors.items()}
        for i in range(0, len(tensors["input_ids"]), batch_size)]
    for batch in chunks:
        m = len(batch["input_ids"])
        logits = model(batch["input_ids"], batch.get("padding_mask"),
                       batch.get("token_type_ids"))  # (B, C) or (B, N, vocab)
        labels = batch["labels"]
        if encoder:
            total += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
        else:  # the batch's mean over its targets, weighted by rows (as model.loss)
            total += float(F.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                           ignore_index=-100)) * m
        n += m
    model.train(was)
    out = {"loss": total / n}
    if encoder:
        out["accuracy"] = correct / n
    return out


def _reached(metric: str, value: float, goal: float) -> bool:
    return value <= goal if "loss" in metric else value >= goal


def fit(model, train_batches: Iterator[dict], steps: int, lr: float = 1e-3,
        eval_fn: Callable[[], dict] | None = None, eval_every: int = 50,
        callbacks: list[Callback] = (), seed: int = 0, time_budget: float | None = None,
        target: tuple[str, float] | None = None, weight_decay: float = 0.0,
        extra_loss: Callable[[torch.nn.Module], torch.Tensor] | None = None,
        progress: bool = True, optimizer: torch.optim.Optimizer | None = None,
        strategy: StepStrategy | None = None, log_rank: int = 0) -> TrainResult:
    """Train ``model`` in place. ``extra_loss(model)`` adds a regulariser (e.g. L1);
    ``strategy`` runs forward + backward (default :class:`StepStrategy`); only rank
    ``log_rank`` shows progress and runs logging callbacks (see :class:`Callback`)."""
    V.integer("steps", steps, 1)
    V.number("lr", lr, 0.0, lo_open=True)
    V.integer("eval_every", eval_every, 1)
    if time_budget is not None:
        V.number("time_budget", time_budget, 0.0, lo_open=True)
    seed_everything(seed)
    strategy = strategy or StepStrategy()
    logging_rank = rank() == log_rank
    log_cbs = [cb for cb in callbacks if logging_rank or cb.all_ranks]
    opt = optimizer or torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    state, history = TrainState(), []
    hit_step = hit_sec = None
    model.train()
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="train", disable=not (progress and logging_rank), leave=False)

    def run_eval():
        nonlocal hit_step, hit_sec
        state.metrics = eval_fn()
        history.append({"step": state.step, "seconds": state.seconds, "split": "eval",
                        **state.metrics})
        if target and hit_step is None and _reached(target[0], state.metrics[target[0]],
                                                     target[1]):
            hit_step, hit_sec = state.step, state.seconds
        for cb in log_cbs:
            cb.on_eval(state)

    for step in range(1, steps + 1):
        batch = next(train_batches)
        state.step = step
        opt.zero_grad(set_to_none=True)
        loss = strategy.forward_backward(model, batch, state, callbacks, extra_loss)
        for cb in callbacks:
            cb.after_backward(state)
        for cb in callbacks:
            cb.before_optimizer_step(state)
        opt.step()
        for cb in callbacks:
            cb.after_optimizer_step(state)
        state.loss = float(loss)
        state.seconds = time.perf_counter() - start
        history.append({"step": step, "seconds": state.seconds, "split": "train",
                        "loss": state.loss})
        bar.update(1)
        for cb in log_cbs:
            cb.on_step(state)
        over_time = time_budget is not None and state.seconds >= time_budget
        if eval_fn is not None and (step % eval_every == 0 or step == steps or over_time
                                    or state.stop):
            run_eval()
        if state.stop or over_time:
            break
    bar.close()
    model.eval()
    return TrainResult(history, state.step, state.seconds, dict(state.metrics), hit_step, hit_sec)
