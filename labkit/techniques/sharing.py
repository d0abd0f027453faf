"""Cross-layer parameter sharing (ALBERT, Lan et al. 2020, "ALBERT: A Lite BERT for
Self-supervised Learning of Language Representations", section 3.1).

Idea: every transformer block runs the *same* attention and/or FFN weights, so a deep
model stores the parameters of one block. ``mode="all"`` shares attention and FFN (ALBERT's
default), ``"ffn"`` only the FFN, ``"attention"`` only the attention. Block 0's modules are
kept and every other block points at them (one tensor storage, one gradient that sums the
contributions of every layer, one optimizer update).

Here the norms stay per-layer (ALBERT shares them too; they are 2-4 d parameters a block and
let each layer rescale the shared computation), so only the attention/FFN is shared.

Equation, for L layers with attention ``A`` and FFN ``F`` parameters per block::

    dense:        params L (A + F)
    "all":        params A + F
    "ffn":        params L A + F
    "attention":  params A + L F
    FLOPs, activation memory and latency: unchanged in every mode

Complexity: parameters and weight bytes fall by ``(L-1)`` shared parts; compute, activation
memory and latency do not change (every layer still runs). Sharing composes with other
techniques because it ties whatever module sits at ``blocks[0].attn`` / ``blocks[0].ffn``
(e.g. a factorized FFN, in either order).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .. import validate as V
from ..model import ModelConfig
from .factorized_ffn import breakdown, totals
from .registry import register, register_expected, swap_modules

MODES = ("all", "ffn", "attention")
_PARTS = {"all": ("attn", "ffn"), "ffn": ("ffn",), "attention": ("attn",)}
_BLOCK_PART = re.compile(r"^(?:(.*)\.)?blocks\.(\d+)\.(attn|ffn)$")


@dataclass(frozen=True)
class SharingConfig:
    """Share block 0's attention and/or FFN with every block: ``mode`` is ``"all"``,
    ``"ffn"`` or ``"attention"``."""

    mode: str = "all"

    def __post_init__(self):
        V.choice("mode", self.mode, MODES)

    @property
    def parts(self) -> tuple[str, ...]:
        return _PARTS[self.mode]


@register(SharingConfig)
def share_layers_(model: nn.Module, config: SharingConfig) -> nn.Module:
    """Point ``blocks[i].attn``/``.ffn`` (i > 0) at block 0's module, in place."""
    blocks = model.blocks
    if len(blocks) < 2:
        raise V.LabkitConfigError("n_layers", len(blocks), "at least 2 layers to share across")
    parts = config.parts

    def select(name, m):
        hit = _BLOCK_PART.match(name)
        return bool(hit) and hit.group(3) in parts and int(hit.group(2)) > 0

    swap_modules(model, select, lambda name, m: getattr(blocks[0], _BLOCK_PART.match(name)[3]))
    model.shared_parts = tuple(sorted(set(getattr(model, "shared_parts", ())) | set(parts)))
    return model


def share_breakdown(config: SharingConfig, base: dict) -> dict:
    """``base`` (a per-layer breakdown, see :func:`labkit.techniques.factorized_ffn.breakdown`)
    with layers 1..L-1 counting no parameters for the shared parts; FLOPs are unchanged."""
    out = {k: (list(v) if isinstance(v, list) else v) for k, v in base.items()}
    key = {"attn": "attn_params_per_layer", "ffn": "ffn_params_per_layer"}
    for part in config.parts:
        col = out[key[part]]
        out[key[part]] = [col[0]] + [0] * (len(col) - 1)
        # every layer now runs block 0's module: its FLOPs, not its own
        if part == "ffn":
            f = out["ffn_flops_per_token_per_layer"]
            out["ffn_flops_per_token_per_layer"] = [f[0]] * len(f)
    out["shared"] = tuple(sorted(set(out.get("shared", ())) | set(config.parts)))
    return out


@register_expected(SharingConfig)
def expected(model_cfg: ModelConfig, config: SharingConfig, base: dict | None = None) -> dict:
    """Analytic parameters and bytes after sharing (FLOPs unchanged), with ratios to dense.

    ``base``: the breakdown of an already-transformed model (e.g. the output of
    :func:`labkit.techniques.factorized_ffn.expected`) to compose techniques; default dense."""
    if model_cfg.n_layers < 2:
        raise V.LabkitConfigError("n_layers", model_cfg.n_layers, "at least 2 layers to share across")
    dense = totals(breakdown(model_cfg))
    start = breakdown(model_cfg) if base is None else {k: base[k] for k in breakdown(model_cfg)}
    return totals(share_breakdown(config, start), dense)


def expected_stack(model_cfg: ModelConfig, configs) -> dict:
    """Analytic totals of applying ``configs`` (factorized FFN and/or sharing) in order."""
    from . import factorized_ffn

    fns = {SharingConfig: expected, factorized_ffn.FactorizedFFNConfig: factorized_ffn.expected}
    out = None
    for c in configs:
        if type(c) not in fns:
            raise TypeError(f"expected_stack composes {sorted(f.__name__ for f in fns)}, "
                            f"not {type(c).__name__}")
        out = fns[type(c)](model_cfg, c, out)
    return out if out is not None else totals(breakdown(model_cfg), totals(breakdown(model_cfg)))


__all__ = [
    "MODES",
    "SharingConfig",
    "expected",
    "expected_stack",
    "share_breakdown",
    "share_layers_",
]
