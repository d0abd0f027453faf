"""LayerDrop: structured dropout of whole blocks, then pruning to a kept set.

Paper: Fan, Grave & Joulin, "Reducing Transformer Depth on Demand with Structured Dropout"
(ICLR 2020, arXiv 2019).

Idea: while training, skip each block with probability ``p`` on every forward pass (the
residual stream passes through unchanged), so the network learns not to rely on any one
block. At inference every block runs; or, to trade quality for speed with no fine-tuning,
keep only a subset of blocks ("every other block" for 50%, or any evenly spread subset).
A model trained without LayerDrop collapses when blocks are removed; one trained with it
degrades gracefully.

Equation, for block ``f_l`` with residuals inside it (``f_l(x) = x + ...``):

    training:   x_{l+1} = f_l(x_l) with probability 1 - p,  x_l with probability p
    pruned:     x_{l+1} = f_l(x_l) if l in kept else x_l

Complexity: training costs ``(1 - p)`` of the blocks on average; a pruned model costs
``|kept| / L`` of the block FLOPs and parameters (embeddings and head unchanged).

Two configs:

* :class:`LayerDropConfig` swaps in a :class:`LayerDropExecutor` (the depth seam:
  ``model.set_executor``), which drops blocks in training mode and runs every block (or its
  ``keep`` set) in eval mode.
* :class:`LayerPruneConfig` removes the blocks not in ``keep`` for real: ``model.blocks``
  holds only the kept blocks and ``model.cfg.n_layers`` says how many, so parameters and
  latency fall as counted.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .. import validate as V
from ..model import BlockContext, BlockExecutor
from .registry import register, register_account


def evenly_spread(n_layers: int, k: int) -> tuple[int, ...]:
    """``k`` of ``n_layers`` block indices spread evenly, the centre of each of ``k`` equal
    slices (``k = n/2`` keeps every other block: 1, 3, 5, ...; the last block is kept)."""
    V.integer("n_layers", n_layers, 1)
    V.integer("blocks kept", k, 1, n_layers)
    return tuple(sorted({min(n_layers - 1, int((i + 0.5) * n_layers / k)) for i in range(k)}))


def check_keep(keep, n_layers: int, name: str = "keep") -> tuple[int, ...]:
    """A non-empty, strictly increasing tuple of block indices in [0, n_layers)."""
    if not isinstance(keep, (tuple, list)) or not keep:
        raise V.LabkitConfigError(name, keep, f"a non-empty list of block indices in "
                                              f"[0, {n_layers - 1}]")
    for i in keep:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layers:
            raise V.LabkitConfigError(name, tuple(keep), f"block indices in [0, {n_layers - 1}] "
                                                         f"(the model has {n_layers} blocks)")
    if list(keep) != sorted(set(keep)):
        raise V.LabkitConfigError(name, tuple(keep), "strictly increasing block indices")
    return tuple(keep)


@dataclass(frozen=True)
class LayerDropConfig:
    """Skip each block with probability ``p`` in training. ``keep``: the blocks that run in
    eval mode (``None``: all), a simulated prune that keeps every parameter."""

    p: float = 0.2
    keep: tuple | None = None

    def __post_init__(self):
        V.number("p", self.p, 0.0, 1.0, hi_open=True)
        if self.keep is not None:
            V.layer_indices("keep", self.keep)
            object.__setattr__(self, "keep", tuple(self.keep))

    def check(self, model_cfg) -> None:
        if self.keep is not None:
            check_keep(self.keep, model_cfg.n_layers)


@dataclass(frozen=True)
class LayerPruneConfig:
    """Remove every block not in ``keep`` (block indices, checked against the model)."""

    keep: tuple = (0,)

    def __post_init__(self):
        V.layer_indices("keep", self.keep)
        object.__setattr__(self, "keep", tuple(self.keep))

    def check(self, model_cfg) -> None:
        check_keep(self.keep, model_cfg.n_layers)


class LayerDropExecutor(BlockExecutor):
    """Training: each block runs with probability ``1 - p`` (one Bernoulli draw per block per
    forward pass, shared by the batch, as in the paper). Eval: the ``keep`` blocks (all when
    ``None``). ``last_ran`` records which blocks ran in the latest forward pass."""

    def __init__(self, p: float, keep: tuple | None = None):
        super().__init__()
        self.p = V.number("p", p, 0.0, 1.0, hi_open=True)
        self.keep = keep
        self.last_ran: list[int] = []

    def forward(self, blocks: nn.ModuleList, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        if self.training:
            run = (torch.rand(len(blocks)) >= self.p).tolist()
        else:
            kept = set(range(len(blocks)) if self.keep is None else self.keep)
            run = [i in kept for i in range(len(blocks))]
        self.last_ran = [i for i, r in enumerate(run) if r]
        for i in self.last_ran:
            x = ctx.call(blocks[i], x)  # (B, N, D)
        return x

    def extra_repr(self) -> str:
        return f"p={self.p}, keep={self.keep}"


@register(LayerDropConfig)
def _apply_layerdrop(model, config: LayerDropConfig):
    if config.keep is not None:
        check_keep(config.keep, len(model.blocks))
    model.set_executor(LayerDropExecutor(config.p, config.keep))
    return model


@register(LayerPruneConfig)
def _apply_prune(model, config: LayerPruneConfig):
    keep = check_keep(config.keep, len(model.blocks))
    model.blocks = nn.ModuleList(model.blocks[i] for i in keep)
    model.cfg = dataclasses.replace(model.cfg, n_layers=len(keep))
    if isinstance(model.executor, LayerDropExecutor):  # its keep indexed the old blocks
        model.set_executor(BlockExecutor())
    return model


@register_account(LayerPruneConfig)
def _account_prune(table, cfg, config: LayerPruneConfig) -> dict:
    """The blocks not in ``keep`` are gone: their parameters, bytes and FLOPs."""
    n = len(table.blocks)
    table.blocks = [table.blocks[i] for i in config.keep]
    return {"block_flops_ratio": len(config.keep) / n}


@register_account(LayerDropConfig)
def _account_layerdrop(table, cfg, config: LayerDropConfig) -> dict:
    """Every parameter stays; at inference only the ``keep`` blocks run (all when None);
    training runs ``1 - p`` of the blocks on average."""
    for i, b in enumerate(table.blocks):
        b.runs = config.keep is None or i in config.keep
    kept = len(table.blocks) if config.keep is None else len(config.keep)
    return {"train_block_fraction": 1.0 - config.p,
            "block_flops_ratio": kept / len(table.blocks)}


