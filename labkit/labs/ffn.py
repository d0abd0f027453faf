"""Helpers for the factorized-FFN and cross-layer-sharing notebook (03).

Papers: low-rank factorisation of weight matrices (Sainath et al. 2013; Denton et al. 2014),
ALBERT (Lan et al. 2020) for cross-layer sharing; see :mod:`labkit.techniques.factorized_ffn`
and :mod:`labkit.techniques.sharing` for the equations.

* :func:`setup`: what notebook 03 trains on: the decoder LM from scratch on the synthetic
  corpus (``task="lm"``, :func:`workload`), or a *trained* pair classifier from
  :func:`labkit.classifiers.classifier` (``task="nli"``: ``model="tiny"|"minilm"`` on any
  source) whose copies are compressed and fine-tuned.
* :func:`train_all`: every variant at the same steps on the same batches, every loss curve
  on one :class:`labkit.ui.LiveBoard`: fresh models from one seed (LM), or copies of the
  trained classifier with the techniques swapped in, evaluated before fine-tuning (nli).
* :func:`ffn_spectrum` and :func:`svd_sweep`: the singular values of trained FFN weights,
  and what truncating them to rank ``r`` costs (weight error, and eval loss with no
  fine-tuning) as ``r`` grows.
* :func:`claimed_vs_measured`: analytic parameters/bytes/FLOPs next to counted ones and the
  measured latency, per variant.
* :func:`size_sweep`: latency, weight bytes and activation memory against model size.
"""
from __future__ import annotations

import itertools
import statistics

import torch

from .. import classifiers as CL
from .. import data as D
from .. import measure
from .. import validate as V
from ..model import ModelConfig, build, count_params, preset
from ..techniques import factorized_ffn as FF
from ..techniques import sharing as S
from ..techniques.registry import FFN_LINEARS, apply_, check, expected
from ..train import evaluate
from . import common as C
from .figures import size_figure, spectrum_figure  # noqa: F401  (re-exported)
from .workloads import TASKS, Workload, workload


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


def backbone(task: str, size: str = "tiny", seq_len: int = 32, model: str = "tiny") -> ModelConfig:
    """The config :func:`setup` will train, known before any training or download, so the
    technique configs are checked against it first."""
    V.choice("task", task, TASKS)
    if task == "lm":
        return preset(size, kind="decoder", max_len=max(seq_len, 8))
    return C.backbone_config(model, seq_len)


def setup(task: str, size: str = "tiny", batch_size: int = 16, seq_len: int = 32,
          n_eval: int = 256, seed: int = 0, model: str = "tiny", source: str = "synthetic",
          vocab_size: int = D.VOCAB_SIZE, baseline_steps: int = 0, lr: float = 3e-3):
    """``(work, base)``. ``task="lm"``: the decoder LM of preset ``size`` on the synthetic
    corpus, variants trained from scratch (``base`` is None; ``model`` and ``source`` must
    stay at their defaults: the LM has no pretrained backbone or real-text loader here).
    ``task="nli"``: the trained dense classifier ``model`` on ``source``
    (:func:`labkit.classifiers.classifier`, ``baseline_steps`` steps, 0 = the backbone's
    recipe; cached) and its workload; ``lr`` is the fine-tuning rate, checked against the
    backbone's limit (a pretrained BERT is wrecked by the tiny model's rates)."""
    V.choice("task", task, TASKS)
    V.integer("baseline_steps", baseline_steps, 0)
    if task == "lm":
        for name, value, only in (("model", model, "tiny"), ("source", source, "synthetic")):
            if value != only:
                raise V.LabkitConfigError(name, value, f"{only!r} with task='lm' (a real backbone "
                                                       "and real text are for task='nli')")
        return workload("lm", size, batch_size, seq_len, n_eval=n_eval, seed=seed,
                        vocab_size=vocab_size), None
    V.choice("model", model, CL.MODELS)
    if size != "tiny":
        raise V.LabkitConfigError("size", size, "'tiny' with task='nli' (the classifier "
                                                "backbone is chosen with model='tiny'|'minilm')")
    V.number("lr", lr, 0.0, CL.MAX_LR[model], lo_open=True)
    base = CL.classifier(model, "nli", source, steps=baseline_steps or None,
                         batch_size=batch_size, max_len=seq_len, n_eval=n_eval,
                         vocab_size=vocab_size, seed=seed, progress=False)
    return base.workload, base


def train_all(work: Workload, labels: dict, variants: dict, fact: FF.FactorizedFFNConfig,
              steps: int, lr: float, eval_every: int, seed: int = 0, board=None,
              base=None) -> dict:
    """Notebook 03's runs, all for ``steps`` on the same batches. Without ``base`` (LM):
    fresh models from ``seed``; with ``fact.init == "svd"`` the factorized variant is the
    SVD of the dense model trained first (compress, then fine-tune). With ``base`` (a
    :class:`labkit.classifiers.Classifier`): copies of its trained model with each
    variant's techniques swapped in (the factorized FFN with ``fact``'s init), evaluated
    before fine-tuning (the swap's own cost), every copy fine-tuned alike."""
    if base is not None:
        share = variants[labels["share"]]
        trained = {labels["dense"]: [], labels["fact"]: [fact], labels["share"]: share,
                   labels["both"]: [fact, *share]}
        return C.finetune_variants(base.model, work, trained, steps, lr, seed, board,
                                   eval_every)
    runs = train_variants(work, {labels["dense"]: []}, steps, lr, eval_every, seed, board)
    ready = {}
    if fact.init == "svd":  # compress the trained dense model, then fine-tune it for `steps`
        ready = C.build_variants(runs[labels["dense"]]["model"], {labels["fact"]: fact})
    rest = {k: v for k, v in variants.items() if k != labels["dense"]}
    runs.update(train_variants(work, rest, steps, lr, eval_every, seed, board, ready))
    return runs


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


def claimed_vs_measured(work: Workload, variants: dict, models: dict | None = None,
                        min_run_time: float = 0.2, rounds: int = 3, timer=None) -> list[dict]:
    """:func:`labkit.labs.common.claimed_vs_measured` on ``work.sample`` for ``{label:
    [technique configs]}`` (the dense variant, with no configs, is the reference);
    ``models`` may give ready (e.g. trained) models by label."""
    ids, mask = work.sample
    inputs = (ids,) if mask is None else (ids, mask)
    models = dict(models or {})
    for label, configs in variants.items():
        models.setdefault(label, build_variant(work.cfg, configs))
    dense_label = next((k for k, c in variants.items() if not c), None)
    dense = models[dense_label] if dense_label else build_variant(work.cfg, ())
    rows = C.claimed_vs_measured(dense, {k: (models[k], c) for k, c in variants.items()
                                         if k != dense_label}, inputs, rounds, min_run_time,
                                 timer)
    if dense_label:
        rows[0]["variant"] = dense_label
    return rows


TOUR_HEADLINE = ("claimed_flops_ratio", "measured_speedup", "speedup_verdict", "dense_accuracy",
                 "factorized_accuracy")  # notebook 00's index entry, claimed vs measured first


def tour_metrics(runs: dict, rows: list[dict], base=None) -> dict:
    """The metrics of notebook 00: accuracy and loss of the dense and the factorized run
    (and, when the runs started from a trained ``base``, a
    :class:`labkit.classifiers.Classifier`, the factorized model's accuracy right after the
    swap and the baseline's), claimed vs counted parameter and FLOP ratios, latency with the
    verdict (``runs`` and ``rows`` in the order dense, factorized)."""
    d, f = list(runs.values())[:2]
    dense, fact = rows[0], rows[1]
    out = {"dense_accuracy": d["final"]["accuracy"],
           "factorized_accuracy": f["final"]["accuracy"],
           "dense_loss": d["final"]["loss"], "factorized_loss": f["final"]["loss"],
           "claimed_params_ratio": fact["params_ratio_claimed"],
           "measured_params_ratio": fact["params_ratio_counted"],
           "claimed_ffn_flops_ratio": fact["ffn_flops_ratio_claimed"],
           "claimed_flops_ratio": fact["flops_ratio_claimed"],
           "measured_flops_ratio": fact["flops_ratio_counted"],
           "measured_speedup": fact["speedup_measured"], "speedup_verdict": fact["verdict"],
           "dense_latency_ms": dense["latency_ms"], "factorized_latency_ms": fact["latency_ms"],
           "threads": fact["threads"]}
    if "before" in f:
        out.update({"factorized_before_accuracy": f["before"]["accuracy"],
                    "factorized_before_loss": f["before"]["loss"],
                    "dense_before_accuracy": d["before"]["accuracy"]})
    if base is not None:
        out.update({"model": base.backbone, "baseline_steps": base.steps,
                    "baseline_cached": base.cached, "baseline_accuracy": base.metrics["accuracy"],
                    "baseline_loss": base.metrics["loss"]})
    return out


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


def variants(fact: FF.FactorizedFFNConfig, share: S.SharingConfig) -> tuple[dict, dict]:
    """``(labels, {label: [configs]})`` of notebook 03's four variants: dense, factorized
    (``fact``), shared (``share``), and both (``fact`` with a random init, then ``share``)."""
    mode, rank = ",".join(share.parts), fact.rank
    labels = {"dense": "dense", "fact": f"factorized r={rank}", "share": f"shared ({mode})",
              "both": f"factorized r={rank} + shared ({mode})"}
    return labels, {labels["dense"]: [], labels["fact"]: [fact], labels["share"]: [share],
                    labels["both"]: [FF.FactorizedFFNConfig(rank=rank), share]}


def explore(work: Workload, runs: dict, rank: int, sharing, min_run_time: float = 0.2,
            rounds: int = 3) -> list[dict]:
    """:func:`claimed_vs_measured` of the four :func:`variants` at ``rank`` and
    ``sharing``, reusing the trained models of ``runs`` where the label matches (counts and
    latency do not depend on the weights)."""
    _, vs = variants(FF.FactorizedFFNConfig(rank=rank), S.SharingConfig(sharing))
    for configs in vs.values():
        for c in configs:
            check(c, work.cfg)  # a rank above min(d_model, d_ff) fails here, named
    trained = {k: r["model"] for k, r in runs.items() if k in vs}
    return claimed_vs_measured(work, vs, trained, min_run_time, rounds)


def ranks_to_sweep(cfg: ModelConfig, rank: int) -> list[int]:
    """Powers of two up to ``min(d_model, d_ff)``, plus ``rank`` and full rank."""
    top = min(cfg.d_model, cfg.d_ff)
    return sorted({2 ** i for i in range(top.bit_length()) if 2 ** i <= top} | {rank, top})


HEADLINE = ("fact_params_ratio_claimed", "fact_flops_ratio_counted", "fact_speedup_measured",
            "dense_eval_loss", "fact_eval_loss")  # notebook 03's index entry, every task


def metrics(task: str, labels: dict, runs: dict, cvm: list[dict], svd_rows: list[dict],
            size_rows: list[dict], rank: int, top: int, energy90: dict, base=None) -> dict:
    """Notebook 03's metrics: eval per variant (and right after the swap, when the runs
    started from a trained classifier ``base``), claimed vs counted per variant, SVD
    truncation at ``rank`` and full rank ``top``, the largest size's speedups and bytes."""
    final = {k: runs[labels[k]]["final"] for k in labels}
    by = {r["variant"]: r for r in cvm}
    svd = {r["rank"]: r for r in svd_rows}
    low = [r["weight_error"] for r in svd_rows if r["rank"] != "dense"]
    largest = size_rows[-1]["size"]
    big = {r["variant"]: r for r in size_rows if r["size"] == largest}
    out = {f"{k}_eval_loss": final[k]["loss"] for k in labels}
    if task == "nli":
        out.update({f"{k}_eval_accuracy": final[k]["accuracy"] for k in labels})
    if base is not None:
        out.update({f"{k}_before_eval_{q}": runs[labels[k]]["before"][q] for k in labels
                    for q in ("loss", "accuracy")})
        out.update({"model": base.backbone, "baseline_steps": base.steps,
                    "baseline_cached": base.cached, "baseline_eval_loss": base.metrics["loss"],
                    "baseline_eval_accuracy": base.metrics["accuracy"]})
    out.update({f"{k}_params": int(by[labels[k]]["params_counted"]) for k in labels})
    out.update({f"{k}_params_ratio_claimed": float(by[labels[k]]["params_ratio_claimed"])
                for k in labels})
    for q in ("params", "bytes", "flops"):
        out[f"{q}_claimed_equals_counted"] = all(r[f"{q}_claimed"] == r[f"{q}_counted"]
                                                 for r in cvm)
    fact, share = by[labels["fact"]], by[labels["share"]]
    out.update({
        "fact_ffn_flops_ratio_claimed": fact["ffn_flops_ratio_claimed"],
        "fact_flops_ratio_counted": fact["flops_ratio_counted"],
        "share_flops_ratio_counted": share["flops_ratio_counted"],
        "fact_speedup_measured": fact["speedup_measured"], "fact_speedup_verdict": fact["verdict"],
        "share_speedup_measured": share["speedup_measured"],
        "share_speedup_verdict": share["verdict"],
        "svd_weight_error_at_rank": svd[rank]["weight_error"],
        "svd_eval_loss_at_rank": svd[rank]["eval_loss"],
        "svd_full_rank_loss_gap": abs(svd[top]["eval_loss"] - final["dense"]["loss"]),
        "svd_weight_error_monotone": all(a >= b for a, b in itertools.pairwise(low)),
        "rank_for_90pct_energy_mean": sum(energy90.values()) / max(len(energy90), 1),
        "largest_fact_speedup": big["factorized"]["speedup"],
        "largest_share_speedup": big["shared"]["speedup"],
        "largest_fact_bytes_ratio": big["dense"]["weight_bytes"] / big["factorized"]["weight_bytes"],
        "largest_share_bytes_ratio": big["dense"]["weight_bytes"] / big["shared"]["weight_bytes"],
        "threads": int(cvm[0]["threads"])})
    return out


__all__ = [
    "HEADLINE",
    "TASKS",
    "TOUR_HEADLINE",
    "Workload",
    "backbone",
    "build_variant",
    "claimed_vs_measured",
    "ffn_spectrum",
    "ffn_weights",
    "rank_for_energy",
    "setup",
    "size_sweep",
    "summary",
    "svd_sweep",
    "tour_metrics",
    "train_all",
    "train_variants",
    "workload",
]
