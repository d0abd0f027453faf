"""How pruned weights are chosen over training: one strategy object per method.

* :class:`OneShot` (``magnitude``; Han et al., 2015): dense until ``prune_at * steps``, prune
  to the target by magnitude in one step, fine-tune the rest with the mask fixed
  (``prune_at=0``: sparse training from initialisation).
* :class:`Gradual` (Zhu & Gupta, 2017): tighten magnitude masks on the cubic schedule
  ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3`` every ``dt`` steps from ``t0``.
* :class:`L1` (the seed paper, "Research on Inference and Training Acceleration of Large
  Language Model"): train with ``L_task + lambda * sum |W|`` until
  ``prune_at * steps``, threshold by magnitude, fine-tune.

A strategy says what happens when the config is applied (:meth:`start`) and what a run of
:func:`labkit.train.fit` needs (:meth:`plan`: callbacks and an extra loss), so
:func:`train_sparse` is one ``fit`` call for every method. Complexity: one mask build
(O(numel log numel)) per pruning step.
"""
from __future__ import annotations

import warnings

import torch

from .. import validate as V
from ..kernels import masks as MK
from ..train import Callback, fit
from .sparsity import SparsityConfig, actual_sparsity, attach, masked_linears, prune, start_


def cubic_schedule(t: int, s_i: float, s_f: float, t0: int, n: int, dt: int) -> float:
    """Zhu & Gupta's sparsity at step ``t``: s_i before t0, s_f after t0 + n*dt."""
    MK.check_sparsity(s_i, "initial_sparsity")
    MK.check_sparsity(s_f, "sparsity")
    V.integer("prune_steps", n, 1)
    V.integer("prune_every", dt, 1)
    if t <= t0:
        return float(s_i)
    frac = min(1.0, (t - t0) / (n * dt))
    return float(s_f + (s_i - s_f) * (1.0 - frac) ** 3)


def l1_penalty(lam: float):
    """``extra_loss`` for :func:`labkit.train.fit`: ``lam * sum |W|`` over masked weights."""
    lam = V.number("l1_lambda", lam, 0.0)

    def loss(model):
        terms = [m.weight.abs().sum() for m in masked_linears(model).values()]
        return lam * torch.stack(terms).sum() if terms else torch.zeros(())

    return loss


class GradualPruning(Callback):
    """Tighten the masks on the cubic schedule at t0, t0 + dt, ..., t0 + n*dt."""

    all_ranks = True  # changes the model: every rank prunes alike

    def __init__(self, model, config: SparsityConfig, offset: int = 0):
        self.model, self.config, self.offset = model, config, offset
        self.history: list[tuple[int, float]] = []

    def on_step(self, state):
        c = self.config
        t = state.step - self.offset
        if t < c.start_step or t > c.start_step + c.prune_steps * c.prune_every:
            return
        if (t - c.start_step) % c.prune_every:
            return
        s = cubic_schedule(t, c.initial_sparsity, c.sparsity, c.start_step, c.prune_steps,
                           c.prune_every)
        prune(self.model, c, s)
        self.history.append((state.step, s))


class PruneAt(Callback):
    """Prune to the config's target once, at ``step``."""

    all_ranks = True

    def __init__(self, model, config, step):
        self.model, self.config, self.step, self.done = model, config, step, False

    def on_step(self, state):
        if not self.done and state.step >= self.step:
            prune(self.model, self.config)
            self.done = True


class OneShot:
    name = "magnitude"

    def plan(self, model, config, steps, cut):
        if cut == 0:
            prune(model, config)
            return [], None
        return [PruneAt(model, config, cut)], None


class Gradual:
    name = "gradual"

    def plan(self, model, config, steps, cut):
        start_(model, config)
        end = config.start_step + config.prune_steps * config.prune_every
        if end > steps:
            warnings.warn(f"the cubic schedule ends at step {end} > steps={steps}: final "
                          f"sparsity will be below {config.sparsity}", stacklevel=3)
        return [GradualPruning(model, config)], None


class L1:
    name = "l1"

    def plan(self, model, config, steps, cut):
        penalty = l1_penalty(config.l1_lambda)
        seen = {"step": 0}

        class _Count(Callback):
            def on_step(self, state):
                seen["step"] = state.step

        def extra(m):
            return penalty(m) if seen["step"] < cut else torch.zeros(())

        return [_Count(), PruneAt(model, config, max(cut, 1))], extra


STRATEGIES = {s.name: s for s in (OneShot, Gradual, L1)}


def strategy(config: SparsityConfig):
    return STRATEGIES[config.method]()


def train_sparse(model, config: SparsityConfig, batches, steps: int, eval_fn=None,
                 eval_every: int = 50, callbacks=(), lr: float = 1e-3, prune_at: float = 0.5,
                 progress: bool = False, seed: int = 0):
    """Train ``model`` ending at ``config.target_sparsity`` by the config's method, in ONE
    :func:`labkit.train.fit` run (one history, one optimizer). Evaluations carry the actual
    ``sparsity``. Returns the :class:`labkit.train.TrainResult`."""
    V.number("prune_at", prune_at, 0.0, 1.0)
    if not masked_linears(model):
        attach(model, config)
    cbs, extra = strategy(config).plan(model, config, steps, round(prune_at * steps))
    if eval_fn is not None:
        inner = eval_fn

        def eval_fn():
            return {**inner(), "sparsity": actual_sparsity(model)}
    return fit(model, batches, steps, lr=lr, eval_fn=eval_fn, eval_every=eval_every,
               callbacks=[*cbs, *callbacks], extra_loss=extra, progress=progress, seed=seed)


__all__ = [
    "L1",
    "STRATEGIES",
    "Gradual",
    "GradualPruning",
    "OneShot",
    "PruneAt",
    "cubic_schedule",
    "l1_penalty",
    "strategy",
    "train_sparse",
]
