"""What every technique notebook shares, so notebooks stay thin drivers.

* :func:`build_variants`: one model per variant (``{label: [technique configs]}``), either
  fresh from a config and seed, or a copy of a trained model with the techniques swapped in.
* :func:`train_variants`: train several models on the same batches for the same steps,
  every loss curve on one :class:`labkit.ui.LiveBoard`, optionally evaluating before the
  first step (what a swap alone costs).
* :func:`summary`: one tidy row per trained variant.
* :func:`claimed_vs_counted`: the analytic claim (:func:`labkit.techniques.registry.expected`) next
  to what :mod:`labkit.measure` counts on the built model (parameters, FLOPs, bytes).
* :func:`claimed_vs_measured`: both, and latency measured side by side, one row a variant.
* :func:`timed`: latency of several models side by side (:func:`labkit.measure.paired`),
  each speedup with its spread and a verdict (:func:`labkit.measure.speedup_verdict`): a
  speedup inside its own spread or above the counted FLOP ratio is flagged as noise.
* :func:`binomial_se`, :func:`rank_for_energy`: small things two notebooks would otherwise
  each write; :func:`int_list`, :func:`float_list`, :func:`choice_list`: list parameters
  (``"8,16,32"``) parsed and range-checked once, the error naming the parameter.
"""
from __future__ import annotations

import copy
import math
import statistics

import torch

from .. import measure
from .. import validate as V
from ..model import ModelConfig, build, count_params
from ..techniques.registry import apply_, expected
from ..train import evaluate, fit


def _configs(configs) -> list:
    if configs is None:
        return []
    return list(configs) if isinstance(configs, (list, tuple)) else [configs]


def build_variants(base, variants: dict, seed: int = 0) -> dict:
    """``{label: model}``: each variant's technique configs (a config, a list, or ``None``
    for dense) applied in order to a fresh model of ``base`` (a :class:`ModelConfig`, built
    from ``seed``) or to a deep copy of ``base`` (a trained model)."""
    out = {}
    for label, configs in variants.items():
        model = build(base, seed=seed) if isinstance(base, ModelConfig) else copy.deepcopy(base)
        for c in _configs(configs):
            apply_(model, c)
        out[label] = model
    return out


def train_variants(models: dict, make_batches, steps: int, eval_set, lr: float = 1e-3,
                   eval_every: int | None = None, seed: int = 0, board=None,
                   before: bool = False, progress: bool = False) -> dict:
    """Train every model in ``{label: model}`` for ``steps`` on ``make_batches(seed)`` (the
    same batches for each), evaluating on ``eval_set`` every ``eval_every`` steps. Returns
    ``{label: {"model", "result", "final"}}`` plus ``"before"`` (eval before the first
    step) with ``before=True``. Losses go to ``board`` panel "loss" (and "accuracy" when
    the board has that panel)."""
    V.integer("steps", steps, 1)
    out = {}
    for label, model in models.items():
        run = {"model": model}
        if before:
            run["before"] = evaluate(model, eval_set)
        callbacks = [board.callback("loss", label)] if board is not None else []
        res = fit(model, make_batches(seed), steps, lr=lr,
                  eval_fn=lambda m=model: evaluate(m, eval_set), eval_every=eval_every or steps,
                  seed=seed, callbacks=callbacks, progress=progress)
        out[label] = {**run, "result": res, "final": res.final}
    if board is not None:
        board.flush()
    return out


def summary(runs: dict, window: int = 10) -> list[dict]:
    """Per variant: parameters, steps, seconds, first and mean-of-last-``window`` train
    losses, eval metrics before (when recorded) and after training."""
    rows = []
    for label, r in runs.items():
        train = [h["loss"] for h in r["result"].history if h["split"] == "train"]
        rows.append({"variant": label, "params": count_params(r["model"]),
                     "steps": r["result"].steps, "seconds": r["result"].seconds,
                     "train_loss_first": train[0],
                     "train_loss_last": statistics.fmean(train[-window:]),
                     **{f"before_eval_{k}": v for k, v in r.get("before", {}).items()},
                     **{f"eval_{k}": v for k, v in r["final"].items()}})
    return rows


def claimed_vs_counted(dense, model, configs, inputs: tuple) -> dict:
    """The analytic claim for ``configs`` on ``dense.cfg`` at the inputs' sequence length,
    next to the parameters, bytes and forward FLOPs counted on ``dense`` and ``model``
    (``inputs``: the forward arguments, ids first, batch ``B``: claims are per sequence,
    so FLOPs are claimed for ``B`` sequences). Keys ``{quantity}_{claimed|counted}_{before|
    after}`` and ``{quantity}_ratio_{claimed|counted}`` (before / after)."""
    ids = inputs[0]
    claim = expected(dense.cfg, *_configs(configs), seq_len=ids.shape[1])
    counted = {"params": (count_params(dense), count_params(model)),
               "bytes": (measure.model_bytes(dense)["total"], measure.model_bytes(model)["total"]),
               "flops": (measure.forward_flops(dense, *inputs),
                         measure.forward_flops(model, *inputs))}
    scale = {"params": 1, "bytes": 1, "flops": ids.shape[0]}
    out = {}
    for q, (b, a) in counted.items():
        cb, ca = claim[f"{q}_before"] * scale[q], claim[f"{q}_after"] * scale[q]
        out.update({f"{q}_claimed_before": cb, f"{q}_claimed_after": ca,
                    f"{q}_counted_before": b, f"{q}_counted_after": a,
                    f"{q}_ratio_claimed": cb / ca, f"{q}_ratio_counted": b / a})
    out["parts"] = claim["parts"]
    return out


def timed(models: dict, inputs: tuple, reference: str | None = None,
          flop_ratios: dict | None = None, rounds: int = 3, min_run_time: float = 0.2,
          timer=None, kwargs: dict | None = None) -> list[dict]:
    """Inference latency of ``{label: model}`` on ``model(*inputs, **kwargs)``, measured side by side
    (:func:`labkit.measure.paired`: rotated rounds, median of per-round ratios). Each row:
    median and spread, ``speedup`` over ``reference`` (default: the first label) with its
    min/max over rounds, and ``verdict``: ``"measured"`` or why it is noise (its spread
    straddles 1x, or it beats the counted FLOP ratio ``flop_ratios[label]``)."""
    kwargs = kwargs or {}

    def call(m):
        def run():
            with torch.inference_mode():
                m(*inputs, **kwargs)
        return run

    res = measure.paired({k: call(m) for k, m in models.items()}, reference, rounds,
                         min_run_time, timer)
    rows = []
    for row in res.rows():
        label = row["variant"]
        ratio = (flop_ratios or {}).get(label)
        row["flop_ratio"] = ratio
        row["verdict"] = "reference" if label == res.reference else measure.speedup_verdict(
            row["speedup"], (row["speedup_min"], row["speedup_max"]), ratio)
        rows.append(row)
    return rows


def claimed_vs_measured(dense, variants: dict, inputs: tuple, rounds: int = 3,
                        min_run_time: float = 0.2, timer=None) -> list[dict]:
    """One row per variant (``{label: (model, technique configs)}``; the dense model itself
    is the reference row ``"dense"``): claimed and counted parameters, bytes and FLOPs of
    one forward of ``inputs`` (:func:`claimed_vs_counted`), and latency measured side by
    side with the dense model, re-timed in the same rounds (:func:`timed`), each speedup
    with its spread and verdict."""
    models = {"dense": dense.eval(), **{k: m.eval() for k, (m, _) in variants.items()}}
    configs = {"dense": [], **{k: c for k, (_, c) in variants.items()}}
    claims = {k: claimed_vs_counted(dense, models[k], configs[k], inputs) for k in models}
    times = {r["variant"]: r for r in timed(
        models, inputs, "dense", {k: c["flops_ratio_counted"] for k, c in claims.items()},
        rounds, min_run_time, timer)}
    rows = []
    for k, c in claims.items():
        t = times[k]
        rows.append({
            "variant": k, "params_claimed": c["params_claimed_after"],
            "params_counted": c["params_counted_after"],
            "params_ratio_claimed": c["params_ratio_claimed"],
            "params_ratio_counted": c["params_ratio_counted"],
            "bytes_claimed": c["bytes_claimed_after"], "bytes_counted": c["bytes_counted_after"],
            "flops_claimed": c["flops_claimed_after"], "flops_counted": c["flops_counted_after"],
            "flops_ratio_claimed": c["flops_ratio_claimed"],
            "flops_ratio_counted": c["flops_ratio_counted"],
            "ffn_flops_ratio_claimed": c["parts"]["ffn"]["flops_ratio"],
            "latency_ms": t["median_ms"], "dense_latency_ms": times["dense"]["median_ms"],
            "speedup_measured": t["speedup"], "speedup_min": t["speedup_min"],
            "speedup_max": t["speedup_max"], "verdict": t["verdict"], "rounds": t["rounds"],
            "threads": t["threads"], "shapes": str(tuple(inputs[0].shape)),
            "kernel_paths": sorted(set(measure.kernel_paths(models[k]).values()))})
    return rows


def binomial_se(p: float, n: int) -> float:
    """Standard error ``sqrt(p (1 - p) / n)`` of an accuracy ``p`` measured on ``n``
    examples: differences between variants below about twice this are noise."""
    V.number("accuracy", p, 0.0, 1.0)
    V.integer("n", n, 1)
    return math.sqrt(p * (1.0 - p) / n)


def rank_for_energy(rows, energy: float = 0.9, key: str = "layer") -> dict:
    """Per ``row[key]`` (a layer, a matrix): the smallest ``row["index"]`` at which the
    cumulative energy ``row["energy"]`` (of squared singular values) reaches ``energy``."""
    V.number("energy", energy, 0.0, 1.0, lo_open=True)
    out: dict = {}
    for r in rows:
        if r["energy"] >= energy and r[key] not in out:
            out[r[key]] = r["index"]
    return out


def _items(name: str, value, example: str) -> list:
    """A list parameter's items: ``"a, b,c"`` split on commas, or a tuple/list as given;
    empty -> :class:`~labkit.validate.LabkitConfigError` naming ``name``."""
    items = [x.strip() for x in value.split(",") if x.strip()] if isinstance(value, str) \
        else value
    if not isinstance(items, (tuple, list)) or not items:
        raise V.LabkitConfigError(name, value, f"a non-empty comma-separated list, e.g. "
                                               f"'{example}'")
    return list(items)


def _cast_items(name: str, value, cast, kind: str, example: str) -> list:
    """A list parameter's items cast to ``cast`` (strings parsed, other items as given), or
    a :class:`~labkit.validate.LabkitConfigError` naming ``name`` and the expected ``kind``."""
    items = _items(name, value, example)
    try:
        return [cast(x) if isinstance(x, str) else x for x in items]
    except ValueError:
        raise V.LabkitConfigError(name, value, f"comma-separated {kind}, e.g. '{example}'") \
            from None


def int_list(name: str, value, lo: int | None = None, hi: int | None = None) -> tuple[int, ...]:
    """A notebook parameter listing integers, ``"8,16,32"`` or ``(8, 16, 32)``, as a tuple
    of integers in ``[lo, hi]`` (:class:`~labkit.validate.LabkitConfigError` otherwise)."""
    items = _cast_items(name, value, int, "integers", "8,16,32")
    return tuple(V.integer(name, v, lo, hi) for v in items)


def float_list(name: str, value, lo: float | None = None, hi: float | None = None,
               lo_open: bool = False, hi_open: bool = False) -> tuple[float, ...]:
    """A notebook parameter listing numbers, ``"0.1,0.5"`` or ``(0.1, 0.5)``, as a tuple of
    floats in the interval (``lo_open``/``hi_open`` exclude a bound), or a named error."""
    items = _cast_items(name, value, float, "numbers", "0.1,0.3,0.5")
    return tuple(V.number(name, v, lo, hi, lo_open, hi_open) for v in items)


def choice_list(name: str, value, allowed) -> tuple[str, ...]:
    """A notebook parameter listing names, ``"nli,qnli"``, each one of ``allowed``, as a
    tuple in the given order without repeats (a named error otherwise)."""
    allowed = list(allowed)
    items = _items(name, value, ",".join(map(str, allowed[:2])))
    for x in items:
        V.choice(name, x, allowed)
    return tuple(dict.fromkeys(items))


def doubling(lo: int, hi: int, names=("seq_min", "seq_max"), floor: int = 2) -> list[int]:
    """``lo, 2 lo, 4 lo, ... <= hi``: a sweep of sizes from two notebook parameters (checked:
    ``floor <= lo <= hi``)."""
    V.integer(names[0], lo, floor)
    V.integer(names[1], hi, lo)
    return [lo * 2 ** i for i in range(int(math.log2(hi // lo)) + 1)]


def backbone_config(model: str = "tiny", max_len: int = 64, num_labels: int = 3) -> ModelConfig:
    """The :class:`ModelConfig` of a classifier backbone (:data:`labkit.classifiers.MODELS`)
    before any training or download, so a technique's config is checked against the real
    sizes up front (a rank above ``min(d_model, d_ff)`` fails before the baseline trains)."""
    from .. import classifiers as CL
    from ..model import preset

    V.choice("model", model, CL.MODELS)
    if model == "minilm":
        from .. import pretrained as PT

        if not PT.minilm_available():
            raise PT.PretrainedUnavailable(PT.INSTALL_HINT)
        return PT.minilm_config(num_labels, max_len)
    return preset("tiny", kind="encoder", num_labels=num_labels, max_len=max_len)


def finetune_variants(base, work, variants: dict, steps: int, lr: float = 1e-3, seed: int = 0,
                      board=None, eval_every: int | None = None,
                      progress: bool = False) -> dict:
    """Copies of the trained model ``base`` with each variant's techniques swapped in
    (``{label: config(s) or None}``), evaluated on ``work.eval_set`` before any step (what
    the swap alone costs), then every copy, the dense one included, fine-tuned for ``steps``
    on the same batches of ``work`` (a :class:`~labkit.labs.workloads.Workload`, e.g.
    :attr:`labkit.classifiers.Classifier.workload`, whichever the backbone)."""
    return train_variants(build_variants(base, variants, seed), work.make_batches, steps,
                          work.eval_set, lr, eval_every, seed, board, before=True,
                          progress=progress)


__all__ = [
    "backbone_config",
    "binomial_se",
    "build_variants",
    "choice_list",
    "claimed_vs_counted",
    "claimed_vs_measured",
    "doubling",
    "finetune_variants",
    "float_list",
    "int_list",
    "rank_for_energy",
    "summary",
    "timed",
    "train_variants",
]
