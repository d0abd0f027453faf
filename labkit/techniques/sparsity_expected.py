"""The analytic side of pruning: what a :class:`~labkit.techniques.sparsity.SparsityConfig`
leaves of each selected linear once deployed in its structure's natural storage, as
:mod:`labkit.accounting` rows (the path :func:`~labkit.techniques.sparsity.convert` builds).

Per pruned (out=r, in=c) weight, ``k`` kept weights, ``t`` tokens, ``s`` the sparsity and
``p(s, x) = round(s x)`` units pruned (at least one kept, :func:`masks.n_pruned`)::

    unstructured  k = rc - p(s, rc)      CSR   4k + 8k + 8(r+1) bytes   (fp32 values, int64
                                                                         column index, row ptr)
    nm            k = rc n/m             4k + ceil(k ceil(log2 m)/8) bytes (values, index bits)
    block b       kb = B - p(s, B), B = (r/b)(c/b) tiles, k = kb b^2
                                         BSR   4k + 8kb + 8(r/b+1) bytes
    row / column  kr = r - p(s, r): k = kr c (a kept-row index, 8kr bytes, unless all kept);
                  columns alike          compacted dense
    neuron        FFN hidden units: d_ff -> d_ff - p(s, d_ff), the up/gate rows (and their
                  biases) and down columns removed (compacted MLP)
    head          attention heads: H -> H - p(s, H); Q/K/V rows, O columns, and the SDPA
                  core shrink to the kept heads (compacted attention)

FLOPs ``2 t k`` per linear; biases are kept (except the rows neuron/head compaction
removes). ``scope="global"`` ranks every selected weight together: the total kept count is
exact, its split among layers is data dependent (spread here in proportion to size), so
only totals, not parts, are claims. Complexity: O(selected linears).
"""
from __future__ import annotations

from .. import validate as V
from ..accounting import rows, sdpa_flops
from ..kernels import masks as MK
from ..kernels.storage import layout_bytes
from .registry import register_account
from .sparsity import SparsityConfig


def check_row(name: str, row) -> None:
    """Pruning takes plain linears (or leaves ones it already masked); anything another
    technique swapped in fails here as in :func:`~labkit.techniques.sparsity.attach`."""
    if row.kind not in ("linear", "sparse"):
        raise TypeError(f"sparsity prunes nn.Linear weights; {name} is a {row.kind} layer "
                        "(apply sparsity before, or to other parts than, that technique)")


def _unstructured(row, k: int) -> None:
    row.kept = k
    row.weight_bytes = layout_bytes("csr", row.out_features, row.in_features, k)["total"]


def _per_linear(row, config: SparsityConfig) -> None:
    r, c, s, st = row.out_features, row.in_features, config.sparsity, config.structure
    if st == "unstructured":
        _unstructured(row, r * c - MK.n_pruned(s, r * c))
        return
    if st == "nm":
        row.kept = r * c // config.m * config.n
        got = layout_bytes("nm", r, c, row.kept, m=config.m)
    elif st == "block":
        b = config.block
        MK.check_block(b, (r, c))
        tiles = (r // b) * (c // b)
        kb = tiles - MK.n_pruned(s, tiles)
        row.kept = kb * b * b
        got = layout_bytes("bsr", r, c, block=b, kept_blocks=kb)
    elif st == "row":
        kr = r - MK.n_pruned(s, r)
        row.kept = kr * c
        got = layout_bytes("compacted", r, c, kept_rows=kr)
    else:  # column
        kc = c - MK.n_pruned(s, c)
        row.kept = r * kc
        got = layout_bytes("compacted", r, c, kept_cols=kc)
    row.weight_bytes = got["total"]


def _compact_neurons(table, config: SparsityConfig, done: set) -> None:
    for i in sorted({int(n.split(".")[1]) for n in rows(table, config.layers, ("ffn",))}):
        ffn = table.blocks[i].ffn
        if id(ffn) in done:
            continue
        done.add(id(ffn))
        f = ffn["up"].out_features
        kept = f - MK.n_pruned(config.sparsity, f)
        for x in ("up", "gate"):
            if x in ffn:
                ffn[x].out_features = kept
        ffn["down"].in_features = kept


def _compact_heads(table, model_cfg, config: SparsityConfig, done: set) -> None:
    h, hd = model_cfg.n_heads, model_cfg.head_dim
    kept = (h - MK.n_pruned(config.sparsity, h)) * hd
    for i in sorted({int(n.split(".")[1]) for n in rows(table, config.layers, ("attn",))}):
        attn = table.blocks[i].attn
        if id(attn["q"]) in done:
            continue
        done.add(id(attn["q"]))
        if attn["core"].kind != "sdpa":
            raise TypeError(f"head pruning compacts softmax attention; block {i} runs "
                            f"{attn['core'].kind} attention")
        for x in ("q", "k", "v"):
            attn[x].out_features = kept
        attn["o"].in_features = kept
        attn["core"].flops = sdpa_flops(table.n, table.n, kept)


@register_account(SparsityConfig)
def account(table, model_cfg, config: SparsityConfig) -> dict:
    """Edit the selected rows as deploying the pruned model does; returns the pruning's own
    numbers: ``weights_dense``, ``weights_nonzero``, ``sparsity`` (of the selected weights),
    ``bytes_dense`` and ``bytes_sparse`` (their fp32 and their deployed bytes)."""
    selected = rows(table, config.layers, config.parts)
    for name, row in selected.items():
        check_row(name, row)
    fresh = {n: r for n, r in selected.items() if r.kind == "linear"}  # masked ones stay
    dense_w = sum(r.dense_params for r in fresh.values())
    st = config.structure
    done: set = set()
    if st == "neuron":
        _compact_neurons(table, config, done)
    elif st == "head":
        _compact_heads(table, model_cfg, config, done)
    elif st == "unstructured" and config.scope == "global":
        total = dense_w - MK.n_pruned(config.sparsity, dense_w)
        left, items = total, list(fresh.values())
        for j, row in enumerate(items):  # the layer split is data dependent: by size
            k = left if j == len(items) - 1 else round(total * row.dense_params / dense_w)
            _unstructured(row, k)
            left -= k
    else:
        for row in fresh.values():
            _per_linear(row, config)
    for row in fresh.values():
        row.kind = "sparse"
    kept = sum(r.weight_params for r in fresh.values())
    stored = sum(r.bytes - (4 * r.out_features if r.bias else 0) for r in fresh.values())
    if not dense_w:
        raise V.LabkitConfigError("parts", config.parts, "parts with linears left to prune")
    return {"weights_dense": dense_w, "weights_nonzero": kept, "sparsity": 1 - kept / dense_w,
            "bytes_dense": 4 * dense_w, "bytes_sparse": stored}
