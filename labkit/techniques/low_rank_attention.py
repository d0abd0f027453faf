"""Low-rank (Linformer) attention.

Paper: Wang, Li, Khabsa, Fang, Ma (2020), "Linformer: Self-Attention with Linear
Complexity", arXiv:2006.04768.

Idea: the ``n x n`` softmax attention matrix ``P = softmax(Q K^T / sqrt(d))`` of a trained
transformer is approximately low rank (its singular values decay fast; see
:func:`labkit.labs.attention.spectrum_rows`). Linformer projects keys and values along the
*sequence* axis with learned ``k x n`` matrices ``E`` and ``F`` before attending, so every
query attends to ``k`` mixed "summary" rows instead of ``n`` tokens:

    head = softmax(Q (E K)^T / sqrt(d)) (F V)          E, F in R^{k x n}

Complexity per layer (model width D = H * d): the projections ``E K``, ``F V`` and the
attention itself each cost ``2 * 2 * n * k * D`` FLOPs, against ``2 * 2 * n * n * D`` for
dense attention; memory for the scores drops from ``H n^2`` to ``H n k``. The price is
``2 k n`` parameters per layer (``k n`` with ``share="kv"``, ``k n`` in total with
``share="layerwise"``), a fixed maximum length ``n`` and no causal masking: mixing tokens
along the sequence before attending lets every position see the future, so Linformer is
for encoders only.

Sharing modes (the paper's Section 4): ``"none"`` one ``E`` and one ``F`` per layer, shared
by the heads (the paper's "headwise" sharing); ``"kv"`` ``E = F`` per layer; ``"layerwise"``
one matrix for ``E`` and ``F`` of every layer.

Sequences shorter than ``n`` use the first ``N`` columns of ``E`` and ``F``; padded keys and
values are zeroed before projecting, so padding never leaks into the summaries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import validate as V
from ..accounting import AttentionCore, sdpa_flops
from ..model import Attention, ModelConfig
from .registry import block_indices, register, register_account, scope_fields, swap_attention

SHARE_MODES = ("none", "kv", "layerwise")


@dataclass(frozen=True)
class LowRankAttentionConfig:
    """Linformer attention with ``k`` projected rows.

    ``seq_len`` is the projection length ``n`` (default: the model's ``max_len``);
    ``layers`` picks the blocks to convert (``()``: every block).
    """

    k: int = 32
    share: str = "none"
    seq_len: int | None = None
    layers: tuple[int, ...] = ()

    def __post_init__(self):
        V.integer("k", self.k, 1)
        V.choice("share", self.share, SHARE_MODES)
        if self.seq_len is not None:
            V.integer("seq_len", self.seq_len, 1)
            if self.k > self.seq_len:
                raise V.LabkitConfigError(
                    "k", self.k, f"a rank k <= seq_len={self.seq_len} (the projection "
                                 "cannot have more rows than the sequence it summarises)")
        scope_fields(self)

    def length(self, model_cfg: ModelConfig) -> int:
        """The projection length ``n``: ``seq_len``, or the model's ``max_len``."""
        return self.seq_len if self.seq_len is not None else model_cfg.max_len

    def check(self, model_cfg: ModelConfig) -> None:
        """Model checks (called by ``apply_`` and ``expected``): an encoder, ``n`` within
        the model's ``max_len``, ``k <= n``."""
        if model_cfg.kind == "decoder":
            raise V.LabkitConfigError(
                "kind", model_cfg.kind,
                "an encoder model: Linformer projects keys/values along the sequence, which "
                "mixes future tokens into every position, so it cannot be causal "
                "(use KernelAttentionConfig for decoders)")
        n = self.length(model_cfg)
        if n > model_cfg.max_len:
            raise V.LabkitConfigError("seq_len", n,
                                      f"at most the model's max_len={model_cfg.max_len}")
        if self.k > n:
            raise V.LabkitConfigError("k", self.k, f"a rank k <= n={n} (the sequence length "
                                                   "the projection summarises)")


def _projection(k: int, n: int) -> nn.Parameter:
    # The paper's Johnson-Lindenstrauss construction: entries N(0, 1/k).
    return nn.Parameter(torch.randn(k, n) / math.sqrt(k))


class LinformerAttention(Attention):
    """:class:`labkit.model.Attention` whose :meth:`attend` projects K and V to ``k`` rows."""

    kernel_path = "linformer:sdpa"

    def __init__(self, d_model: int, n_heads: int, causal: bool = False, dropout: float = 0.0,
                 k: int = 32, seq_len: int = 128, share: str = "none",
                 E: nn.Parameter | None = None):
        if causal:
            raise V.LabkitConfigError(
                "causal", causal, "False: Linformer's sequence projection mixes future tokens "
                                  "into every position, so it has no causal form")
        super().__init__(d_model, n_heads, causal=False, dropout=dropout)
        V.choice("share", share, SHARE_MODES)
        V.integer("k", k, 1, seq_len)
        self.rank, self.seq_len, self.share = k, seq_len, share
        self.E = E if E is not None else _projection(k, seq_len)  # (k, n)
        if tuple(self.E.shape) != (k, seq_len):
            raise V.LabkitConfigError("E", tuple(self.E.shape), f"shape ({k}, {seq_len})")
        self.F = None if share in ("kv", "layerwise") else _projection(k, seq_len)  # (k, n)

    def projections(self, n: int):
        """``E`` and ``F`` restricted to the first ``n`` positions, each (k, n)."""
        if n > self.seq_len:
            raise V.LabkitConfigError(
                "sequence length", n, f"at most the Linformer projection length {self.seq_len}")
        e = self.E[:, :n]
        f = e if self.F is None else self.F[:, :n]
        return e, f

    def attend(self, q, k, v, key_padding_mask=None):
        # q, k, v: (B, H, N, Dh); key_padding_mask: (B, N) True = padding
        e, f = self.projections(k.shape[-2])  # (k, N)
        if key_padding_mask is not None:
            keep = (~key_padding_mask)[:, None, :, None].to(k.dtype)  # (B, 1, N, 1)
            k, v = k * keep, v * keep
        kp = torch.matmul(e, k)  # (B, H, k, Dh)
        vp = torch.matmul(f, v)  # (B, H, k, Dh)
        return F.scaled_dot_product_attention(
            q, kp, vp, dropout_p=self.dropout if self.training else 0.0)  # (B, H, N, Dh)

    def extra_repr(self) -> str:
        return f"k={self.rank}, seq_len={self.seq_len}, share={self.share!r}"


@register(LowRankAttentionConfig)
def low_rank_attention_(model, config: LowRankAttentionConfig):
    """Replace the attention of the chosen blocks with :class:`LinformerAttention`."""
    n = config.length(model.cfg)
    shared = _projection(config.k, n) if config.share == "layerwise" else None
    if shared is not None:
        shared.data = shared.data.to(next(model.parameters()).device)
    return swap_attention(model, config.layers, lambda i, old: LinformerAttention.like(
        old, k=config.k, seq_len=n, share=config.share, E=shared))


@register_account(LowRankAttentionConfig)
def _account(table, model_cfg: ModelConfig, config: LowRankAttentionConfig) -> None:
    """Per converted block, at ``N`` tokens: SDPA over ``k`` keys ``4 N k D`` plus the
    ``E K`` and ``F V`` projections ``2 * 2 k N D``; parameters ``E``, ``F`` (``k n``
    each; ``E = F`` with ``share="kv"``; one ``E`` for every layer with ``"layerwise"``)."""
    n, N, k, d = config.length(model_cfg), table.n, config.k, model_cfg.d_model
    for i in block_indices(model_cfg.n_layers, config.layers):
        if config.share == "layerwise":
            own = {"linformer.E": k * n}
        else:
            own = {f"linformer.{i}.E": k * n}
            if config.share == "none":
                own[f"linformer.{i}.F"] = k * n
        table.blocks[i].attn["core"] = AttentionCore(
            sdpa_flops(N, k, d) + 2 * 2 * k * N * d, own, kind="linformer")


__all__ = [
    "SHARE_MODES",
    "LinformerAttention",
    "LowRankAttentionConfig",
    "low_rank_attention_",
]
