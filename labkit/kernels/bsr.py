"""Block sparsity on torch's BSR kernel (block-sparse rows of b x b tiles).

``y = (W_bsr @ x^T)^T``: 2*T*nnzb*b^2 FLOPs. Memory: 4*nnzb*b^2 values + 8*nnzb block
column indices + 8*(out/b+1) block row pointers.
"""
from __future__ import annotations

import torch

from .base import SparseLinearBase
from .csr import _beta_quiet


class BSRLinear(SparseLinearBase):
    """y = (W_bsr @ x^T)^T with torch's block-sparse row matmul (b x b blocks)."""

    kernel_path = "bsr"

    def __init__(self, lin, block: int):
        super().__init__(lin)
        from . import masks as MK
        MK.check_block(block, tuple(lin.weight.shape))
        self.block = block
        bsr = _beta_quiet(lambda: lin.weight.detach().to_sparse_bsr((block, block)))
        self.register_buffer("crow", bsr.crow_indices())
        self.register_buffer("col", bsr.col_indices())
        self.register_buffer("values", bsr.values())  # (nnzb, b, b)

    def forward(self, x):
        w = torch.sparse_bsr_tensor(self.crow, self.col, self.values,
                                    (self.out_features, self.in_features),
                                    check_invariants=False)
        x2 = x.reshape(-1, self.in_features)  # (T, in)
        return self._out(w @ x2.t().contiguous(), x)
