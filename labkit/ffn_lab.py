"""Helpers for the factorized-FFN and cross-layer-sharing notebook (03).

* :func:`workload`: the model config, training batches and evaluation set of either the
  decoder LM on the synthetic corpus (``task="lm"``) or the encoder classifier on
  ``synthetic-nli`` (``task="nli"``), so one notebook drives both.
* :func:`train_variants`: one fresh model per variant (a list of technique configs), same
  seed, same batches, same steps, every loss curve on one :class:`labkit.ui.LiveBoard`.
* :func:`ffn_spectrum` and :func:`svd_sweep`: the singular values of trained FFN weights,
  and what truncating them to rank ``r`` costs (weight error, and eval loss with no
  fine-tuning) as ``r`` grows.
* :func:`claimed_vs_measured`: analytic parameters/bytes/FLOPs next to counted ones and the
  measured latency, per variant.
* :func:`size_sweep`: latency, weight bytes and activation memory against model size.
"""
from __future__ import annotations

import statistics

import torch

from . import measure
from . import validate as V
from .model import ModelConfig, build, count_params, preset
from .techniques import factorized_ffn as FF
from .techniques import sharing as S
from .techniques.registry import FFN_LINEARS, apply_, expected
from .train import evaluate, fit
from .workloads import TASKS, Workload, workload  # noqa: F401  re-exported for notebooks

def build_variant(cfg: ModelConfig, configs=(), seed: int = 0):
    """A fresh model from ``seed`` with the technique configs applied in order."""
    model = build(cfg, seed=seed)
    for c in configs:
        apply_(model, c)
    return model


def train_variants(work: Workload, variants: dict, steps: int, lr: float = 3e-3,
                   eval_every: int = 25, seed: int = 0, board=None, models: dict | None = None,
                   progress: bool = False) -> dict:
    """Train each variant (``{label: [technique configs]}``) for ``steps`` steps on the same
    batches. ``models`` may give a ready model for a label (e.g. an SVD-initialised one).
    Returns ``{label: {"model", "result", "final"}}``; curves go to ``board`` panel "loss"
    (and "accuracy" for the classifier, if the board has that panel)."""
    V.integer("steps", steps, 1)
    out = {}
    for label, configs in variants.items():
        model = (models or {}).get(label) or build_variant(work.cfg, configs, seed)
        callbacks = [board.callback("loss", label)] if board is not None else []
        res = fit(model, work.make_batches(seed), steps, lr=lr,
                  eval_fn=lambda m=model: evaluate(m, work.eval_set), eval_every=eval_every,
                  seed=seed, callbacks=callbacks, progress=progress)
        out[label] = {"model": model, "result": res, "final": res.final}
    if board is not None:
        board.flush()
    return out


def summary(runs: dict, window: int = 10) -> list[dict]:
    """Per variant: parameters, final eval metrics, mean of the last ``window`` train losses."""
    rows = []
    for label, r in runs.items():
        train = [h["loss"] for h in r["result"].history if h["split"] == "train"]
        rows.append({"variant": label, "params": count_params(r["model"]),
                     "steps": r["result"].steps, "seconds": r["result"].seconds,
                     "train_loss_first": train[0],
                     "train_loss_last": statistics.fmean(train[-window:]),
                     **{f"eval_{k}": v for k, v in r["final"].items()}})
    return rows


def ffn_weights(model) -> list[tuple[str, torch.Tensor]]:
    """``(name, weight)`` of every dense FFN linear (``up``/``gate``/``down``), once each."""
    seen, out = set(), []
    for i, block in enumerate(model.blocks):
        for name in FFN_LINEARS:
            lin = getattr(block.ffn, name, None)
            w = getattr(lin, "weight", None)
            if isinstance(w, torch.Tensor) and id(w) not in seen:
                seen.add(id(w))
                out.append((f"blocks.{i}.ffn.{name}", w.detach()))
    return out


def ffn_spectrum(model) -> list[dict]:
    """Singular values of each trained FFN weight, normalised by the largest, with the
    cumulative energy ``sum_{j<=i} s_j^2 / sum s^2``."""
    rows = []
    for name, w in ffn_weights(model):
        s = torch.linalg.svdvals(w.float())
        energy = (s.square().cumsum(0) / s.square().sum()).tolist()
        for i, (v, e) in enumerate(zip((s / s[0]).tolist(), energy)):
            rows.append({"matrix": name, "index": i + 1, "sigma_rel": v, "energy": e})
    return rows


def rank_for_energy(spectrum: list[dict], energy: float = 0.9) -> dict[str, int]:
    """Per matrix: the smallest rank keeping ``energy`` of the squared singular values."""
    V.number("energy", energy, 0.0, 1.0, lo_open=True)
    out: dict[str, int] = {}
    for r in spectrum:
        if r["energy"] >= energy and r["matrix"] not in out:
            out[r["matrix"]] = r["index"]
    return out


@torch.no_grad()
def svd_sweep(dense, work: Workload, ranks) -> list[dict]:
    """For each rank: the mean relative Frobenius error of the SVD-truncated FFN weights
    and the eval metrics of the dense model factorized at that rank with ``init="svd"``,
    with no fine-tuning. Ranks above ``min(d_model, d_ff)`` are left out."""
    cfg = dense.cfg
    top = min(cfg.d_model, cfg.d_ff)
    weights = ffn_weights(dense)
    rows = [{"rank": "dense", "weight_error": 0.0, "params": count_params(dense),
             **{f"eval_{k}": v for k, v in evaluate(dense, work.eval_set).items()}}]
    for r in sorted({int(r) for r in ranks if 1 <= r <= top}):
        low = build(cfg, seed=0)
        low.load_state_dict(dense.state_dict())
        apply_(low, FF.FactorizedFFNConfig(rank=r, init="svd"))
        err = statistics.fmean(FF.svd_error(w, r) for _, w in weights)
        rows.append({"rank": r, "weight_error": err, "params": count_params(low),
                     **{f"eval_{k}": v for k, v in evaluate(low, work.eval_set).items()}})
    return rows


def variant_expected(cfg: ModelConfig, configs, seq_len: int | None = None) -> dict:
    """The analytic totals of a list of technique configs (dense when empty)."""
    return expected(cfg, *configs, seq_len=seq_len)


def claimed_vs_measured(work: Workload, variants: dict, models: dict | None = None,
                        min_run_time: float = 0.2) -> list[dict]:
    """Per variant: claimed (analytic) and counted parameters and bytes, claimed and counted
    FLOPs of one forward on ``work.sample``, and the latency ratio measured side by side
    (each variant timed right after the dense one, median of ``torch.utils.benchmark``)."""
    ids, mask = work.sample
    inputs = (ids,) if mask is None else (ids, mask)
    models = dict(models or {})
    for label, configs in variants.items():
        models.setdefault(label, build_variant(work.cfg, configs))
    dense = models.get("dense") or build_variant(work.cfg, ())
    dense_flops = measure.forward_flops(dense, *inputs)
    rows = []
    for label, configs in variants.items():
        m = models[label].eval()
        claim = variant_expected(work.cfg, configs, seq_len=ids.shape[1])
        counted_flops = measure.forward_flops(m, *inputs)
        claimed_flops = ids.shape[0] * claim["flops_after"]  # per sequence x batch
        t_dense = measure.latency(dense, *inputs, label="dense", min_run_time=min_run_time)
        t = measure.latency(m, *inputs, label=label, min_run_time=min_run_time)
        rows.append({
            "variant": label, "params_claimed": claim["params_after"],
            "params_counted": count_params(m),
            "bytes_claimed": claim["bytes_after"], "bytes_counted": measure.model_bytes(m)["total"],
            "params_ratio_claimed": claim["params_ratio"],
            "ffn_flops_ratio_claimed": claim["parts"]["ffn"]["flops_ratio"],
            "flops_claimed": claimed_flops, "flops_counted": counted_flops,
            "flops_ratio_counted": dense_flops / counted_flops,
            "latency_ms": t.median_ms, "dense_latency_ms": t_dense.median_ms,
            "speedup_measured": t_dense.median_s / t.median_s, "threads": t.threads,
            "shapes": t.shapes, "kernel_paths": sorted(set(measure.kernel_paths(m).values()))})
    return rows


def size_sweep(sizes, kind: str = "decoder", rank_fraction: float = 0.25,
               mode: str | tuple = ("attn", "ffn"),
               batch: int = 1, tokens: int = 128, min_run_time: float = 0.2,
               rounds: int = 3) -> list[dict]:
    """Latency, weight bytes and peak activation memory of dense, factorized (rank
    ``rank_fraction * d_model``) and shared models at preset ``sizes``; each speedup is the
    median over ``rounds`` of dense/variant timed back to back."""
    V.number("rank_fraction", rank_fraction, 0.0, 1.0, lo_open=True)
    share = S.SharingConfig(mode)
    mode = ",".join(share.parts)
    rows = []
    for size in sizes:
        cfg = preset(size, kind=kind, max_len=max(tokens, 8))
        rank = max(1, round(rank_fraction * cfg.d_model))
        variants = {"dense": [], f"factorized r={rank}": [FF.FactorizedFFNConfig(rank=rank)],
                    f"shared ({mode})": [share]}
        ids = torch.randint(6, cfg.vocab_size, (batch, tokens),
                            generator=torch.Generator().manual_seed(0))
        models = {k: build_variant(cfg, v).eval() for k, v in variants.items()}
        times = {k: [] for k in models}
        for _ in range(rounds):
            for k, m in models.items():
                times[k].append(measure.latency(m, ids, label=k,
                                                min_run_time=min_run_time / rounds).median_s)
        for label, m in models.items():
            claim = variant_expected(cfg, variants[label])
            rows.append({
                "size": size, "d_model": cfg.d_model, "n_layers": cfg.n_layers,
                "variant": label.split(" ")[0], "label": label, "tokens": batch * tokens,
                "params": count_params(m), "params_claimed": claim["params_after"],
                "weight_bytes": measure.model_bytes(m)["total"],
                "peak_activation_bytes": measure.peak_activation_bytes(m, ids),
                "flops": measure.forward_flops(m, ids),
                "latency_ms": statistics.median(times[label]) * 1e3,
                "speedup": statistics.median(d / t for d, t in zip(times["dense"], times[label])),
                "threads": torch.get_num_threads()})
    return rows


__all__ = [
    "TASKS",
    "Workload",
    "build_variant",
    "claimed_vs_measured",
    "ffn_spectrum",
    "ffn_weights",
    "rank_for_energy",
    "size_sweep",
    "summary",
    "svd_sweep",
    "train_variants",
    "variant_expected",
    "workload",
]
