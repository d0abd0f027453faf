"""The analytic side of claimed vs measured: parameters, FLOPs and bytes of a model config,
and of the same model after any stack of techniques.

Idea: describe a model as the modules that matter for the counts, one table for every
technique. The table is read off a meta-device build of :class:`labkit.model.Transformer`
(no memory, no compute), so it follows the model code instead of re-deriving it:

* a :class:`Linear` row per linear layer (``blocks.i.attn.q`` ... ``blocks.i.ffn.down``,
  ``pooler``, ``head``), with how many tokens it sees in one forward pass;
* an :class:`AttentionCore` per block: the score/weighted-sum work between the linears
  (softmax SDPA, Linformer's projected keys, kernel features);
* the other parameters (embeddings, norms) and buffers, which no technique here touches.

A technique registers ``account(table, model_cfg, config)`` with
:func:`labkit.techniques.registry.register` (the one registry);
it edits the table the way ``apply_`` edits the model (factorize a row, point a block's
FFN at block 0's, ...). Shared modules are one Python object in the table exactly as in the
model, so parameters are counted once per object and FLOPs once per use.

Counting conventions (those of :func:`labkit.measure.forward_flops` and
:func:`labkit.model.count_params`): one forward pass, batch 1, ``n`` tokens (default the
model's ``max_len``); 2 FLOPs per multiply-add of a matmul, element-wise work not counted;
SDPA counted as ``4 n_q n_k D`` (causal not discounted, as torch's counter does); fp32 bytes
for parameters unless a technique says otherwise, plus every buffer::

    linear (in -> out, bias b), t tokens:   params in*out + b*out         FLOPs 2 t in out
    rank-r factorized:                      params r (in + out) + b*out   FLOPs 2 t r (in + out)
    softmax attention core, per block:      FLOPs 4 n^2 D

:func:`labkit.techniques.registry.expected` returns one schema for every technique and every stack: ``*_before``,
``*_after`` and ``*_ratio`` (before / after, > 1 means smaller or cheaper) for ``params``,
``flops`` and ``bytes``, and the same split by part (``attn``, ``attn_core``, ``ffn``,
``head``, ``other``), and ``detail`` (what a technique adds beyond the totals: a sparsity,
a latency cut). Techniques that change the stored format (pruning, INT8, fake
quantization) are counted as deployed: pruned weights in their structure's storage (CSR,
BSR, N:M values and index bits, compacted rows/neurons/heads), quantized weights as codes
plus scales. Complexity: O(modules) per call.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .model import ModelConfig
from .scope import block_indices, expand_parts

PART_NAMES = ("attn", "attn_core", "ffn", "head", "other")


@dataclass
class Linear:
    """One linear layer as the counts see it, and what the model holds there (``kind``:
    ``linear`` a plain ``nn.Linear``; ``lowrank``, ``sparse``, ``fakequant``, ``int8`` once a
    technique swapped it, so the next technique takes or leaves it exactly as its model
    selector does). ``rank``: factorized ``U V^T``; ``kept``: stored non-zero weights after
    pruning; ``weight_bytes``: stored bytes of the weight when not dense fp32 (quantised
    codes and scales, sparse values and indices); ``adapter_rank``: a LoRA adapter
    ``B A`` beside the weight."""

    in_features: int
    out_features: int
    bias: bool
    tokens: int
    rank: int | None = None
    kept: int | None = None
    weight_bytes: int | None = None
    adapter_rank: int | None = None
    kind: str = "linear"
    tied: bool = False  # the weight is an embedding's (counted there): FLOPs only

    @property
    def dense_params(self) -> int:
        """Weights of the matrix as it is shaped (full or factorized), before pruning."""
        i, o = self.in_features, self.out_features
        return i * o if self.rank is None else self.rank * (i + o)

    @property
    def weight_params(self) -> int:
        return self.dense_params if self.kept is None else self.kept

    @property
    def adapter_params(self) -> int:
        r = self.adapter_rank
        return 0 if r is None else r * (self.in_features + self.out_features)

    @property
    def params(self) -> int:
        return ((0 if self.tied else self.weight_params) + self.adapter_params
                + (self.out_features if self.bias else 0))

    @property
    def bytes(self) -> int:
        w = 4 * self.weight_params if self.weight_bytes is None else self.weight_bytes
        return ((0 if self.tied else w) + 4 * self.adapter_params
                + (4 * self.out_features if self.bias else 0))

    @property
    def flops(self) -> int:
        return 2 * self.tokens * (self.weight_params + self.adapter_params)


@dataclass
class AttentionCore:
    """The attention work between the Q/K/V and output linears of one block, and what it
    owns besides them (Linformer's ``E``/``F`` as ``params``, random features as buffers)."""

    flops: int
    params: dict = field(default_factory=dict)  # {key: count}; a shared key counts once
    buffer_bytes: int = 0
    kind: str = "sdpa"


@dataclass
class Block:
    """One block's modules: ``attn`` (linears q, k, v, o and ``core``) and ``ffn``
    (linears up, gate, down). Sharing makes several blocks hold the same objects."""

    attn: dict
    ffn: dict
    norm_params: int
    runs: bool = True  # False: the block is kept but skipped at inference (no FLOPs)


@dataclass
class Table:
    cfg: ModelConfig
    n: int
    blocks: list
    head: dict  # {name: Linear} outside the blocks
    other_params: int  # embeddings and final norm (norms inside blocks are per block)
    buffer_bytes: int
    embeddings: dict = field(default_factory=dict)  # {name: (rows, dim)}, in other_params
    # {name: (params, stored bytes)}: tables of other_params stored other than as fp32
    other_stored: dict = field(default_factory=dict)

    def totals(self) -> dict:
        """``{part: {"params", "flops", "bytes"}}`` and ``"total"``; parameters and bytes
        once per distinct object, FLOPs once per use."""
        out = {p: {"params": 0, "flops": 0, "bytes": 0} for p in PART_NAMES}
        seen: set[int] = set()
        keys: set = set()

        def add(part, obj, params, flops, nbytes):
            out[part]["flops"] += flops
            if id(obj) not in seen:
                seen.add(id(obj))
                out[part]["params"] += params
                out[part]["bytes"] += nbytes

        for b in self.blocks:
            run = int(b.runs)
            for name in ("q", "k", "v", "o"):
                lin = b.attn[name]
                add("attn", lin, lin.params, run * lin.flops, lin.bytes)
            core = b.attn["core"]
            own = sum(c for k, c in core.params.items() if k not in keys)
            if id(core) not in seen:
                keys.update(core.params)
            add("attn_core", core, own, run * core.flops, 4 * own + core.buffer_bytes)
            for lin in b.ffn.values():
                add("ffn", lin, lin.params, run * lin.flops, lin.bytes)
            out["other"]["params"] += b.norm_params
            out["other"]["bytes"] += 4 * b.norm_params
        for lin in self.head.values():
            add("head", lin, lin.params, lin.flops, lin.bytes)
        out["other"]["params"] += self.other_params
        fp32_params = self.other_params - sum(p for p, _ in self.other_stored.values())
        out["other"]["bytes"] += (4 * fp32_params + self.buffer_bytes
                                  + sum(b for _, b in self.other_stored.values()))
        out["total"] = {k: sum(out[p][k] for p in PART_NAMES)
                        for k in ("params", "flops", "bytes")}
        return out


def sdpa_flops(n_q: int, n_k: int, d_model: int) -> int:
    """Scores and weighted sum of softmax attention, batch 1: ``2 * 2 * n_q * n_k * D``."""
    return 4 * n_q * n_k * d_model


def _meta_model(cfg: ModelConfig) -> nn.Module:
    from .model import Transformer

    with torch.device("meta"):
        return Transformer(cfg)


def _row(m: nn.Linear, tokens: int, tied: bool = False) -> Linear:
    return Linear(m.in_features, m.out_features, m.bias is not None, tokens, tied=tied)


def table(cfg: ModelConfig, n: int | None = None) -> Table:
    """The dense model's table at ``n`` tokens (default ``max_len``), read off a meta build."""
    n = cfg.max_len if n is None else n
    model = _meta_model(cfg)
    blocks = []
    for blk in model.blocks:
        attn = {x: _row(getattr(blk.attn, x), n) for x in ("q", "k", "v", "o")}
        attn["core"] = AttentionCore(sdpa_flops(n, n, cfg.d_model))
        ffn = {x: _row(getattr(blk.ffn, x), n) for x in ("up", "gate", "down")
               if isinstance(getattr(blk.ffn, x, None), nn.Linear)}
        linear_ids = {id(p) for m in (blk.attn, blk.ffn) for p in m.parameters()}
        norms = sum(p.numel() for p in blk.parameters() if id(p) not in linear_ids)
        blocks.append(Block(attn, ffn, norms))
    inside = {id(p) for p in model.blocks.parameters()}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head, head_ids = {}, set()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and not name.startswith("blocks."):
            # the encoder's pooler and head see the [CLS] state only; the LM head every token
            head[name] = _row(m, 1 if cfg.kind == "encoder" else n,
                              tied=id(m.weight) in embeddings)
            head_ids.update(id(p) for p in m.parameters() if id(p) not in embeddings)
    other = {id(p): p.numel() for p in model.parameters()
             if id(p) not in inside and id(p) not in head_ids}
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    tables = {name: tuple(m.weight.shape) for name, m in model.named_children()
              if isinstance(m, nn.Embedding)}
    return Table(cfg, n, blocks, head, sum(other.values()), buffers, tables)


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def summary(before: Table, after: Table, techniques=()) -> dict:
    """The one schema: totals of two tables and their ratios, overall and per part."""
    tb, ta = before.totals(), after.totals()
    metrics = ("params", "flops", "bytes")
    out = {"techniques": list(techniques), "seq_len": before.n}
    for k in metrics:
        out[f"{k}_before"], out[f"{k}_after"] = tb["total"][k], ta["total"][k]
        out[f"{k}_ratio"] = _ratio(tb["total"][k], ta["total"][k])
    out["parts"] = {p: {**{f"{k}_before": tb[p][k] for k in metrics},
                        **{f"{k}_after": ta[p][k] for k in metrics},
                        **{f"{k}_ratio": _ratio(tb[p][k], ta[p][k]) for k in metrics}}
                    for p in PART_NAMES}
    return out


def rows(table: Table, layers: tuple = (), parts: tuple = ("attn", "ffn")) -> dict:
    """``{name: Linear}`` of the rows ``layers``/``parts`` select (the registry's
    vocabulary), each distinct object once (a shared FFN appears under its first block):
    the table's counterpart of :func:`labkit.techniques.registry.linears`."""
    fine = expand_parts(parts)
    out, seen = {}, set()
    for i in block_indices(len(table.blocks), layers):
        b = table.blocks[i]
        for p in fine:
            if p == "head":
                continue
            part, x = p.split(".")
            row = getattr(b, part).get(x)
            if row is not None and id(row) not in seen:
                seen.add(id(row))
                out[f"blocks.{i}.{p}"] = row
    if "head" in fine:
        out.update({k: r for k, r in table.head.items() if not r.tied and id(r) not in seen})
    return out


def params(cfg: ModelConfig) -> int:
    """Parameters of the dense model (what :func:`labkit.model.count_params` counts)."""
    return table(cfg).totals()["total"]["params"]


def linear_shapes(cfg: ModelConfig, head: bool = False) -> dict[str, tuple[int, int]]:
    """``{name: (out, in)}`` of every linear in the blocks (and outside them, with
    ``head``): the one linear-shape table."""
    t = table(cfg)
    out = {}
    for i, b in enumerate(t.blocks):
        for part, rows in (("attn", b.attn), ("ffn", b.ffn)):
            for x, r in rows.items():
                if isinstance(r, Linear):
                    out[f"blocks.{i}.{part}.{x}"] = (r.out_features, r.in_features)
    if head:
        out.update({k: (r.out_features, r.in_features) for k, r in t.head.items()})
    return out


__all__ = [
    "PART_NAMES",
    "AttentionCore",
    "Block",
    "Linear",
    "Table",
    "linear_shapes",
    "params",
    "rows",
    "sdpa_flops",
    "summary",
    "table",
]
