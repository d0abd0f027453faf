"""Helpers for the factorized-FFN and cross-layer-sharing notebook (03).

Papers: low-rank factorisation of weight matrices (Sainath et al. 2013; Denton et al. 2014),
ALBERT (Lan et al. 2020) for cross-layer sharing; see :mod:`labkit.techniques.factorized_ffn`
and :mod:`labkit.techniques.sharing` for the equations.

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

from .. import measure
from .. import validate as V
from ..model import ModelConfig, build, count_params, preset
from ..techniques import factorized_ffn as FF
from ..techniques import sharing as S
from ..techniques.registry import FFN_LINEARS, apply_, expected
from ..train import evaluate
from . import common as C
from .workloads import TASKS, Workload, workload  # noqa: F401  re-exported for notebooks

def build_variant(cfg: ModelConfig, configs=(), seed: int = 0):
    """A fresh model from ``seed`` with the technique configs applied in order."""
    return C.build_variants(cfg, {"v": configs}, seed)["v"]


def train_variants(work: Workload, variants: dict, steps: int, lr: float = 3e-3,
                   eval_every: int = 25, seed: int = 0, board=None, models: dict | None = None,
                   progress: bool = False) -> dict:
    """Train each variant (``{label: [technique configs]}``) for ``steps`` steps on the same
    batches of ``work``. ``models`` may give a ready model for a label (e.g. an
    SVD-initialised one). Returns ``{label: {"model", "result", "final"}}``."""
    built = {label: (models or {}).get(label) or build_variant(work.cfg, configs, seed)
             for label, configs in variants.items()}
    return C.train_variants(built, work.make_batches, steps, work.eval_set, lr, eval_every,
                            seed, board, progress=progress)


summary = C.summary


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
    return C.rank_for_energy(spectrum, energy, key="matrix")


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
                        min_run_time: float = 0.2, rounds: int = 3, timer=None) -> list[dict]:
    """Per variant: claimed (analytic) and counted parameters, bytes and FLOPs of one
    forward on ``work.sample`` (:func:`labkit.labs.common.claimed_vs_counted`), and the
    latency of every variant measured side by side with the dense model
    (:func:`labkit.labs.common.timed`), each speedup with its verdict."""
    ids, mask = work.sample
    inputs = (ids,) if mask is None else (ids, mask)
    models = dict(models or {})
    for label, configs in variants.items():
        models.setdefault(label, build_variant(work.cfg, configs))
    models = {label: models[label].eval() for label in variants}
    dense = next((m for label, m in models.items() if not variants[label]), None) \
        or build_variant(work.cfg, ())
    claims = {label: C.claimed_vs_counted(dense, models[label], variants[label], inputs)
              for label in variants}
    flop_ratio = {label: c["flops_ratio_counted"] for label, c in claims.items()}
    times = {r["variant"]: r for r in C.timed({"dense": dense, **{k: m for k, m in models.items()
                                                                   if m is not dense}},
                                              inputs, "dense", flop_ratio, rounds,
                                              min_run_time, timer)}
    rows = []
    for label, c in claims.items():
        t = times.get(label) or times["dense"]
        rows.append({
            "variant": label, "params_claimed": c["params_claimed_after"],
            "params_counted": c["params_counted_after"],
            "bytes_claimed": c["bytes_claimed_after"], "bytes_counted": c["bytes_counted_after"],
            "params_ratio_claimed": c["params_ratio_claimed"],
            "ffn_flops_ratio_claimed": c["parts"]["ffn"]["flops_ratio"],
            "flops_claimed": c["flops_claimed_after"], "flops_counted": c["flops_counted_after"],
            "flops_ratio_counted": c["flops_ratio_counted"],
            "latency_ms": t["median_ms"], "dense_latency_ms": times["dense"]["median_ms"],
            "speedup_measured": t["speedup"], "speedup_min": t["speedup_min"],
            "speedup_max": t["speedup_max"], "verdict": t["verdict"], "threads": t["threads"],
            "shapes": str(tuple(ids.shape)),
            "kernel_paths": sorted(set(measure.kernel_paths(models[label]).values()))})
    return rows


def size_sweep(sizes, kind: str = "decoder", rank_fraction: float = 0.25,
               mode: str | tuple = ("attn", "ffn"), batch: int = 1, tokens: int = 128,
               min_run_time: float = 0.2, rounds: int = 3, timer=None) -> list[dict]:
    """Latency, weight bytes and peak activation memory of dense, factorized (rank
    ``rank_fraction * d_model``) and shared models at preset ``sizes``; latencies measured
    side by side (:func:`labkit.labs.common.timed`), each speedup with its verdict."""
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
        models = {k: m.eval() for k, m in C.build_variants(cfg, variants).items()}
        flops = {k: measure.forward_flops(m, ids) for k, m in models.items()}
        times = {r["variant"]: r for r in C.timed(
            models, (ids,), "dense", {k: flops["dense"] / f for k, f in flops.items()},
            rounds, min_run_time / rounds, timer)}
        for label, m in models.items():
            claim = expected(cfg, *variants[label], seq_len=tokens)
            rows.append({
                "size": size, "d_model": cfg.d_model, "n_layers": cfg.n_layers,
                "variant": label.split(" ")[0], "label": label, "tokens": batch * tokens,
                "params": count_params(m), "params_claimed": claim["params_after"],
                "weight_bytes": measure.model_bytes(m)["total"],
                "peak_activation_bytes": measure.peak_activation_bytes(m, ids),
                "flops": flops[label], "latency_ms": times[label]["median_ms"],
                "speedup": times[label]["speedup"], "verdict": times[label]["verdict"],
                "threads": times[label]["threads"]})
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
