"""What every execution path of a (pruned) linear shares: the dense baseline and a base
class that keeps the bias and counts zeros.

A path module replaces an ``nn.Linear`` (or a masked one) and keeps its forward signature
``(..., in) -> (..., out)``; it names the kernel it runs in ``kernel_path`` (read by
:func:`labkit.measure.kernel_paths`) and reports ``sparse_counts() -> (zeros, total)`` of
the weight it stands for, so sparsity is measured the same way on every path.
"""
from __future__ import annotations

import torch
from torch import nn


class SparseLinearBase(nn.Module):
    """Keeps ``in_features``, ``out_features``, a frozen bias and the non-zero count."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        w = lin.weight.detach()
        self._nnz = int(w.count_nonzero())
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone(),
                                                               requires_grad=False)

    def sparse_counts(self) -> tuple[int, int]:
        total = self.in_features * self.out_features
        return total - self._nnz, total

    def _out(self, y_t, x):  # y_t: (out, T) -> (..., out)
        y = y_t.t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def copy_linear(lin: nn.Module, cls: type = nn.Linear) -> nn.Linear:
    """A new ``cls`` (an ``nn.Linear`` class) holding a detached copy of ``lin``'s current
    weight and bias, on its device and dtype."""
    w = lin.weight.detach()
    new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None,
              device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if lin.bias is not None:
            new.bias.copy_(lin.bias.detach())
    return new


class DenseLinear(nn.Linear):
    """The (masked) weight baked into a plain dense linear: zeros are multiplied."""

    kernel_path = "dense"

    @classmethod
    def of(cls, lin: nn.Linear, path: str = "dense") -> DenseLinear:
        new = copy_linear(lin, cls)
        new.kernel_path = path
        return new.requires_grad_(False)

    def sparse_counts(self) -> tuple[int, int]:
        return int((self.weight == 0).sum()), self.weight.numel()
