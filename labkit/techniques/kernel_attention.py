"""Kernel (linear) attention: ELU+1, Performer FAVOR+ and random Fourier features.

Papers: Katharopoulos, Vyas, Pappas, Fleuret (2020), "Transformers are RNNs: Fast
Autoregressive Transformers with Linear Attention" (ELU+1); Choromanski et al. (2021),
"Rethinking Attention with Performers" (FAVOR+); Rahimi & Recht (2007), "Random Features
for Large-Scale Kernel Machines" (trigonometric features).

Idea: write the softmax similarity as a kernel, ``exp(q . k / sqrt(d)) ~ phi(q) . phi(k)``,
with a feature map ``phi: R^d -> R^m``. Then the attention output is

    out_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / phi(q_i)^T (sum_j phi(k_j))
    i.e.  Out = phi(Q) (phi(K)^T V)  /  phi(Q) (phi(K)^T 1)

and associating the product to the right never forms the ``n x n`` matrix: the cost is
``O(n m d)`` time and ``O(m d)`` extra memory per head instead of ``O(n^2 d)`` and ``O(n^2)``.
Causal attention uses prefix sums ``S_i = sum_{j<=i} phi(k_j) v_j^T``; here computed chunk by
chunk (exact quadratic attention inside a chunk of ``C`` tokens, the running state between
chunks), which costs ``O(n (C + m) d)`` and never stores ``n`` states.

Feature maps (``m`` = ``num_features``):

* ``"elu"``: ``phi(x) = elu(x) + 1`` (feature dimension = head dim; not an estimator of
  softmax, a different, always-positive kernel; ``num_features`` does not apply).
* ``"favor"``: positive orthogonal random features
  ``phi(x) = exp(W x - |x|^2 / 2) / sqrt(m)`` with ``x`` scaled by ``d^-1/4`` and ``W``
  (m x d) blocks of orthogonal rows (Haar, QR with fixed signs) with chi-distributed norms;
  an unbiased, always positive estimator of the softmax kernel, since for ``w ~ N(0, I)``
  ``E[exp(w.x - |x|^2/2) exp(w.y - |y|^2/2)] = exp(x . y)``.
* ``"trig"``: ``phi(x) = exp(|x|^2 / 2) [sin(W x), cos(W x)] / sqrt(m / 2)`` with ``m / 2``
  Gaussian frequencies: unbiased for the softmax kernel too, but not positive, so the
  denominator ``phi(Q)(phi(K)^T 1)`` can be negative or near zero. Every forward counts such
  rows in ``module.denominator_stats`` (and warns once per module) instead of hiding them.

Random features come from a seeded ``torch.Generator`` (seed + layer index) and are stored
as buffers, so a model with kernel attention is reproducible and saves its features.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import validate as V
from ..accounting import AttentionCore
from ..model import Attention, ModelConfig
from .registry import block_indices, register, register_account, scope_fields, swap_attention

FEATURE_MAPS = ("elu", "favor", "trig")
NEAR_ZERO = 1e-3  # |denominator| below this fraction of the median |denominator|


@dataclass(frozen=True)
class KernelAttentionConfig:
    """Linear attention with a feature map; ``num_features`` is the knob ``m`` for the
    random-feature maps, ``chunk_size`` the causal chunk ``C``."""

    feature_map: str = "elu"
    num_features: int = 64
    seed: int = 0
    chunk_size: int = 64
    layers: tuple[int, ...] = ()

    def __post_init__(self):
        V.choice("feature_map", self.feature_map, FEATURE_MAPS)
        V.integer("num_features", self.num_features, 1)
        if self.feature_map == "trig" and self.num_features % 2:
            raise V.LabkitConfigError("num_features", self.num_features,
                                      "an even number for feature_map='trig' (sin and cos "
                                      "of num_features/2 frequencies)")
        V.integer("seed", self.seed, 0)
        V.integer("chunk_size", self.chunk_size, 1)
        scope_fields(self)

    def feature_dim(self, head_dim: int) -> int:
        """The feature dimension ``m`` actually used for heads of size ``head_dim``."""
        return head_dim if self.feature_map == "elu" else self.num_features


# --------------------------------------------------------------------------- feature maps

def orthogonal_gaussian(m: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """(m, d) rows in blocks of ``d`` orthogonal directions, each row scaled to the norm of
    a Gaussian vector, so marginally every row is N(0, I) (Performer's ORF).

    The orthogonal block is Haar-distributed only when the QR factor's signs are fixed:
    LAPACK's Householder QR returns ``R`` with a sign pattern on its diagonal that depends
    on the input, so ``Q`` alone leans its rows to one side and the kernel estimate is
    biased. Multiplying ``Q``'s columns by ``sign(diag R)`` makes ``Q R`` unique with a
    positive diagonal and ``Q`` uniform (Mezzadri 2007, "How to generate random matrices
    from the classical compact groups")."""
    blocks = []
    for _ in range(math.ceil(m / d)):
        q, r = torch.linalg.qr(torch.randn(d, d, generator=generator))
        q = q * torch.sign(torch.diagonal(r))  # (d, d), Haar: see the docstring
        blocks.append(q.T)
    w = torch.cat(blocks)[:m]  # (m, d)
    norms = torch.randn(m, d, generator=generator).norm(dim=1)  # (m,)
    return w * norms[:, None]


def feature_map(x: torch.Tensor, kind: str, omega: torch.Tensor | None, is_query: bool,
                stabilise: bool = True):
    """phi(x) for x (B, H, N, d) -> (B, H, N, m). For the random maps the rows are shifted by
    a stabiliser (per row for queries, one per head for keys) that cancels in the ratio;
    ``stabilise=False`` returns the plain features, whose dot products
    ``phi(q) . phi(k)`` are unbiased estimates of ``exp(q . k / sqrt(d))``."""
    if kind == "elu":
        return F.elu(x).add_(1.0)  # in place: one allocation less per call
    d = x.shape[-1]
    x = x * d ** -0.25  # exp(q.k / sqrt(d)) = exp(q' . k')
    proj = torch.matmul(x, omega.t())  # (B, H, N, m or m/2)
    sq = 0.5 * (x * x).sum(-1, keepdim=True)  # (B, H, N, 1)
    if kind == "favor":
        logits = proj - sq
        if not stabilise:
            return logits.exp() / math.sqrt(omega.shape[0])
        with torch.no_grad():  # a constant shift that cancels in the ratio: no gradient
            stab = logits.amax(-1, keepdim=True) if is_query else \
                logits.amax((-2, -1), keepdim=True)
        # exp(logits - stab) / sqrt(m), the 1/sqrt(m) folded into the shift
        return logits.sub_(stab + 0.5 * math.log(omega.shape[0])).exp_()
    # trig: exp(|x|^2/2) [sin, cos] / sqrt(m/2)
    with torch.no_grad():
        stab = torch.zeros_like(sq) if not stabilise else sq if is_query else \
            sq.amax(-2, keepdim=True)
    scale = torch.exp(sq - stab) / math.sqrt(omega.shape[0])
    return torch.cat((torch.sin(proj), torch.cos(proj)), -1) * scale


def linear_attention(qf, kf, v, causal: bool = False, chunk: int = 64):
    """Numerator (B, H, N, d) and denominator (B, H, N, 1) of kernel attention from features
    ``qf``, ``kf`` (B, H, N, m) and values ``v`` (B, H, N, d)."""
    if not causal:
        kv = torch.matmul(kf.transpose(-2, -1), v)  # (B, H, m, d)
        ksum = kf.sum(-2).unsqueeze(-1)  # (B, H, m, 1)
        return torch.matmul(qf, kv), torch.matmul(qf, ksum)
    b, h, n, m = qf.shape
    d = v.shape[-1]
    state = qf.new_zeros(b, h, m, d)  # sum_{j < chunk start} phi(k_j) v_j^T
    zsum = qf.new_zeros(b, h, m, 1)  # sum_{j < chunk start} phi(k_j)
    nums, dens = [], []
    for s in range(0, n, chunk):
        qc, kc, vc = qf[..., s:s + chunk, :], kf[..., s:s + chunk, :], v[..., s:s + chunk, :]
        c = qc.shape[-2]
        a = torch.matmul(qc, kc.transpose(-2, -1))  # (B, H, c, c)
        a = a * torch.ones(c, c, dtype=torch.bool, device=a.device).tril()
        nums.append(torch.matmul(qc, state) + torch.matmul(a, vc))  # (B, H, c, d)
        dens.append(torch.matmul(qc, zsum) + a.sum(-1, keepdim=True))  # (B, H, c, 1)
        if s + chunk < n:
            state = state + torch.matmul(kc.transpose(-2, -1), vc)
            zsum = zsum + kc.sum(-2).unsqueeze(-1)
    return torch.cat(nums, -2), torch.cat(dens, -2)


def denominator_stats(den: torch.Tensor) -> dict:
    """Rows whose kernel-attention denominator is <= 0 or near zero (|den| below
    ``NEAR_ZERO`` x the median |den|); the exact softmax denominator is always positive."""
    den = den.detach().flatten().float()
    mag = den.abs()
    tol = NEAR_ZERO * float(mag.median()) if den.numel() else 0.0
    return {"rows": den.numel(), "nonpositive": int((den <= 0).sum()),
            "near_zero": int((mag < tol).sum()), "min": float(den.min()) if den.numel() else 0.0}


class KernelAttention(Attention):
    """:class:`labkit.model.Attention` whose :meth:`attend` is kernel (linear) attention."""

    def __init__(self, d_model: int, n_heads: int, causal: bool = False, dropout: float = 0.0,
                 feature_map: str = "elu", num_features: int = 64, seed: int = 0,
                 chunk_size: int = 64):
        super().__init__(d_model, n_heads, causal=causal, dropout=dropout)
        V.choice("feature_map", feature_map, FEATURE_MAPS)
        V.integer("num_features", num_features, 1)
        V.integer("chunk_size", chunk_size, 1)
        self.feature_kind, self.chunk_size = feature_map, chunk_size
        self.num_features = self.head_dim if feature_map == "elu" else num_features
        if feature_map == "elu":
            self.register_buffer("omega", None)
        else:
            rows = num_features if feature_map == "favor" else num_features // 2
            g = torch.Generator().manual_seed(seed)
            self.register_buffer("omega", orthogonal_gaussian(rows, self.head_dim, g))
        if dropout > 0:
            warnings.warn("kernel attention never forms the attention matrix, so attention "
                          f"dropout={dropout} is not applied (the residual dropout still is)",
                          stacklevel=2)
        self.kernel_path = f"kernel:{feature_map}(m={self.num_features})" + \
            (f":causal-chunked(C={chunk_size})" if causal else "")
        self.denominator_stats = {"rows": 0, "nonpositive": 0, "near_zero": 0}
        self._warned = False

    def attend(self, q, k, v, key_padding_mask=None):
        # q, k, v: (B, H, N, Dh); key_padding_mask: (B, N) True = padding
        qf = feature_map(q, self.feature_kind, self.omega, is_query=True)  # (B, H, N, m)
        kf = feature_map(k, self.feature_kind, self.omega, is_query=False)  # (B, H, N, m)
        if key_padding_mask is not None:
            kf = kf * (~key_padding_mask)[:, None, :, None].to(kf.dtype)
        num, den = linear_attention(qf, kf, v, self.causal, self.chunk_size)
        self._record(den, key_padding_mask)
        return num.div_(den)  # (B, H, N, Dh)

    def _record(self, den, key_padding_mask):
        if key_padding_mask is not None:  # only real query rows count
            den = den.transpose(1, 2)[~key_padding_mask]  # (rows, H, 1)
        st = denominator_stats(den)
        for key in ("rows", "nonpositive", "near_zero"):
            self.denominator_stats[key] += st[key]
        if (st["nonpositive"] or st["near_zero"]) and not self._warned:
            self._warned = True
            warnings.warn(
                f"kernel attention ({self.feature_kind}, m={self.num_features}): "
                f"{st['nonpositive']} of {st['rows']} denominators <= 0 and "
                f"{st['near_zero']} near zero; outputs of those rows are unstable "
                "(see module.denominator_stats)", RuntimeWarning, stacklevel=3)

    def extra_repr(self) -> str:
        return (f"feature_map={self.feature_kind!r}, m={self.num_features}, "
                f"causal={self.causal}, chunk={self.chunk_size}")


@register(KernelAttentionConfig)
def kernel_attention_(model, config: KernelAttentionConfig):
    """Replace the attention of the chosen blocks with :class:`KernelAttention`."""
    return swap_attention(model, config.layers, lambda i, old: KernelAttention.like(
        old, feature_map=config.feature_map, num_features=config.num_features,
        seed=config.seed + i, chunk_size=config.chunk_size))


def kernel_attention_flops(n: int, head_dim: int, n_heads: int, feature_map: str, m: int,
                           causal: bool = False, chunk: int = 64) -> int:
    """Matmul FLOPs of kernel attention for one layer, batch 1 (as counted by
    ``torch.utils.flop_counter``; element-wise work such as exp is not counted)."""
    d, h = head_dim, n_heads
    if feature_map == "elu":
        m, proj = d, 0
    else:
        rows = m if feature_map == "favor" else m // 2
        proj = 2 * 2 * n * d * rows  # W q and W k
    if not causal:
        core = 2 * n * m * d * 2 + 2 * n * m  # phi(K)^T V, phi(Q) (.), denominator
    else:
        core, starts = 0, list(range(0, n, chunk))
        for s in starts:
            c = min(chunk, n - s)
            core += 2 * c * c * m + 2 * c * c * d + 2 * c * m * d + 2 * c * m  # intra + inter
            if s + chunk < n:
                core += 2 * c * m * d  # state update
    return h * (proj + core)


@register_account(KernelAttentionConfig)
def _account(table, model_cfg: ModelConfig, config: KernelAttentionConfig) -> None:
    """Per converted block: :func:`kernel_attention_flops` at the table's ``n``; no
    parameters; the random features ``omega`` are fp32 buffers."""
    h, dh = model_cfg.n_heads, model_cfg.head_dim
    m = config.feature_dim(dh)
    causal = model_cfg.kind == "decoder"
    rows = 0 if config.feature_map == "elu" else (m if config.feature_map == "favor" else m // 2)
    for i in block_indices(model_cfg.n_layers, config.layers):
        table.blocks[i].attn["core"] = AttentionCore(
            kernel_attention_flops(table.n, dh, h, config.feature_map, m, causal,
                                   config.chunk_size),
            buffer_bytes=4 * rows * dh, kind=f"kernel:{config.feature_map}")


# --------------------------------------------------------------------------- analysis

def exact_attention(q, k, v, causal: bool = False):
    """Softmax attention reference (SDPA)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def approximate(q, k, v, feature_map_: str, num_features: int, seed: int = 0,
                causal: bool = False, chunk: int = 64):
    """Kernel-attention output and denominator stats for given q, k, v (B, H, N, d)."""
    cfg = KernelAttentionConfig(feature_map_, num_features, seed, chunk)
    omega = None
    if feature_map_ != "elu":
        rows = num_features if feature_map_ == "favor" else num_features // 2
        omega = orthogonal_gaussian(rows, q.shape[-1], torch.Generator().manual_seed(seed))
    qf = feature_map(q, cfg.feature_map, omega, True)
    kf = feature_map(k, cfg.feature_map, omega, False)
    num, den = linear_attention(qf, kf, v, causal, chunk)
    return num.div_(den), denominator_stats(den)


def approximation_error(q, k, v, feature_maps=FEATURE_MAPS, ms=(8, 16, 32, 64, 128, 256),
                        seeds=(0, 1, 2), scales=(1.0,), causal: bool = False):
    """Tidy table of the relative error ``||out - softmax_out||_F / ||softmax_out||_F``
    against exact softmax attention, averaged over seeds, with the fraction of unstable
    denominators. ``scales`` multiplies q and k (larger logits make trig features fail).
    ELU+1 has no ``m`` (its feature dimension is the head dim): one row per scale."""
    import pandas as pd

    rows = []
    with torch.no_grad():
        for scale in scales:
            qs, ks = q * scale, k * scale
            ref = exact_attention(qs, ks, v, causal)
            for fm in feature_maps:
                for m in ([q.shape[-1]] if fm == "elu" else ms):
                    errs, nonpos, near, total = [], 0, 0, 0
                    for seed in (seeds if fm != "elu" else seeds[:1]):
                        out, st = approximate(qs, ks, v, fm, m, seed, causal)
                        err = (out - ref).norm() / ref.norm()
                        errs.append(float(err) if torch.isfinite(err) else float("inf"))
                        nonpos += st["nonpositive"]
                        near += st["near_zero"]
                        total += st["rows"]
                    t = torch.tensor(errs)
                    rows.append({"feature_map": fm, "m": m, "scale": scale,
                                 "rel_error": float(t.mean()),
                                 "rel_error_std": float(t.std()) if len(t) > 1 else 0.0,
                                 "nonpositive_frac": nonpos / total,
                                 "near_zero_frac": near / total, "seeds": len(errs)})
    return pd.DataFrame(rows)


__all__ = [
    "FEATURE_MAPS",
    "KernelAttention",
    "KernelAttentionConfig",
    "approximate",
    "approximation_error",
    "denominator_stats",
    "exact_attention",
    "feature_map",
    "kernel_attention_",
    "kernel_attention_flops",
    "linear_attention",
    "orthogonal_gaussian",
]
