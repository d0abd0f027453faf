"""Bytes a (masked) weight takes on each storage layout, index metadata counted.

dense 4*out*in; CSR 4*nnz + 8*nnz + 8*(out+1); BSR 4*nnzb*b^2 + 8*nnzb + 8*(out/b+1);
N:M 4*nnz + ceil(log2 M)/8 per kept value; compacted the kept rows x kept columns (+ 8
bytes an index when a single layer keeps its outer shape).
"""
from __future__ import annotations

import math

import torch

from .. import validate as V

LAYOUTS = ("dense", "csr", "bsr", "nm", "compacted", "bitmap")


def layout_bytes(layout: str, rows: int, cols: int, kept: int = 0, *, element_bytes: int = 4,
                 index_bytes: int = 8, block: int = 32, kept_blocks: int = 0, m: int = 4,
                 kept_rows: int | None = None, kept_cols: int | None = None) -> dict:
    """The one storage formula, for the analytic claims and the measured weights alike:
    bytes of a (rows, cols) weight stored on ``layout`` with ``kept`` values (csr, nm,
    bitmap), ``kept_blocks`` b x b tiles (bsr) or ``kept_rows`` x ``kept_cols`` (compacted).
    ``{"values", "index", "total"}``; ``bitmap`` is one bit per entry (an INT8 sparse
    layout)."""
    V.choice("layout", layout, LAYOUTS)
    el, ib = element_bytes, index_bytes
    if layout == "dense":
        values, index = rows * cols * el, 0
    elif layout == "csr":
        values, index = kept * el, (kept + rows + 1) * ib
    elif layout == "bsr":
        values, index = kept_blocks * block * block * el, (kept_blocks + rows // block + 1) * ib
    elif layout == "nm":
        values, index = kept * el, math.ceil(kept * math.ceil(math.log2(m)) / 8)
    elif layout == "compacted":  # the kept rows x kept columns dense block, plus their indices
        r = rows if kept_rows is None else kept_rows
        c = cols if kept_cols is None else kept_cols
        values, index = r * c * el, ib * ((r if r < rows else 0) + (c if c < cols else 0))
    else:
        values, index = kept * el, math.ceil(rows * cols / 8)
    return {"values": values, "index": index, "total": values + index}


def storage_bytes(weight: torch.Tensor, path: str, block: int = 32, n: int = 2,
                  m: int = 4, index_bytes: int = 8) -> dict:
    """Bytes to store ``weight`` on ``path``: ``{"values", "index", "total"}``, from the
    weight's own zeros (:func:`layout_bytes`).

    ``index_bytes`` is 8 for torch's default int64 CSR/BSR indices (4 if converted)."""
    from . import masks as MK

    V.choice("path", path, ("dense", "csr", "bsr", "nm", "compacted"))
    w = weight.detach()
    rows, cols = w.shape
    common = dict(element_bytes=w.element_size(), index_bytes=index_bytes)
    if path == "bsr":
        MK.check_block(block, tuple(w.shape))
        nzb = int((MK.block_scores((w != 0).float(), block) > 0).sum())
        return layout_bytes("bsr", rows, cols, block=block, kept_blocks=nzb, **common)
    if path == "nm":
        MK.check_nm(n, m, cols)
        return layout_bytes("nm", rows, cols, rows * cols // m * n, m=m, **common)
    if path == "compacted":
        return layout_bytes("compacted", rows, cols, kept_rows=int(w.any(1).sum()),
                            kept_cols=int(w.any(0).sum()), **common)
    return layout_bytes(path, rows, cols, int(w.count_nonzero()), **common)
