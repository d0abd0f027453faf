"""One small transformer with explicit seams, in two flavours from one config.

* ``kind="encoder"``: a BERT-like classifier (LayerNorm, GELU MLP, learned positions,
  a pooled ``[CLS]`` head) for MNLI/QNLI-style sentence-pair tasks.
* ``kind="decoder"``: a Mistral/LLaMA-like causal LM (RMSNorm, SwiGLU MLP, rotary
  positions, tied embeddings).

Both are pre-norm (``x + attn(norm1(x))``) by default: post-norm BERT is harder to train
from scratch in a few hundred CPU steps, and pre-norm is what Mistral uses. A pretrained
BERT (all-MiniLM-L6-v2, :mod:`labkit.pretrained`) needs what BERT has: ``norm_position=
"post"`` (``norm1(x + attn(x))``, no final norm), segment (token type) embeddings
(``type_vocab_size=2``), LayerNorm ``norm_eps=1e-12``; its GELU is the exact erf GELU
that :class:`MLP` already uses.

The seams techniques replace are ``model.blocks[i].attn`` (an :class:`Attention`),
``model.blocks[i].ffn`` (an :class:`MLP`) and the norms. A replacement keeps the forward
signature ``attn(x, key_padding_mask=None, rope=None) -> x`` / ``ffn(x) -> x``, so
techniques stack.

The depth seam is ``model.executor``: a :class:`BlockExecutor` decides which blocks run,
in what order and on which inputs (``executor(blocks, x, ctx) -> x``). Techniques that
change depth (LayerDrop, early exit, concurrent layer groups, pipeline stages) swap the
executor with :meth:`Transformer.set_executor`; ``features`` never branches on them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import validate as V

KINDS = ("encoder", "decoder")
NORM_POSITIONS = ("pre", "post")


@dataclass(frozen=True)
class ModelConfig:
    kind: str = "encoder"
    vocab_size: int = 1024
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    max_len: int = 128
    num_labels: int = 3  # encoder only
    dropout: float = 0.0
    rope_theta: float = 10000.0  # decoder only
    norm_position: str = "pre"  # "pre": x + f(norm(x)); "post" (BERT): norm(x + f(x))
    norm_eps: float | None = None  # None: the norm's default (LayerNorm 1e-5, RMSNorm 1e-6)
    type_vocab_size: int = 0  # encoder only; BERT: 2 segment embeddings (A, B)
    sep_token_id: int = 3  # ends segment A when token types are not given (labkit's [SEP])

    def __post_init__(self):
        V.choice("kind", self.kind, KINDS)
        V.integer("vocab_size", self.vocab_size, 8)
        V.integer("d_model", self.d_model, 8)
        V.integer("n_layers", self.n_layers, 1)
        V.integer("n_heads", self.n_heads, 1, self.d_model)
        if self.d_model % self.n_heads:
            raise V.LabkitConfigError(
                "n_heads", self.n_heads, f"a divisor of d_model={self.d_model}")
        if self.kind == "decoder" and (self.d_model // self.n_heads) % 2:
            raise V.LabkitConfigError(
                "n_heads", self.n_heads, "a head dim d_model/n_heads that is even (rotary)")
        V.integer("d_ff", self.d_ff, 1)
        V.integer("max_len", self.max_len, 2)
        V.integer("num_labels", self.num_labels, 1)
        V.number("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        V.choice("norm_position", self.norm_position, NORM_POSITIONS)
        if self.norm_eps is not None:
            V.number("norm_eps", self.norm_eps, 0.0, 0.1, lo_open=True)
        V.integer("type_vocab_size", self.type_vocab_size, 0, 0 if self.kind == "decoder" else 16)
        V.integer("sep_token_id", self.sep_token_id, 0, self.vocab_size - 1)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


# Named sizes. "tiny" trains in seconds on a CPU; "base" is ~100M parameters
# (BERT-base / a small Mistral) and is for building and measuring, not training here.
PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, d_ff=256, max_len=128),
    "small": dict(d_model=128, n_layers=4, n_heads=4, d_ff=512, max_len=256),
    "medium": dict(d_model=256, n_layers=6, n_heads=8, d_ff=1024, max_len=512),
    "base": dict(d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_len=512,
                 vocab_size=30522),
}


def preset(name: str, kind: str = "encoder", **overrides) -> ModelConfig:
    """A :class:`ModelConfig` by preset name, with any field overridden."""
    V.choice("preset", name, PRESETS)
    return ModelConfig(kind=kind, **{**PRESETS[name], **overrides})


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Rotary(nn.Module):
    """Rotary position embedding tables, applied to (B, H, N, D) queries and keys."""

    def __init__(self, head_dim: int, max_len: int, theta: float):
        super().__init__()
        inv = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        ang = torch.outer(torch.arange(max_len).float(), inv)  # (N, D/2)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, x):  # x: (B, H, N, D)
        n = x.shape[-2]
        cos, sin = self.cos[:n].to(x.dtype), self.sin[:n].to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return out.flatten(-2)


class Attention(nn.Module):
    """Multi-head softmax attention through ``F.scaled_dot_product_attention``.

    Subclasses (low-rank, kernel attention) override :meth:`attend` only; the Q/K/V and
    output projections, head split and rotary positions are shared.
    """

    def __init__(self, d_model: int, n_heads: int, causal: bool = False, dropout: float = 0.0):
        super().__init__()
        self.d_model, self.n_heads, self.causal = d_model, n_heads, causal
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)

    def heads(self, x):  # (B, N, D) -> (B, H, N, Dh)
        b, n, _ = x.shape
        return x.view(b, n, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x, key_padding_mask=None, rope: Rotary | None = None):
        # x: (B, N, D); key_padding_mask: (B, N) bool, True where the token is padding
        q, k, v = self.heads(self.q(x)), self.heads(self.k(x)), self.heads(self.v(x))
        if rope is not None:
            q, k = rope(q), rope(k)
        y = self.attend(q, k, v, key_padding_mask)  # (B, H, N, Dh)
        b, h, n, dh = y.shape
        return self.o(y.transpose(1, 2).reshape(b, n, h * dh))

    def attend(self, q, k, v, key_padding_mask=None):
        mask = None
        if key_padding_mask is not None:
            mask = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, N) True = attend
            if self.causal:
                n = q.shape[-2]
                mask = mask & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=self.causal and mask is None,
            dropout_p=self.dropout if self.training else 0.0)

    @classmethod
    def like(cls, other: Attention, **kwargs) -> Attention:
        """A new attention of this class with ``other``'s sizes and projection weights."""
        new = cls(other.d_model, other.n_heads, causal=other.causal, dropout=other.dropout,
                  **kwargs)
        for name in ("q", "k", "v", "o"):
            getattr(new, name).load_state_dict(getattr(other, name).state_dict())
        return new.to(next(other.parameters()).device)


class MLP(nn.Module):
    """GELU MLP ``down(gelu(up x))`` or SwiGLU ``down(silu(gate x) * up x)``."""

    def __init__(self, d_model: int, d_ff: int, gated: bool = False):
        super().__init__()
        self.gated = gated
        self.up = nn.Linear(d_model, d_ff, bias=not gated)
        self.gate = nn.Linear(d_model, d_ff, bias=False) if gated else None
        self.down = nn.Linear(d_ff, d_model, bias=not gated)

    def forward(self, x):  # (B, N, D) -> (B, N, D)
        if self.gated:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x)))


def _norm(cfg: ModelConfig) -> nn.Module:
    if cfg.kind == "decoder":
        return RMSNorm(cfg.d_model, eps=cfg.norm_eps or 1e-6)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps or 1e-5)


class Block(nn.Module):
    """Pre-norm ``x + f(norm(x))`` or post-norm ``norm(x + f(x))`` (``cfg.norm_position``),
    for ``f`` = attention then MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        decoder = cfg.kind == "decoder"
        self.post_norm = cfg.norm_position == "post"
        self.norm1 = _norm(cfg)
        self.attn = Attention(cfg.d_model, cfg.n_heads, causal=decoder, dropout=cfg.dropout)
        self.norm2 = _norm(cfg)
        self.ffn = MLP(cfg.d_model, cfg.d_ff, gated=decoder)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, key_padding_mask=None, rope=None):
        if self.post_norm:  # BERT
            x = self.norm1(x + self.drop(self.attn(x, key_padding_mask=key_padding_mask,
                                                   rope=rope)))
            return self.norm2(x + self.drop(self.ffn(x)))
        x = x + self.drop(self.attn(self.norm1(x), key_padding_mask=key_padding_mask, rope=rope))
        return x + self.drop(self.ffn(self.norm2(x)))


@dataclass
class BlockContext:
    """What every block call receives besides the hidden states."""

    key_padding_mask: torch.Tensor | None = None  # (B, N) bool, True where padding
    rope: Rotary | None = None

    def call(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return block(x, key_padding_mask=self.key_padding_mask, rope=self.rope)


class BlockExecutor(nn.Module):
    """Runs the model's blocks: the default runs every block once, in order.

    Subclasses override :meth:`forward`. An executor is a module, so what it owns (exit
    classifiers, a kept-block list as a buffer) is saved, moved and counted with the model.
    """

    def forward(self, blocks: nn.ModuleList, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        for block in blocks:
            x = ctx.call(block, x)  # (B, N, D)
        return x

    def extra_repr(self) -> str:
        return "every block in order"


class Transformer(nn.Module):
    """Encoder classifier or decoder LM; ``forward`` returns logits.

    encoder: ``(B, N) ids -> (B, num_labels)``; decoder: ``(B, N) ids -> (B, N, vocab)``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.executor = BlockExecutor()
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.d_model) \
            if cfg.type_vocab_size else None
        if cfg.kind == "encoder":
            self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
            self.embed_norm = _norm(cfg)  # BERT: unit-scale embeddings
            self.embed_drop = nn.Dropout(cfg.dropout)
            self.rope = None
            # post-norm blocks already end in a norm (BERT has no final one)
            self.norm = nn.Identity() if cfg.norm_position == "post" else _norm(cfg)
            self.pooler = nn.Linear(cfg.d_model, cfg.d_model)
            self.head = nn.Linear(cfg.d_model, cfg.num_labels)
        else:
            self.pos = None
            self.embed_norm = nn.Identity()
            self.embed_drop = nn.Identity()
            self.rope = Rotary(cfg.head_dim, cfg.max_len, cfg.rope_theta)
            self.norm = _norm(cfg)
            self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            self.head.weight = self.embed.weight  # tied
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def token_types(self, ids):
        """BERT segment ids from the ids: 0 up to and including the first separator, 1
        after it (``[CLS] a [SEP] b [SEP]`` -> 0...0 1...1). (B, N) long."""
        sep = (ids == self.cfg.sep_token_id).long()
        return ((sep.cumsum(1) - sep) > 0).long()  # (B, N)

    def features(self, ids, key_padding_mask=None, token_type_ids=None):
        """Final hidden states (B, N, D) after the last norm. ``token_type_ids`` (B, N) are
        used when the config has segment embeddings; derived from the separator if None."""
        n = ids.shape[1]
        if n > self.cfg.max_len:
            raise V.LabkitConfigError(
                "sequence length", n, f"at most the model's max_len={self.cfg.max_len}")
        x = self.embed(ids)  # (B, N, D)
        if self.pos is not None:
            x = x + self.pos(torch.arange(n, device=ids.device))
        if self.token_type is not None:
            tt = self.token_types(ids) if token_type_ids is None else token_type_ids
            x = x + self.token_type(tt)
        x = self.embed_drop(self.embed_norm(x))
        x = self.executor(self.blocks, x, BlockContext(key_padding_mask, self.rope))
        return self.norm(x)

    def set_executor(self, executor: BlockExecutor) -> BlockExecutor:
        """Swap the block executor (the depth seam); returns the one it replaces."""
        if not isinstance(executor, BlockExecutor):
            raise TypeError(f"executor must be a labkit.model.BlockExecutor, "
                            f"got {type(executor).__name__}")
        before, self.executor = self.executor, executor
        return before

    def logits(self, h):
        """The head on final hidden states ``h`` (B, N, D)."""
        if self.cfg.kind == "encoder":
            return self.head(torch.tanh(self.pooler(h[:, 0])))  # (B, num_labels)
        return self.head(h)  # (B, N, vocab)

    def forward(self, ids, key_padding_mask=None, token_type_ids=None):
        return self.logits(self.features(ids, key_padding_mask, token_type_ids))

    def loss(self, batch: dict) -> torch.Tensor:
        """Cross-entropy for either kind: ``batch`` has ``input_ids`` and ``labels``
        (class ids for the encoder; next-token targets with -100 ignored for the decoder)."""
        logits = self(batch["input_ids"], batch.get("padding_mask"), batch.get("token_type_ids"))
        if self.cfg.kind == "encoder":
            return F.cross_entropy(logits, batch["labels"])
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)


def build(cfg: ModelConfig | str = "tiny", kind: str = "encoder", seed: int | None = 0,
          **overrides) -> Transformer:
    """Build a model from a config or a preset name; ``seed`` makes the init repeat."""
    if isinstance(cfg, str):
        cfg = preset(cfg, kind=kind, **overrides)
    elif overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    if seed is not None:
        torch.manual_seed(seed)
    return Transformer(cfg)


def count_params(module: nn.Module) -> int:
    """Unique parameters (tied and shared weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


__all__ = ["ModelConfig", "PRESETS", "preset", "build", "Transformer", "Block", "BlockContext",
           "BlockExecutor", "Attention",
           "MLP", "RMSNorm", "Rotary", "count_params"]
