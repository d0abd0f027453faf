"""labkit's own block-sparse path on plain dense kernels (block-gathered dense).

Block rows are bucketed by their number k of non-zero b x b blocks; in each bucket the k
blocks of a row are packed side by side, ``W_r`` (b, k*b), the matching input rows of
``x^T`` are gathered, and one batched matmul does the whole bucket:
``y_r = W_r @ x^T[cols_r]`` (b, T). Exactly 2*T*nnzb*b^2 FLOPs (no padding), a gather of
nnzb*b*T inputs, one ``bmm`` per distinct k.
"""
from __future__ import annotations

import torch

from .base import SparseLinearBase


class BlockGatheredLinear(SparseLinearBase):
    kernel_path = "block-gathered-dense"

    def __init__(self, lin, block: int):
        super().__init__(lin)
        from . import masks as MK
        w = lin.weight.detach()
        MK.check_block(block, tuple(w.shape))
        b = self.block = block
        R, C = w.shape[0] // b, w.shape[1] // b
        self.R = R
        keep = MK.block_scores((w != 0).float(), b) > 0  # (R, C)
        cnt = keep.sum(1)
        tiles = w.view(R, b, C, b).permute(0, 2, 1, 3)  # (R, C, b_out, b_in)
        self.ks = []
        for k in sorted(set(cnt.tolist()) - {0}):
            rows = (cnt == k).nonzero().squeeze(1)  # (r_k,)
            cols = keep[rows].nonzero()[:, 1].view(len(rows), k)  # (r_k, k) ascending
            packed = tiles[rows[:, None], cols]  # (r_k, k, b_out, b_in)
            packed = packed.permute(0, 2, 1, 3).reshape(len(rows), b, k * b)  # (r_k, b, k*b)
            self.register_buffer(f"rows_{k}", rows)
            self.register_buffer(f"cols_{k}", (cols[:, :, None] * b + torch.arange(b))
                                 .reshape(-1))
            self.register_buffer(f"packed_{k}", packed.contiguous())
            self.ks.append(k)

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features)  # (T, in)
        xt = x2.t().contiguous()  # (in, T)
        t = xt.shape[1]
        y = xt.new_zeros(self.R, self.block, t)  # (R, b, T)
        for k in self.ks:
            rows = getattr(self, f"rows_{k}")
            g = xt.index_select(0, getattr(self, f"cols_{k}")).view(len(rows), k * self.block, t)
            y.index_copy_(0, rows, torch.bmm(getattr(self, f"packed_{k}"), g))  # (r_k, b, T)
        return self._out(y.view(self.out_features, t), x)
