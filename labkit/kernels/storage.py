"""Bytes a (masked) weight takes on each storage layout, index metadata counted.

dense 4*out*in; CSR 4*nnz + 8*nnz + 8*(out+1); BSR 4*nnzb*b^2 + 8*nnzb + 8*(out/b+1);
N:M 4*nnz + ceil(log2 M)/8 per kept value; compacted the kept rows x kept columns (+ 8
bytes an index when a single layer keeps its outer shape).
"""
from __future__ import annotations

import math

import torch

from .. import validate as V


def storage_bytes(weight: torch.Tensor, path: str, block: int = 32, n: int = 2,
                  m: int = 4, index_bytes: int = 8) -> dict:
    """Bytes to store ``weight`` on ``path``: ``{"values", "index", "total"}``.

    ``index_bytes`` is 8 for torch's default int64 CSR/BSR indices (4 if converted)."""
    from . import masks as MK

    V.choice("path", path, ("dense", "csr", "bsr", "nm", "compacted"))
    w = weight.detach()
    el = w.element_size()
    nnz = int(w.count_nonzero())
    rows, cols = w.shape
    if path == "dense":
        values, index = w.numel() * el, 0
    elif path == "csr":
        values, index = nnz * el, nnz * index_bytes + (rows + 1) * index_bytes
    elif path == "bsr":
        MK.check_block(block, tuple(w.shape))
        nzb = int((MK.block_scores((w != 0).float(), block) > 0).sum())
        values = nzb * block * block * el
        index = nzb * index_bytes + (rows // block + 1) * index_bytes
    elif path == "nm":
        MK.check_nm(n, m, cols)
        kept = rows * cols // m * n
        values, index = kept * el, math.ceil(kept * math.ceil(math.log2(m)) / 8)
    else:  # compacted: the kept rows x kept columns dense block, plus their indices
        r = int(w.any(1).sum())
        c = int(w.any(0).sum())
        values = r * c * el
        index = index_bytes * ((r if r < rows else 0) + (c if c < cols else 0))
    return {"values": values, "index": index, "total": values + index}
