"""Cross-layer parameter sharing (ALBERT, Lan et al. 2020, "ALBERT: A Lite BERT for
Self-supervised Learning of Language Representations", section 3.1).

Idea: every transformer block runs the *same* attention and/or FFN weights, so a deep
model stores the parameters of one block. ``parts=("attn", "ffn")`` shares both (ALBERT's
default), ``("ffn",)`` only the FFN, ``("attn",)`` only the attention. The first selected
block's modules are kept and every other selected block points at them (one tensor
storage, one gradient that sums the contributions of every layer, one optimizer update).
``layers`` picks the blocks that share (``()``: every block).

Here the norms stay per-layer (ALBERT shares them too; they are 2-4 d parameters a block and
let each layer rescale the shared computation), so only the attention/FFN is shared.

Equation, for L shared layers with attention ``A`` and FFN ``F`` parameters per block::

    dense:               params L (A + F)
    ("attn", "ffn"):     params A + F
    ("ffn",):            params L A + F
    ("attn",):           params A + L F
    FLOPs, activation memory and latency: unchanged

Complexity: parameters and weight bytes fall by ``(L-1)`` shared parts; compute, activation
memory and latency do not change (every layer still runs). Sharing composes with other
techniques because it ties whatever module sits at ``blocks[i].attn`` / ``blocks[i].ffn``
(e.g. a factorized FFN, in either order).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .. import validate as V
from ..model import ModelConfig
from .registry import block_indices, register, register_account, scope_fields, swap_modules

SHARE_PARTS = ("attn", "ffn")


@dataclass(frozen=True)
class SharingConfig:
    """Share the first selected block's ``parts`` (``"attn"``, ``"ffn"``) with every other
    block in ``layers`` (``()``: every block)."""

    parts: tuple[str, ...] = ("attn", "ffn")
    layers: tuple[int, ...] = ()

    def __post_init__(self):
        scope_fields(self, SHARE_PARTS)

    def check(self, model_cfg: ModelConfig) -> None:
        if len(block_indices(model_cfg.n_layers, self.layers)) < 2:
            what = "n_layers" if not self.layers else "layers"
            value = model_cfg.n_layers if not self.layers else self.layers
            raise V.LabkitConfigError(what, value, "at least 2 layers to share across")


@register(SharingConfig)
def share_layers_(model: nn.Module, config: SharingConfig) -> nn.Module:
    """Point ``blocks[i].attn``/``.ffn`` of the selected blocks at the first one's, in place."""
    blocks = model.blocks
    first, *rest = block_indices(len(blocks), config.layers)
    names = {f"blocks.{i}.{p}": p for i in rest for p in config.parts}
    swap_modules(model, lambda name, m: name in names,
                 lambda name, m: getattr(blocks[first], names[name]))
    return model


@register_account(SharingConfig)
def _account(table, model_cfg: ModelConfig, config: SharingConfig) -> None:
    """The selected blocks hold the first one's attention/FFN object: counted once for
    parameters and bytes, once per block for FLOPs (unchanged)."""
    first, *rest = block_indices(model_cfg.n_layers, config.layers)
    for i in rest:
        for part in config.parts:
            setattr(table.blocks[i], part, getattr(table.blocks[first], part))


__all__ = ["SHARE_PARTS", "SharingConfig", "share_layers_"]
