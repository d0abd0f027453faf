"""Factorized (low-rank) FFN: each FFN linear ``W`` becomes a product of two thin matrices.

Paper: the low-rank factorisation of weight matrices (Sainath et al. 2013, "Low-rank matrix
factorization for deep neural network training with high-dimensional output targets";
Denton et al. 2014 for SVD compression of trained layers), applied to the transformer MLP
as in the architecture-optimisation part of the lab's first paper (and ALBERT's factorised
embedding, Lan et al. 2020, which uses the same trick on a different matrix).

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
import re
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import validate as V
from ..model import MLP, ModelConfig
from .registry import register, register_expected, swap_modules

INITS = ("random", "svd")
FFN_LINEARS = ("up", "gate", "down")
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


@dataclass(frozen=True)
class FactorizedFFNConfig:
    """Replace the FFN linears (``up``/``gate``/``down`` of :class:`labkit.model.MLP`) with
    rank-``rank`` :class:`LowRankLinear` layers.

    ``init``: ``"random"`` (train from scratch) or ``"svd"`` (truncated SVD of the trained
    dense weights). ``layers``: block indices to factorize, or ``None`` for every block.
    ``rank`` is checked against ``min(d_model, d_ff)`` when applied (the config does not
    know the model).
    """

    rank: int = 16
    init: str = "random"
    layers: tuple | None = None

    def __post_init__(self):
        V.integer("rank", self.rank, 1)
        V.choice("init", self.init, INITS)
        object.__setattr__(self, "layers", V.layer_indices("layers", self.layers))

    def check(self, model_cfg: ModelConfig) -> None:
        """Model-dependent checks: the rank and the layer indices must fit the model."""
        top = min(model_cfg.d_model, model_cfg.d_ff)
        if self.rank > top:
            raise V.LabkitConfigError(
                "rank", self.rank, f"an integer in [1, {top}] = min(d_model, d_ff); "
                f"a rank above the dimension cannot be reached by U V^T")
        if self.layers is not None:
            for i in self.layers:
                V.integer("layers", i, 0, model_cfg.n_layers - 1)

    def selected(self, n_layers: int) -> list[int]:
        return list(range(n_layers)) if self.layers is None else sorted(set(self.layers))


_FFN_NAME = re.compile(r"^(?:.*\.)?blocks\.(\d+)\.ffn$")


@register(FactorizedFFNConfig)
def factorize_ffn_(model: nn.Module, config: FactorizedFFNConfig) -> nn.Module:
    """Swap the ``nn.Linear`` layers of every selected :class:`labkit.model.MLP` in place.

    Shared FFNs (see :mod:`labkit.techniques.sharing`) are one module, so they are factorized
    once, and every block that uses them sees the change."""
    cfg = model.cfg
    config.check(cfg)
    want = set(config.selected(cfg.n_layers))
    mlps: dict[str, int] = {}  # MLP name -> block index
    owners: dict[int, set[int]] = {}  # id(MLP) -> blocks that use it
    for name, m in model.named_modules(remove_duplicate=False):
        hit = _FFN_NAME.match(name)
        if hit and isinstance(m, MLP):
            mlps[name] = int(hit.group(1))
            owners.setdefault(id(m), set()).add(int(hit.group(1)))
    if not mlps:
        raise TypeError("factorize_ffn_ found no labkit.model.MLP at blocks.<i>.ffn to factorize "
                        "(was the FFN already replaced by another technique?)")
    for users in owners.values():
        if (users & want) and not users <= want:
            warnings.warn(f"the FFN shared by blocks {sorted(users)} is factorized for all of "
                          f"them although layers={config.layers} selects only some",
                          stacklevel=2)
    targets = {f"{name}.{lin}" for name, i in mlps.items() if i in want for lin in FFN_LINEARS}
    swapped = swap_modules(
        model, lambda name, m: name in targets and isinstance(m, nn.Linear),
        lambda name, m: LowRankLinear.from_linear(m, config.rank, config.init))
    if not swapped:
        raise TypeError("factorize_ffn_ found no nn.Linear to factorize in the selected FFNs "
                        "(were they factorized already?)")
    return model


# --------------------------------------------------------------------------- analytic counts

def ffn_matrices(cfg: ModelConfig) -> list[tuple[int, int, bool]]:
    """``(in, out, bias)`` of each FFN linear of one block."""
    d, f = cfg.d_model, cfg.d_ff
    if cfg.kind == "decoder":  # SwiGLU, no biases
        return [(d, f, False), (d, f, False), (f, d, False)]
    return [(d, f, True), (f, d, True)]


def ffn_params(cfg: ModelConfig, rank: int | None = None) -> int:
    """Parameters of one block's FFN, dense (``rank=None``) or factorized at ``rank``."""
    total = 0
    for i, o, b in ffn_matrices(cfg):
        total += (i * o if rank is None else rank * (i + o)) + (o if b else 0)
    return total


def ffn_flops_per_token(cfg: ModelConfig, rank: int | None = None) -> int:
    """Matmul FLOPs of one block's FFN for one token (2 per multiply-add)."""
    return sum(2 * (i * o if rank is None else rank * (i + o)) for i, o, _ in ffn_matrices(cfg))


def attn_params(cfg: ModelConfig) -> int:
    return 4 * (cfg.d_model * cfg.d_model + cfg.d_model)


def norm_params(cfg: ModelConfig) -> int:
    """Both norms of one block (LayerNorm has a bias, RMSNorm does not)."""
    return 2 * (cfg.d_model if cfg.kind == "decoder" else 2 * cfg.d_model)


def outside_blocks(cfg: ModelConfig) -> tuple[int, int]:
    """``(parameters, buffer bytes)`` outside the blocks (embeddings, final norm, heads; the
    decoder's rotary tables). No technique here touches them, so they are counted on a
    meta-device build (no memory, no compute) rather than re-derived from the model code."""
    from ..model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    inside = {id(p) for p in model.blocks.parameters()}
    params = {id(p): p for p in model.parameters() if id(p) not in inside}  # tied once
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return sum(p.numel() for p in params.values()), buffers


def breakdown(cfg: ModelConfig) -> dict:
    """Dense per-layer parameter and FLOP breakdown, the base other techniques edit."""
    n = cfg.n_layers
    other, buffer_bytes = outside_blocks(cfg)
    return {"n_layers": n, "attn_params_per_layer": [attn_params(cfg)] * n,
            "ffn_params_per_layer": [ffn_params(cfg)] * n,
            "norm_params_per_layer": [norm_params(cfg)] * n, "other_params": other,
            "ffn_flops_per_token_per_layer": [ffn_flops_per_token(cfg)] * n, "shared": (),
            "buffer_bytes": buffer_bytes}


def totals(b: dict, dense: dict | None = None, bytes_per_param: int = 4) -> dict:
    """Whole-model ``params``/``bytes`` (parameters and buffers)/FFN FLOPs from a breakdown
    (and ratios to ``dense``)."""
    params = (b["other_params"] + sum(b["attn_params_per_layer"]) + sum(b["ffn_params_per_layer"])
              + sum(b["norm_params_per_layer"]))
    out = {**b, "params": params, "bytes": params * bytes_per_param + b["buffer_bytes"],
           "ffn_params": sum(b["ffn_params_per_layer"]),
           "ffn_flops_per_token": sum(b["ffn_flops_per_token_per_layer"])}
    if dense is not None:
        out.update(params_dense=dense["params"], bytes_dense=dense["bytes"],
                   ffn_params_dense=dense["ffn_params"],
                   ffn_flops_per_token_dense=dense["ffn_flops_per_token"],
                   params_ratio=dense["params"] / params,
                   ffn_params_ratio=dense["ffn_params"] / out["ffn_params"],
                   ffn_flops_ratio=dense["ffn_flops_per_token"] / out["ffn_flops_per_token"])
    return out


def factorize_breakdown(cfg: ModelConfig, config: FactorizedFFNConfig, base: dict) -> dict:
    """``base`` (a breakdown) with the selected layers' FFNs factorized. If the FFN is
    already shared (``"ffn" in base["shared"]``), the one shared module is factorized when
    any layer is selected, and only layer 0 counts its parameters."""
    out = {k: (list(v) if isinstance(v, list) else v) for k, v in base.items()}
    selected = config.selected(cfg.n_layers)
    if "ffn" in out.get("shared", ()):
        selected = list(range(cfg.n_layers)) if selected else []
    for i in selected:
        if out["ffn_params_per_layer"][i] or "ffn" not in out.get("shared", ()):
            out["ffn_params_per_layer"][i] = ffn_params(cfg, config.rank)
        out["ffn_flops_per_token_per_layer"][i] = ffn_flops_per_token(cfg, config.rank)
    return out


@register_expected(FactorizedFFNConfig)
def expected(model_cfg: ModelConfig, config: FactorizedFFNConfig, base: dict | None = None) -> dict:
    """Analytic parameters, fp32 bytes and FFN matmul FLOPs per token, before and after.

    Keys: ``params``, ``bytes``, ``ffn_params``, ``ffn_flops_per_token`` (after), the same
    with ``_dense`` (before), ratios ``params_ratio``/``ffn_params_ratio``/``ffn_flops_ratio``
    (dense / factorized), and the per-layer breakdown. ``base``: the breakdown of an
    already-transformed model (another ``expected`` result) to compose techniques."""
    config.check(model_cfg)
    dense = totals(breakdown(model_cfg))
    start = breakdown(model_cfg) if base is None else {k: base[k] for k in breakdown(model_cfg)}
    return totals(factorize_breakdown(model_cfg, config, start), dense)


def break_even_rank(d_in: int, d_out: int) -> float:
    """The rank at which a factorized matrix has as many parameters as the dense one."""
    return d_in * d_out / (d_in + d_out)


def best_rank_for_ratio(d_in: int, d_out: int, ratio: float) -> int:
    """The largest rank whose parameter saving is at least ``ratio``."""
    V.number("ratio", ratio, 0.0, lo_open=True)
    return max(1, math.floor(d_in * d_out / (ratio * (d_in + d_out))))


__all__ = [
    "FactorizedFFNConfig",
    "LowRankLinear",
    "best_rank_for_ratio",
    "break_even_rank",
    "breakdown",
    "expected",
    "factorize_breakdown",
    "factorize_ffn_",
    "ffn_flops_per_token",
    "ffn_params",
    "svd_error",
    "totals",
]
