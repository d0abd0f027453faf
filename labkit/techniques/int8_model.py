"""Model-level INT8 autotuning: time whole-model execution paths side by side on the timed
batch and keep the fastest, by the rule of :mod:`labkit.accelerate`.

Per-site acceleration (:func:`labkit.techniques.int8.accelerate_`) picks a path for each
linear; some paths only exist for the whole model: ``torch.compile`` of the full graph, and
static INT8 (:mod:`labkit.techniques.static_int8`), whose activation ranges and fused
``dequant -> qlinear -> quant`` kernels span the graph. The candidates:

* ``fp32``: the model as it is, eager (the current path every other must beat);
* ``fp32_compiled``: the same exported graph as static INT8, Inductor with freezing;
* ``int8_per_site``: a copy after per-site accelerate (fp32 / oneDNN fp32 / bf16 / torchao
  INT8 / torch dynamic INT8 per linear, whole-model check included), eager;
* ``static_int8``: PT2E static INT8, calibrated on ``calibration``, compiled.

The rule (as :mod:`labkit.accelerate`): every available candidate is timed in the same
paired rounds (rotated order, :func:`labkit.measure.paired`); the fastest replaces ``fp32``
only if its median is below ``(1 - margin)`` of fp32's, else fp32 stays. Speed only: the
accuracy budget is the caller's (the planner scores the chosen model); each row carries the
largest logit difference to fp32 on the timed batch. Static INT8 is also reported against
``fp32_compiled`` (like with like, ``speedup_vs_fp32_compiled``).

A candidate that cannot run here (no VNNI/AMX, no oneDNN, a failed compile) is a row with
``available=False`` and the reason, and a warning: never a silent fallback.

Timing is injectable: ``timer(name, fn, min_run_time) -> seconds`` with names
``"<model-level>/<candidate>"`` (and the per-site names of
:func:`labkit.techniques.int8.accelerate_` while ``int8_per_site`` is built).
``builders`` replaces how a candidate is built (``{name: fn(model, inputs, calibration) ->
module}``), for tests and for callers with their own paths.

Complexity: one export + two compiles (fp32, INT8) + one per-site accelerate, then
``rounds x candidates`` whole-model timings.
"""
from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import measure
from .. import validate as V
from . import int8 as I
from . import static_int8 as SI

MODEL_LEVEL = "<model-level>"
MODEL_CANDIDATES = ("fp32", "fp32_compiled", "int8_per_site", "static_int8")
KERNEL_PATHS = {"fp32": "fp32 eager (the model as it is)", "fp32_compiled": SI.FP32_PATH}


@dataclass
class ModelChoice:
    """What :func:`accelerate_model` chose: the module to run (``model``), its candidate
    name, its paired speedup over fp32 eager, and one row per candidate (plus a last
    ``choice`` row)."""

    model: nn.Module
    chosen: str
    speedup: float
    rows: list = field(default_factory=list)


def _per_site(model, args, calibration, timer=None, rounds=3, min_run_time=0.05):
    acc = copy.deepcopy(model).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = I.accelerate_(acc, args, rounds=rounds, min_run_time=min_run_time,
                             timer=timer)
    acc.labkit_warnings = sorted({str(w.message).splitlines()[0][:160] for w in caught})
    chosen = sorted({r["chosen"] for r in rows if r["layer"] != "<model>"})
    acc.kernel_path = "per site, eager: " + "+".join(chosen)
    acc.site_rows = rows
    return acc


def default_builders(backend: str = "x86_inductor", timer=None, rounds: int = 3,
                     min_run_time: float = 0.05) -> dict:
    """``{candidate: fn(model, args, calibration) -> module}`` for :data:`MODEL_CANDIDATES`."""
    return {"fp32": lambda m, a, c: m,
            "fp32_compiled": lambda m, a, c: SI.compiled_fp32(m, a),
            "int8_per_site": lambda m, a, c: _per_site(m, a, c, timer, rounds,
                                                       min_run_time),
            "static_int8": lambda m, a, c: SI.static_int8(m, c, a, backend)}


def _why_unavailable(name: str, backend: str) -> str | None:
    return SI.unavailable(backend) if name == "static_int8" else None


def _runner(mod, args):
    def run():
        with torch.inference_mode():
            mod(*args)
    return run


def accelerate_model(model: nn.Module, inputs, calibration=None,
                     candidates: tuple = MODEL_CANDIDATES, margin: float = 0.05,
                     rounds: int = 3, min_run_time: float = 0.2, timer=None,
                     backend: str = "x86_inductor", builders: dict | None = None,
                     site_rounds: int = 3, site_min_run_time: float = 0.05) -> ModelChoice:
    """Pick the fastest whole-model path for ``model`` (labkit's encoder classifier, left
    unchanged) on ``inputs``.

    ``inputs``: the timed batch, ``(ids, padding_mask, token_type_ids)`` (trailing ones may
    be omitted) or a batch dict; ``calibration``: a list of batches from the training rows
    (needed for ``static_int8``; its size is stated on the row). Returns a
    :class:`ModelChoice`; the chosen module has the model's forward signature."""
    cands = tuple(dict.fromkeys(("fp32", *candidates)))  # fp32 is what others must beat
    for c in cands:
        V.choice("candidates", c, MODEL_CANDIDATES)
    V.number("margin", margin, 0.0, 1.0, hi_open=True)
    V.integer("rounds", rounds, 1)
    V.choice("backend", backend, SI.BACKENDS)
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        raise TypeError(f"{type(model).__name__} has no .cfg: accelerate_model takes "
                        "labkit's Transformer")
    args = SI.check_batch("inputs", SI.as_args(inputs), cfg)
    pattern = (args[1] is not None, args[2] is not None)
    if "static_int8" in cands:
        if calibration is None:
            raise V.LabkitConfigError("calibration", None, "a list of batches from the "
                                      "training rows (static_int8 calibrates on them)")
        SI.check_calibration(calibration, cfg, pattern)
    model.eval()
    site_timer = timer  # per-site names are "<layer>/<candidate>", "<model>/..."
    build = {**default_builders(backend, site_timer, site_rounds, site_min_run_time),
             **(builders or {})}
    with torch.no_grad():
        ref = model(*args)
    built, rows = {}, {}
    for name in cands:
        row = {"layer": MODEL_LEVEL, "candidate": name, "available": True, "warnings": ""}
        why = _why_unavailable(name, backend)
        if why is None:
            t0 = time.perf_counter()
            try:
                mod = build[name](model, args, calibration)
            except (RuntimeError, SI.StaticInt8Unavailable) as e:  # a failed compile
                why = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            else:
                built[name] = mod
                row["build_seconds"] = time.perf_counter() - t0
                with torch.no_grad():
                    row["max_abs_logit_diff"] = float((mod(*args).float() - ref).abs().max())
                row["kernel_path"] = getattr(mod, "kernel_path", KERNEL_PATHS.get(name, name))
                row.update(getattr(mod, "info", {}) if name != "fp32" else {})
                row["warnings"] = "; ".join(getattr(mod, "labkit_warnings", ()))
        if why is not None:
            if name == "fp32":
                raise RuntimeError(f"the fp32 model itself failed to run: {why}")
            msg = f"{name} unavailable: {why}"
            warnings.warn(msg, stacklevel=2)
            row.update(available=False, warnings=msg, kernel_path="unavailable")
        rows[name] = row
    wrapped = None if timer is None else (
        lambda name, fn, mrt: timer(f"{MODEL_LEVEL}/{name}", fn, mrt))
    p = measure.paired({k: _runner(m, args) for k, m in built.items()}, reference="fp32",
                       rounds=rounds, min_run_time=min_run_time, timer=wrapped)
    best = min(built, key=lambda k: p.seconds[k])
    chosen = best if p.seconds[best] < (1.0 - margin) * p.seconds["fp32"] else "fp32"
    for k in built:
        rows[k].update({f"{f}": v for f, v in p.row(k).items() if f != "threads"},
                       threads=p.threads, chosen=k == chosen)
        if "fp32_compiled" in built:
            rows[k]["speedup_vs_fp32_compiled"] = p.seconds["fp32_compiled"] / p.seconds[k]
    for row in rows.values():
        row.setdefault("chosen", False)
    out = list(rows.values())
    out.append({"layer": MODEL_LEVEL, "candidate": "choice", "current": "fp32",
                "chosen": chosen, "speedup": p.ratio[chosen],
                "speedup_min": p.ratio_spread[chosen][0],
                "speedup_max": p.ratio_spread[chosen][1], "margin": margin, "rounds": rounds,
                "kernel_path": rows[chosen]["kernel_path"],
                "warnings": "" if chosen != "fp32" or best == "fp32" else
                f"fastest was {best} at {p.ratio[best]:.2f}x, inside the {margin:.0%} margin: "
                "fp32 kept"})
    return ModelChoice(built[chosen], chosen, p.ratio[chosen], out)


__all__ = ["MODEL_CANDIDATES", "MODEL_LEVEL", "ModelChoice", "accelerate_model",
           "default_builders"]
