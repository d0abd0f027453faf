"""Unstructured sparsity on torch's CSR kernel (compressed sparse rows; MKL on CPU builds
that have it).

``y = (W_csr @ x^T)^T``: 2*T*nnz FLOPs plus one index read per non-zero. Memory:
4*nnz values + 8*nnz column indices + 8*(out+1) row pointers (int64, as torch stores them).
"""
from __future__ import annotations

import warnings

import torch

from .base import SparseLinearBase


def _beta_quiet(fn):
    """torch warns that sparse CSR/BSR are "in beta state" at every conversion: that is
    torch's status, not a labkit result, so only that one message is filtered."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is in beta state.*")
        return fn()


class CSRLinear(SparseLinearBase):
    """y = (W_csr @ x^T)^T with torch's sparse CSR matmul."""

    kernel_path = "csr"

    def __init__(self, lin):
        super().__init__(lin)
        csr = _beta_quiet(lambda: lin.weight.detach().to_sparse_csr())
        self.register_buffer("crow", csr.crow_indices())
        self.register_buffer("col", csr.col_indices())
        self.register_buffer("values", csr.values())

    def forward(self, x):  # (..., in) -> (..., out)
        w = torch.sparse_csr_tensor(self.crow, self.col, self.values,
                                    (self.out_features, self.in_features),
                                    check_invariants=False)
        x2 = x.reshape(-1, self.in_features)  # (T, in)
        return self._out(w @ x2.t(), x)  # (out, T)
