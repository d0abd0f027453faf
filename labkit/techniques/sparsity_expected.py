"""The analytic side of pruning: non-zero weights, FLOPs and bytes a
:class:`~labkit.techniques.sparsity.SparsityConfig` leaves in a model config.

Per pruned (out, in) weight: kept = out*in - round(s*out*in) (unstructured), out*in*n/m
(N:M), kept b x b tiles * b^2 (block), kept rows * in / out * kept columns (row / column),
and for neuron / head groups the kept hidden units / heads times their matrices. FLOPs per
token are 2 per kept weight. Bytes are the structure's natural storage (CSR for
unstructured, BSR for block, values + index bits for N:M, compacted dense for
rows/columns/neurons/heads), against dense fp32, as :func:`labkit.kernels.storage_bytes`
counts them.
"""
from __future__ import annotations

import math

from . import masks as MK
from .registry import block_indices, register_expected
from .sparsity import SparsityConfig


@register_expected(SparsityConfig)
def expected(model_cfg, config: SparsityConfig) -> dict:
    """Analytic change of pruning ``config`` on a model of ``model_cfg``: non-zero weight
    count, FLOPs per token of the pruned matmuls (2 per weight), and weight bytes in the
    structure's natural storage (CSR for unstructured, BSR for block, values + N:M metadata,
    compacted dense for rows/columns/neurons/heads), all against dense fp32."""
    d, f = model_cfg.d_model, model_cfg.d_ff
    gated = model_cfg.kind == "decoder"
    ffn = [(f, d)] * (2 if gated else 1) + [(d, f)]
    attn = [(d, d)] * 4
    n_layers = len(block_indices(model_cfg.n_layers, config.layers))
    shapes = (ffn if "ffn" in config.parts else []) + (attn if "attn" in config.parts else [])
    shapes = shapes * n_layers
    dense_w = sum(r * c for r, c in shapes)
    s, st = config.sparsity, config.structure
    kept_w = 0
    sparse_bytes = 0
    if st == "unstructured" and config.scope == "global":
        kept_w = dense_w - MK.n_pruned(s, dense_w)
        sparse_bytes = None  # per-layer nnz is data dependent
    for r, c in shapes:
        if st == "unstructured" and config.scope == "layer":
            k = r * c - MK.n_pruned(s, r * c)
            kept_w += k
            sparse_bytes += 4 * k + 8 * k + 8 * (r + 1)
        elif st == "nm":
            k = r * c // config.m * config.n
            kept_w += k
            sparse_bytes += 4 * k + math.ceil(k * math.ceil(math.log2(config.m)) / 8)
        elif st == "block":
            b = config.block
            nb = (r // b) * (c // b)
            kb = nb - MK.n_pruned(s, nb)
            kept_w += kb * b * b
            sparse_bytes += 4 * kb * b * b + 8 * kb + 8 * (r // b + 1)
        elif st == "row":
            kr = r - MK.n_pruned(s, r)
            kept_w += kr * c
            sparse_bytes += 4 * kr * c + (8 * kr if kr < r else 0)
        elif st == "column":
            kc = c - MK.n_pruned(s, c)
            kept_w += r * kc
            sparse_bytes += 4 * r * kc + (8 * kc if kc < c else 0)
    if st == "neuron":
        kf = f - MK.n_pruned(s, f)
        per = (2 if gated else 1) * kf * d + d * kf
        kept_w += per * n_layers
        sparse_bytes += 4 * per * n_layers
        if "attn" in config.parts:
            kept_w += 4 * d * d * n_layers
            sparse_bytes += 4 * 4 * d * d * n_layers
    if st == "head":
        h = model_cfg.n_heads
        kh = h - MK.n_pruned(s, h)
        per = 4 * d * kh * model_cfg.head_dim
        kept_w += per * n_layers
        sparse_bytes += 4 * per * n_layers
        if "ffn" in config.parts:
            fw = sum(r * c for r, c in ffn) * n_layers
            kept_w += fw
            sparse_bytes += 4 * fw
    out = {"weights_dense": dense_w, "weights_nonzero": kept_w,
           "params": kept_w - dense_w, "flops_per_token": 2 * (kept_w - dense_w),
           "bytes_dense": 4 * dense_w, "sparsity": 1 - kept_w / dense_w}
    if sparse_bytes is not None:
        out["bytes_sparse"] = sparse_bytes
        out["bytes"] = sparse_bytes - 4 * dense_w
    return out
