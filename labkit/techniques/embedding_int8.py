"""Embedding tables stored in INT8: int8 codes with one fp32 scale per row.

Paper: Shen et al. (2020), *Q-BERT: Hessian Based Ultra Low Precision Quantization of BERT*,
quantizes the embeddings with the rest of the model; on a small BERT such as MiniLM
(30,522 x 384 word vectors) the embeddings are half the fp32 bytes, so a claim about the
memory of the whole model ("INT8 + 50% sparsity halves memory") is not met by quantizing
the linears alone.

Idea: a lookup reads one row per token, so each row gets its own symmetric scale (a rare
token's small vector keeps its precision next to a frequent token's large one):

    s_v = max_d |E[v, d]| / 127,      C[v, d] = round(E[v, d] / s_v) in [-127, 127]
    embed(ids) = C[ids] * s_ids                     |E - s C| <= s_v / 2 per entry

Memory: ``V (D + 4)`` bytes for a (V, D) table against ``4 V D`` (ratio ``(D + 4) / 4D``,
0.2526 at D = 384). Time: a gather of int8 rows plus one multiply per element, about the
cost of the fp32 gather (memory traffic is what a lookup costs). Tables: the word
embeddings ``embed``, positions ``pos``, segments ``token_type``, those the model has. A
decoder's word embeddings are tied to its LM head (a linear): they are refused here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import validate as V
from .registry import register, register_account, swap_modules

TABLES = ("embed", "pos", "token_type")


class Int8Embedding(nn.Module):
    """``forward(ids) -> (..., D)`` like ``nn.Embedding``, from int8 codes (a frozen int8
    parameter, so parameter counts stay those of the table) and per-row fp32 scales (a
    buffer)."""

    kernel_path = "int8 embedding: aten.embedding gather of int8 rows x per-row fp32 scale"

    def __init__(self, emb: nn.Embedding):
        super().__init__()
        if emb.max_norm is not None:
            raise V.LabkitConfigError("max_norm", emb.max_norm, "None (a renormalising "
                                      "lookup rewrites the table it reads)")
        w = emb.weight.detach().float()  # (V, D)
        scale = w.abs().amax(1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0  # (V,)
        codes = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
        self.codes = nn.Parameter(codes, requires_grad=False)  # (V, D) int8
        self.register_buffer("scales", scale)
        self.num_embeddings, self.embedding_dim = w.shape
        self.padding_idx = emb.padding_idx

    def forward(self, ids):  # (...) -> (..., D)
        rows = F.embedding(ids, self.codes)  # (..., D) int8
        return rows.float() * self.scales[ids].unsqueeze(-1)

    def dequantized(self) -> torch.Tensor:
        """The (V, D) fp32 table the codes stand for."""
        return self.codes.float() * self.scales[:, None]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 codes + per-row scale"


def table_bytes(num: int, dim: int) -> int:
    """Stored bytes of an INT8 (num, dim) table: codes and one fp32 scale per row."""
    return num * dim + 4 * num


@dataclass(frozen=True)
class EmbeddingInt8Config:
    """Store the embedding ``tables`` the model has as :class:`Int8Embedding`."""

    tables: tuple[str, ...] = TABLES

    def __post_init__(self):
        t = self.tables
        if isinstance(t, str):
            t = tuple(x for x in t.replace(" ", "").split(",") if x)
        if isinstance(t, list):
            t = tuple(t)
        if not isinstance(t, tuple) or not t or len(set(t)) != len(t) or \
                any(x not in TABLES for x in t):
            raise V.LabkitConfigError("tables", self.tables,
                                      f"a non-empty tuple of distinct names from {TABLES}")
        object.__setattr__(self, "tables", t)

    def check(self, model_cfg) -> None:
        if model_cfg.kind == "decoder" and "embed" in self.tables:
            raise V.LabkitConfigError("tables", self.tables, "tables without 'embed' for a "
                                      "decoder (its word embeddings are tied to the LM head)")


@register(EmbeddingInt8Config)
def embedding_int8_(model: nn.Module, config: EmbeddingInt8Config) -> nn.Module:
    names = set(config.tables)
    swapped = swap_modules(model, lambda n, m: n in names and type(m) is nn.Embedding,
                           lambda n, m: Int8Embedding(m))
    if not swapped and not any(isinstance(getattr(model, n, None), Int8Embedding)
                               for n in names):
        raise V.LabkitConfigError("tables", config.tables,
                                  "tables the model has as nn.Embedding (found none)")
    return model


@register_account(EmbeddingInt8Config)
def _account(table, model_cfg, config: EmbeddingInt8Config) -> dict:
    """Each selected table the model has: ``V (D + 4)`` bytes instead of ``4 V D``;
    parameters (the codes) and FLOPs (none: a lookup) unchanged."""
    before = after = 0
    for name in config.tables:
        shape = table.embeddings.get(name)
        if shape is None or name in table.other_stored:
            continue
        table.other_stored[name] = (shape[0] * shape[1], table_bytes(*shape))
        before += 4 * shape[0] * shape[1]
        after += table_bytes(*shape)
    return {"embedding_bytes_fp32": before, "embedding_bytes": after}


__all__ = ["TABLES", "EmbeddingInt8Config", "Int8Embedding", "embedding_int8_", "table_bytes"]
