"""Execution paths a pruned linear (or FFN / attention) can run on, one small module each.

=====================  ==========================================  ====================
path                   module                                      kernel
=====================  ==========================================  ====================
dense                  :class:`~.base.DenseLinear`                 aten.linear, zeros kept
csr                    :class:`~.csr.CSRLinear`                    torch.sparse_csr @ dense
bsr                    :class:`~.bsr.BSRLinear`                    torch.sparse_bsr @ dense
block-gathered-dense   :class:`~.gathered.BlockGatheredLinear`     gather + bmm (labkit)
compacted-dense        :class:`~.compacted.CompactedLinear` / MLP   smaller dense matmul
nm-simulated           :class:`~.nm.NMLinear`                      dense (CPU; see nm.py)
=====================  ==========================================  ====================

:func:`linear_path` builds one of them; :mod:`labkit.accelerate` measures and chooses.
"""
from __future__ import annotations

from torch import nn

from .. import validate as V
from .base import DenseLinear, SparseLinearBase
from .bsr import BSRLinear
from .compacted import CompactedAttention, CompactedLinear, CompactedMLP
from .csr import CSRLinear
from .gathered import BlockGatheredLinear
from .nm import NM_CPU_NOTE, NMLinear
from .storage import layout_bytes, storage_bytes

LINEAR_PATHS = ("dense", "csr", "bsr", "block-gathered-dense", "compacted-dense",
                "nm-simulated")


def linear_path(lin: nn.Linear, path: str, block: int = 32, n: int = 2,
                m: int = 4) -> nn.Module:
    """The (masked) linear ``lin`` on one named execution path, no measuring."""
    V.choice("path", path, LINEAR_PATHS)
    make = {"dense": lambda: DenseLinear.of(lin), "csr": lambda: CSRLinear(lin),
            "bsr": lambda: BSRLinear(lin, block),
            "block-gathered-dense": lambda: BlockGatheredLinear(lin, block),
            "compacted-dense": lambda: CompactedLinear(lin),
            "nm-simulated": lambda: NMLinear.of_nm(lin, n, m)}
    return make[path]()


__all__ = ["LINEAR_PATHS", "NM_CPU_NOTE", "BSRLinear", "BlockGatheredLinear", "CSRLinear",
           "CompactedAttention", "CompactedLinear", "CompactedMLP", "DenseLinear",
           "NMLinear", "SparseLinearBase", "layout_bytes", "linear_path", "storage_bytes"]
