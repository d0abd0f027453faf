"""Compacted dense: pruned rows, columns, FFN neurons or attention heads physically removed,
so a smaller dense matmul runs (the structured-sparsity path that needs no sparse kernel).

* :class:`CompactedLinear`: one linear keeps its outer shape,
  ``y[..., rows] = x[..., cols] @ W_kept^T`` (a gather of inputs, a scatter of outputs);
  2*T*|rows|*|cols| FLOPs.
* :class:`CompactedMLP`: FFN hidden neurons removed, d_ff -> kept (up/gate rows and the
  matching down columns): 2*T*(2 or 3)*d*kept FLOPs, no gather at all.
* :class:`CompactedAttention`: whole heads removed, Q/K/V project to kept_heads*head_dim.

This is the one place FFN neurons are compacted (sparsity's ``accelerate``/``convert`` and
the INT8 + structured-sparsity bytes both come here).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model import MLP, Attention
from .base import SparseLinearBase


class CompactedLinear(SparseLinearBase):
    kernel_path = "compacted-dense"

    def __init__(self, lin):
        super().__init__(lin)
        w = lin.weight.detach()
        rows = w.any(1).nonzero().squeeze(1)
        cols = w.any(0).nonzero().squeeze(1)
        self.all_rows = len(rows) == w.shape[0]
        self.all_cols = len(cols) == w.shape[1]
        # an index is stored (and counted) only where lines were removed
        self.register_buffer("rows", None if self.all_rows else rows)
        self.register_buffer("cols", None if self.all_cols else cols)
        self.weight = nn.Parameter(w[rows][:, cols].contiguous(), requires_grad=False)

    def forward(self, x):
        xs = x if self.all_cols else x.index_select(-1, self.cols)  # (..., kept_in)
        if self.all_rows:
            return F.linear(xs, self.weight, self.bias)
        y = x.new_zeros(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y.index_add_(-1, self.rows, F.linear(xs, self.weight))


def _rows(lin: nn.Linear, idx, bias=True) -> nn.Linear:
    new = nn.Linear(lin.in_features, len(idx), bias=bias and lin.bias is not None)
    with torch.no_grad():
        new.weight.copy_(lin.weight.detach()[idx])
        if new.bias is not None:
            new.bias.copy_(lin.bias.detach()[idx])
    return new


def _cols(lin: nn.Linear, idx) -> nn.Linear:
    new = nn.Linear(len(idx), lin.out_features, bias=lin.bias is not None)
    with torch.no_grad():
        new.weight.copy_(lin.weight.detach()[:, idx])
        if lin.bias is not None:
            new.bias.copy_(lin.bias.detach())
    return new


class CompactedMLP(MLP):
    """An MLP with pruned hidden neurons removed (d_ff -> kept)."""

    kernel_path = "compacted-dense"

    @classmethod
    def of(cls, mlp: MLP, keep: torch.Tensor | None = None) -> CompactedMLP:
        """``keep`` (d_ff,) bool: the neurons to keep; default every neuron whose ``up``
        (or ``gate``) row is not all zero, i.e. what a neuron mask left."""
        if keep is None:
            keep = mlp.up.weight.detach().any(1)
            if mlp.gated:
                keep = keep | mlp.gate.weight.detach().any(1)
        idx = keep.nonzero().squeeze(1)  # (kept,)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.gated = mlp.gated
        new.up = _rows(mlp.up, idx)
        new.gate = _rows(mlp.gate, idx) if mlp.gated else None
        new.down = _cols(mlp.down, idx)
        new.pruned_from = mlp.up.out_features
        return new.requires_grad_(False)

    def sparse_counts(self) -> tuple[int, int]:
        d = self.up.in_features
        mats = 3 if self.gated else 2
        total = mats * d * self.pruned_from
        return total - mats * d * self.up.out_features, total


class CompactedAttention(Attention):
    """Attention with pruned heads removed: Q/K/V project to kept_heads * head_dim."""

    kernel_path = "compacted-dense"

    @classmethod
    def of(cls, attn: Attention) -> CompactedAttention:
        hd = attn.head_dim
        q = attn.q.weight.detach()
        alive = q.view(attn.n_heads, hd, -1).flatten(1).any(1)  # (H,)
        heads = alive.nonzero().squeeze(1)
        idx = (heads[:, None] * hd + torch.arange(hd)).reshape(-1)  # (kept_heads * hd,)
        new = cls(attn.d_model, attn.n_heads, causal=attn.causal, dropout=attn.dropout)
        new.n_heads, new.head_dim = len(heads), hd
        new.pruned_from = attn.n_heads
        for name in ("q", "k", "v"):
            setattr(new, name, _rows(getattr(attn, name), idx))
        new.o = _cols(attn.o, idx)
        return new.requires_grad_(False)

    def sparse_counts(self) -> tuple[int, int]:
        total = 4 * self.d_model * self.d_model
        return total - 4 * self.d_model * self.n_heads * self.head_dim, total
