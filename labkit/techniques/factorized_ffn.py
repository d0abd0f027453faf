"""Factorized (low-rank) FFN: each FFN linear ``W`` becomes a product of two thin matrices.

Paper: the low-rank factorisation of weight matrices (Sainath et al. 2013, "Low-rank matrix
factorization for deep neural network training with high-dimensional output targets";
Denton et al. 2014 for SVD compression of trained layers), applied to the transformer MLP
as in the architecture-optimisation part of the seed paper that notebook 10 reproduces,
"Research on Inference and Training Acceleration of Large Language Model" (Chen, CISAI 2024), and ALBERT's factorised
embedding (Lan et al. 2020, "ALBERT: A Lite BERT for Self-supervised Learning of Language
Representations") uses the same trick on a different matrix.

Idea: a dense linear ``W`` (out x in) is replaced by ``W ~= U V^T`` with ``U`` (out x r) and
``V`` (in x r), so ``x -> (x V) U^T + b`` runs two thin matmuls. Trained from scratch
(``init="random"``) the model simply has fewer, rank-limited FFN weights; to compress a
trained model (``init="svd"``) the factors come from the truncated SVD
``W = U_r S_r V_r^T``: ``U = U_r sqrt(S_r)``, ``V = V_r sqrt(S_r)``, the best rank-r
approximation in Frobenius and spectral norm (Eckart-Young). At full rank
``r = min(in, out)`` it reproduces ``W`` exactly.

Equation and complexity, per token, for a GELU MLP (``up``: d -> d_ff, ``down``: d_ff -> d)::

    dense:       params 2 d d_ff (+ biases)         FLOPs 2 * 2 d d_ff
    factorized:  params 2 r (d + d_ff) (+ biases)   FLOPs 2 * 2 r (d + d_ff)

A SwiGLU MLP (``up``, ``gate``, ``down``) has three such matrices. The saving is
``d d_ff / (r (d + d_ff))``, so only ``r < d d_ff / (d + d_ff)`` is smaller than dense;
at ``r = d/4`` with ``d_ff = 4d`` the FLOP ratio is 3.2x.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import validate as V
from ..model import MLP, ModelConfig
from .registry import (
    block_indices,
    expand_parts,
    is_restoring,
    linears,
    modules,
    register,
    register_account,
    scope_fields,
    swap_modules,
)

INITS = ("random", "svd")
# the std of the dense init in labkit.model.Transformer._init; a random factorisation
# matches it in the product U V^T
DENSE_INIT_STD = 0.02


class LowRankLinear(nn.Module):
    """``x -> (x V) U^T + b`` with ``U`` (out x r), ``V`` (in x r): a rank-r ``nn.Linear``."""

    kernel_path = "low-rank: two dense matmuls (x V, then U^T)"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        V.integer("in_features", in_features, 1)
        V.integer("out_features", out_features, 1)
        V.integer("rank", rank, 1, min(in_features, out_features))
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.U = nn.Parameter(torch.empty(out_features, rank))
        self.V = nn.Parameter(torch.empty(in_features, rank))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self, std: float = DENSE_INIT_STD):
        """Normal factors whose product has entries of std ``std``: Var(sum_r u v) = r s^4."""
        s = (std ** 2 / self.rank) ** 0.25
        with torch.no_grad():
            nn.init.normal_(self.U, std=s)
            nn.init.normal_(self.V, std=s)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x):  # (..., in) -> (..., out)
        h = x @ self.V  # (..., r)
        return F.linear(h, self.U, self.bias)  # (..., out)

    def dense_weight(self) -> torch.Tensor:
        """The dense (out x in) matrix ``U V^T`` this layer represents."""
        return self.U @ self.V.T

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, init: str = "svd") -> LowRankLinear:
        """A rank-``rank`` layer replacing ``linear``: its truncated SVD (``init="svd"``) or
        a fresh random factorisation (``init="random"``); the bias is copied either way."""
        V.choice("init", init, INITS)
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, rank, bias=linear.bias is not None)
        new = new.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            if init == "svd":
                u, s, vh = torch.linalg.svd(w.detach().float(), full_matrices=False)
                root = s[:rank].sqrt()  # (r,)
                new.U.copy_(u[:, :rank] * root)  # (out, r)
                new.V.copy_(vh[:rank].T * root)  # (in, r)
            if linear.bias is not None:
                new.bias.copy_(linear.bias)
        return new

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}")


def svd_error(weight: torch.Tensor, rank: int) -> float:
    """Relative Frobenius error ``||W - W_r|| / ||W||`` of the best rank-``rank`` approximation,
    from the singular values alone: ``sqrt(sum_{i>r} s_i^2 / sum_i s_i^2)``."""
    s = torch.linalg.svdvals(weight.detach().float())
    V.integer("rank", rank, 0, len(s))
    return float((s[rank:].square().sum() / s.square().sum()).sqrt())


FFN_PARTS = ("ffn", "ffn.up", "ffn.gate", "ffn.down")


@dataclass(frozen=True)
class FactorizedFFNConfig:
    """Replace the FFN linears (``up``/``gate``/``down`` of :class:`labkit.model.MLP`) with
    rank-``rank`` :class:`LowRankLinear` layers.

    ``init``: ``"random"`` (train from scratch) or ``"svd"`` (truncated SVD of the trained
    dense weights). ``layers``: block indices to factorize (``()``: every block); ``parts``:
    ``("ffn",)`` for every FFN linear, or some of ``"ffn.up"``, ``"ffn.gate"``,
    ``"ffn.down"``. ``rank`` is checked against ``min(d_model, d_ff)`` by :meth:`check`
    (the config does not know the model).
    """

    rank: int = 16
    init: str = "random"
    layers: tuple[int, ...] = ()
    parts: tuple[str, ...] = ("ffn",)

    def __post_init__(self):
        V.integer("rank", self.rank, 1)
        V.choice("init", self.init, INITS)
        scope_fields(self, FFN_PARTS)

    def check(self, model_cfg: ModelConfig) -> None:
        """Model-dependent checks: the rank must fit the model (``layers`` is checked by
        :func:`labkit.techniques.registry.check`, which calls this)."""
        top = min(model_cfg.d_model, model_cfg.d_ff)
        if self.rank > top:
            raise V.LabkitConfigError(
                "rank", self.rank, f"an integer in [1, {top}] = min(d_model, d_ff); "
                f"a rank above the dimension cannot be reached by U V^T")


@register(FactorizedFFNConfig)
def factorize_ffn_(model: nn.Module, config: FactorizedFFNConfig) -> nn.Module:
    """Swap the selected ``nn.Linear`` layers of the selected FFNs in place.

    Shared FFNs (see :mod:`labkit.techniques.sharing`) are one module, so they are factorized
    once, and every block that uses them sees the change."""
    ffns = modules(model, (), ("ffn",))  # every block's FFN, to see which are shared
    if not any(isinstance(m, MLP) for m in ffns.values()):
        raise TypeError("factorize_ffn_ found no labkit.model.MLP at blocks.<i>.ffn to factorize "
                        "(was the FFN already replaced by another technique?)")
    want = set(block_indices(model.cfg.n_layers, config.layers))
    owners: dict[int, set[int]] = {}  # id(MLP) -> blocks that use it
    for name, m in ffns.items():
        owners.setdefault(id(m), set()).add(int(name.split(".")[-2]))
    for users in owners.values():
        if (users & want) and not users <= want:
            warnings.warn(f"the FFN shared by blocks {sorted(users)} is factorized for all of "
                          f"them although layers={config.layers} selects only some",
                          stacklevel=3)
    targets = {name for name, m in linears(model, config.layers, config.parts).items()
               if isinstance(m, nn.Linear)}
    init = "random" if is_restoring() else config.init  # restoring: the file has the factors
    swapped = swap_modules(
        model, lambda name, m: name in targets and isinstance(m, nn.Linear),
        lambda name, m: LowRankLinear.from_linear(m, config.rank, init))
    if not swapped:
        raise TypeError("factorize_ffn_ found no nn.Linear to factorize in the selected FFNs "
                        "(were they factorized already?)")
    return model


# --------------------------------------------------------------------------- analytic counts

@register_account(FactorizedFFNConfig)
def _account(table, model_cfg: ModelConfig, config: FactorizedFFNConfig) -> None:
    """Every selected FFN linear becomes rank ``r``: ``r (in + out)`` weights, ``2 r (in +
    out)`` FLOPs a token. A shared FFN is one object in the table, factorized once."""
    for i in block_indices(model_cfg.n_layers, config.layers):
        for part in expand_parts(config.parts):
            row = table.blocks[i].ffn.get(part.split(".")[1])
            if row is not None and row.kind == "linear":  # as the swap: nn.Linear only
                row.rank, row.kind = config.rank, "lowrank"


def break_even_rank(d_in: int, d_out: int) -> float:
    """The rank at which a factorized matrix has as many parameters as the dense one."""
    return d_in * d_out / (d_in + d_out)


def best_rank_for_ratio(d_in: int, d_out: int, ratio: float) -> int:
    """The largest rank whose parameter saving is at least ``ratio``."""
    V.number("ratio", ratio, 0.0, lo_open=True)
    return max(1, math.floor(d_in * d_out / (ratio * (d_in + d_out))))


__all__ = [
    "FFN_PARTS",
    "INITS",
    "FactorizedFFNConfig",
    "LowRankLinear",
    "best_rank_for_ratio",
    "break_even_rank",
    "factorize_ffn_",
    "svd_error",
]
