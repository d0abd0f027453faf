"""One autotuner for every real fast path: measure each candidate where it runs, keep what
is faster, and never leave the model slower than it was.

labkit simulates a technique first (masks, fake quantization) and then *accelerates* it to
a real execution path (sparse kernels, compacted dense, INT8, bf16). Which path is fast
depends on the layer's shape, its input, the CPU and the load, so it is measured, not
guessed. The rule, the same for sparsity and INT8:

1. per site (a linear, or an FFN / attention module): time every candidate path on the
   input the site really receives in ``model(*inputs)``, side by side
   (:func:`labkit.measure.paired`: rotated rounds, medians);
2. a candidate replaces the ``current`` path only if its median time is below
   ``(1 - margin)`` of the current path's: below that, timer noise decides, and the
   current path is the safe choice;
3. the whole model is then re-timed side by side against the model on the current paths
   (``verify_rounds`` paired rounds), and every site is reverted unless the choice was not
   slower: the median of the per-round ratios ``current / chosen`` at least 1 *and* no
   round below ``1 - margin``. A median of 1.02 over rounds 1.10, 0.90, 1.02 is noise that
   may hide a slower model, so it reverts too (a warning, recorded in the ``<model>`` row).

What is promised, and what the ``<model>`` row reports: the model left is on the current
paths unless every whole-model round measured the choice at ``>= 1 - margin`` of the
current paths and their median at ``>= 1``. The row's ``speedup`` is that of the model as
left: the verify's median when kept; when reverted the model runs the current paths
themselves, so ``speedup`` is 1 (the same modules as the reference, not re-timed) and the
rejected choice's measured ratio is ``choice_speedup`` (with ``choice_speedup_min`` /
``_max``). A later timing of the same model is another sample of the same noise.

A module used at several places (cross-layer sharing) is one site: it is timed once and
replaced once, at every place it is used, so sharing survives acceleration.

Rows (one schema): per site ``{"layer", "current", "chosen", "kernel_path", "speedup",
"speedup_min", "speedup_max", "<candidate>_ms"..., "candidates", "aliases", "warnings"}``
and one ``{"layer": "<model>", "current", "chosen", "current_ms", "accelerated_ms",
"speedup", "speedup_min", "speedup_max", "choice_speedup", "choice_speedup_min",
"choice_speedup_max", "reverted", "warnings"}``; ``chosen`` is always a candidate name
(``"per-layer"`` for a kept model-level choice). A site's ``speedup`` is the median over
rounds of the per-round ratio ``current / chosen``.

Timing is injectable: ``timer(name, fn, min_run_time) -> seconds`` with names
``"<layer>/<candidate>"`` per site and ``"<model>/current"``, ``"<model>/accelerated"`` for
the whole-model check, so tests decide the timings and check the choice and the revert.

Complexity: sites x candidates x rounds timed calls of one layer, plus 2 x rounds whole-model
calls; with ``plans``, one site per distinct shape (identical sites reuse the measured
choice, rows marked ``reused``) and no calls for a model identical in shapes to one measured.
A site whose choice a whole-model check reverted is stored with the reverted choice (and
says so when reused), never with the per-site choice that check rejected.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import measure
from . import validate as V

MODEL = "<model>"


@dataclass
class Site:
    """One place to accelerate: its candidates by name (``current`` among them)."""

    name: str
    module: nn.Module
    candidates: dict
    current: str


def aliases(model: nn.Module) -> dict[int, list[str]]:
    """``{id(module): [every name it is reachable under]}`` (shared modules have several)."""
    out: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        out.setdefault(id(mod), []).append(name)
    return out


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def replace(model: nn.Module, old: nn.Module, new: nn.Module, names=None) -> list[str]:
    """Put ``new`` wherever ``old`` is used (every alias); returns the names."""
    names = names if names is not None else aliases(model).get(id(old), [])
    for n in names:
        set_module(model, n, new)
    return names


def _max_err(got, ref) -> float:
    return float((got.float() - ref.float()).abs().max())


def _runner(mod, args, kwargs):
    def run():
        with torch.inference_mode():
            mod(*args, **kwargs)
    return run


def choose(site: Site, args: tuple, kwargs: dict, margin: float, rounds: int,
           min_run_time: float, timer=None, atol: float | None = None) -> dict:
    """Time ``site``'s candidates side by side on ``(args, kwargs)`` and return its row.

    With ``atol``, a candidate whose output differs from the site's own by more than
    ``atol`` (+ 1e-3 relative) is dropped, and the row says so."""
    cands, notes = dict(site.candidates), []
    for k, c in cands.items():  # warnings raised while a candidate was built
        notes += [f"{k}: {w[:90]}" for w in getattr(c, "labkit_warnings", ())]
    if atol is not None:
        with torch.no_grad():
            ref = site.module(*args, **kwargs)
            for k in list(cands):
                got = cands[k](*args, **kwargs)
                if not torch.allclose(got, ref, atol=atol, rtol=1e-3):
                    notes.append(f"{k} dropped: disagrees with the layer "
                                 f"(max err {_max_err(got, ref):.2e})")
                    if k != site.current:
                        del cands[k]
    row = {"layer": site.name, "current": site.current, "chosen": site.current,
           "candidates": ", ".join(cands)}
    if len(cands) > 1:
        wrapped = None if timer is None else (
            lambda name, fn, mrt: timer(f"{site.name}/{name}", fn, mrt))
        p = measure.paired({k: _runner(c, args, kwargs) for k, c in cands.items()},
                           reference=site.current, rounds=rounds, min_run_time=min_run_time,
                           timer=wrapped)
        best = min(cands, key=lambda k: p.seconds[k])
        if p.seconds[best] < (1.0 - margin) * p.seconds[site.current]:
            row["chosen"] = best
        row.update({f"{k}_ms": p.seconds[k] * 1e3 for k in cands})
        row.update(speedup=p.ratio[row["chosen"]], speedup_min=p.ratio_spread[row["chosen"]][0],
                   speedup_max=p.ratio_spread[row["chosen"]][1])
    else:
        row["chosen"] = next(iter(cands))
        row.update(speedup=None, speedup_min=None, speedup_max=None)
        notes.append("one candidate: nothing to time")
    row["warnings"] = "; ".join(notes)
    return row


def accelerate(model: nn.Module, inputs: tuple,
               sites: Callable[[nn.Module], Callable[[str, nn.Module], Site | None]],
               margin: float = 0.05, rounds: int = 3, min_run_time: float = 0.02,
               timer=None, atol: float | None = None, verify: bool = True,
               verify_rounds: int = 5, kwargs: dict | None = None,
               plans: dict | None = None) -> list[dict]:
    """Accelerate ``model`` in place by the rule of this module; returns the rows (also
    stored as ``model.acceleration``).

    ``sites(model)`` returns ``site(name, module)``, which returns a :class:`Site` for each
    module to accelerate (None elsewhere; a site's submodules are not visited). Each module is offered once, under its
    first name, even when it is used at several places.

    ``plans``: a dict kept by the caller across calls (and models). A site identical to one
    already measured (:func:`site_signature`: class, parameter and input shapes and dtypes,
    candidates, margin, threads), in this model or an earlier one, gets that measured choice
    without re-timing: a kernel's speed depends on shapes, not on weight values. A model
    whose sites all match an earlier model's also gets its whole-model check. Reused rows
    are the measured ones, marked ``reused``; anything new is measured and added. Not with
    ``atol`` (that check depends on the weights)."""
    V.number("margin", margin, 0.0, 1.0, hi_open=True)
    V.integer("rounds", rounds, 1)
    V.integer("verify_rounds", verify_rounds, 1)
    kwargs = dict(kwargs or {})
    model.eval()
    site_of = sites(model)
    found: dict[str, Site] = {}
    skip: tuple[str, ...] = ()
    for name, mod in model.named_modules():  # deduplicated: a shared module once
        if name == "" or (skip and name.startswith(skip)):
            continue
        site = site_of(name, mod)
        if site is not None:
            found[name] = site
            skip = (*skip, name + ".")
    call = (lambda *a: model(*a, **kwargs)) if kwargs else model  # e.g. a BERT's model(**batch)
    captured = measure.capture_inputs(call, inputs, {n: s.module for n, s in found.items()})
    names = aliases(model)
    if plans is not None and atol is None:
        sigs = {n: site_signature(s, captured.get(n), margin) for n, s in found.items()}
        key = repr((sorted(sigs.items()), verify))
        models, known = plans.setdefault("models", {}), plans.setdefault("sites", {})
        if key in models:
            return _reuse(model, found, names, models[key])
    else:
        key, sigs, known = None, {}, {}
    rows, placed = [], {}
    for name, site in found.items():
        if name not in captured:  # never called on these inputs: nothing to measure
            rows.append({"layer": name, "current": site.current, "chosen": site.current,
                         "warnings": "not called by model(*inputs): left as it was"})
            continue
        args, kw = captured[name]
        if sigs.get(name) in known:
            row = {**known[sigs[name]], "layer": name, "reused": True}
            row["warnings"] = "; ".join(w for w in (row["warnings"], REUSED) if w)
        else:
            row = choose(site, args, {**kw}, margin, rounds, min_run_time, timer, atol)
            if name in sigs:
                known[sigs[name]] = dict(row)
        at = names[id(site.module)]
        new = site.candidates[row["chosen"]]
        replace(model, site.module, new, at)
        placed[name] = (at, site)
        row.update(kernel_path=_path_of(new, row["chosen"]), aliases=", ".join(at))
        rows.append(row)
    changed = [r for r in rows if r["chosen"] != r["current"]]
    if verify and changed:
        rows.append(_verify(model, inputs, kwargs, placed, rows, verify_rounds, min_run_time,
                            timer, margin))
        if rows[-1]["reverted"]:  # the plan keeps what the model now runs, not the rejected
            for r in rows[:-1]:
                if r.get("reverted") and r["layer"] in sigs:
                    known[sigs[r["layer"]]] = {**r, "warnings": _noted(r["warnings"],
                                                                       REVERTED)}
    elif verify:
        rows.append(summary(rows))
    model.acceleration = rows
    if key is not None:
        models[key] = copy.deepcopy(rows)
    return rows


REUSED = ("reused: chosen by an earlier measurement of an identical site "
          "(same class, parameter and input shapes), not re-timed")


REVERTED = ("reverted: a whole-model check found the per-site choice slower, so the site "
            "runs its current path")


def _noted(notes: str, note: str) -> str:
    """``notes`` ("; "-joined) without the reuse mark, with ``note`` once."""
    parts = [w for w in notes.split("; ") if w and w != REUSED]
    return "; ".join(parts + ([note] if note not in parts else []))


def site_signature(site: Site, captured, *settings) -> str:
    """What a site's measured choice depends on besides noise: its module class, parameter
    and buffer shapes and dtypes, candidate names and current path, the shapes and dtypes of
    the input it receives (``captured``: (args, kwargs)); the rule's settings and torch's
    thread count. Not its name nor its weight values."""
    def shapes(obj):
        if isinstance(obj, torch.Tensor):
            return (tuple(obj.shape), str(obj.dtype))
        if isinstance(obj, (tuple, list)):
            return tuple(shapes(o) for o in obj)
        if isinstance(obj, dict):
            return tuple((k, shapes(v)) for k, v in sorted(obj.items()))
        return repr(obj)

    return repr((settings, torch.get_num_threads(), type(site.module).__name__,
                 shapes(dict(site.module.state_dict())), tuple(site.candidates), site.current,
                 shapes(captured)))


def _reuse(model, found: dict, names: dict, measured: list[dict]) -> list[dict]:
    """Put each site on the path ``measured`` chose for the identical site; rows marked."""
    rows = copy.deepcopy(measured)
    for r in rows:
        if r["layer"] in found:
            site = found[r["layer"]]
            replace(model, site.module, site.candidates[r["chosen"]], names[id(site.module)])
        if not r.get("reused"):
            r["reused"] = True
            r["warnings"] = "; ".join(w for w in (r.get("warnings", ""), REUSED) if w)
    model.acceleration = rows
    return rows


def _path_of(mod: nn.Module, name: str) -> str:
    path = getattr(mod, "kernel_path", None)
    return path if isinstance(path, str) else name


def _verify(model, inputs, kwargs, placed, rows, rounds, min_run_time, timer,
            margin: float) -> dict:
    """Whole model on the chosen paths vs on the current paths, side by side; revert unless
    the median ratio is >= 1 and no round is below ``1 - margin`` (module docstring)."""
    reference = copy.deepcopy(model)
    currents = {}
    for name, (at, site) in placed.items():
        cur = copy.deepcopy(site.candidates[site.current])  # one copy per site: sharing kept
        currents[name] = cur
        for n in at:
            set_module(reference, n, cur)
    wrapped = None if timer is None else (
        lambda name, fn, mrt: timer(f"{MODEL}/{name}", fn, mrt))
    p = measure.paired({"current": _runner(reference, inputs, kwargs),
                        "accelerated": _runner(model, inputs, kwargs)}, reference="current",
                       rounds=rounds, min_run_time=min_run_time, timer=wrapped)
    ratio = p.ratio["accelerated"]
    lo, hi = p.ratio_spread["accelerated"]
    current = rows[0]["current"] if rows else "current"
    slower = ratio < 1.0
    noisy = lo < 1.0 - margin
    row = {"layer": MODEL, "current": current, "chosen": "per-layer",
           "current_ms": p.seconds["current"] * 1e3,
           "accelerated_ms": p.seconds["accelerated"] * 1e3, "speedup": ratio,
           "speedup_min": lo, "speedup_max": hi, "choice_speedup": ratio,
           "choice_speedup_min": lo, "choice_speedup_max": hi,
           "reverted": slower or noisy, "warnings": ""}
    if row["reverted"]:
        why = (f"ran the whole model at {ratio:.2f}x the current paths (median of {rounds} "
               f"paired rounds)" if slower else
               f"ran the whole model at {ratio:.2f}x the current paths in the median but "
               f"{lo:.2f}x in one of {rounds} paired rounds (below 1 - margin = "
               f"{1 - margin:.2f}: not shown to be no slower)")
        msg = (f"the per-layer choice {why}; every layer reverted to its current path, so "
               f"the model runs at the current paths' speed (speedup 1, not re-timed)")
        warnings.warn(msg, stacklevel=3)
        # the model left runs the reference's modules: its speedup is 1 by identity
        row.update(chosen=current, warnings=msg, speedup=1.0, speedup_min=None,
                   speedup_max=None)
        for r in rows:
            if r["layer"] in placed:
                at, site = placed[r["layer"]]
                new = site.candidates[site.current]
                replace(model, model.get_submodule(at[0]), new, at)
                r.update(chosen=site.current, kernel_path=_path_of(new, site.current),
                         reverted=True)
    return row


def chosen_paths(rows: list[dict]) -> dict[str, str]:
    """``{layer: kernel path}`` of what :func:`accelerate` left in the model."""
    return {r["layer"]: r["kernel_path"] for r in rows
            if r["layer"] != MODEL and "kernel_path" in r}


def summary(rows: list[dict]) -> dict:
    """The ``<model>`` row (or a no-change row when no site changed path)."""
    for r in rows:
        if r["layer"] == MODEL:
            return r
    current = rows[0]["current"] if rows else ""
    return {"layer": MODEL, "current": current, "chosen": current, "speedup": 1.0,
            "choice_speedup": None, "reverted": False,
            "warnings": "no layer changed path: nothing to re-time"}


def find_sites(model: nn.Module, sites) -> dict[str, Site]:
    """``{name: Site}`` as :func:`accelerate` finds them: each module once, under its first
    name, and a site's submodules not visited."""
    site_of, found, skip = sites(model), {}, ()
    for name, mod in model.named_modules():
        if name == "" or (skip and name.startswith(skip)):
            continue
        site = site_of(name, mod)
        if site is not None:
            found[name] = site
            skip = (*skip, name + ".")
    return found


def place(model: nn.Module, sites, choices: dict[str, str]) -> list[dict]:
    """Put each site named in ``choices`` (``{site name: candidate name}``) on that
    candidate, without timing anything: a measured choice replayed, e.g. by
    :func:`labkit.load` from the rows :func:`accelerate` returned (``{r["layer"]:
    r["chosen"]}`` of the rows with a ``kernel_path``: the sites it replaced). ``sites`` is
    the same site builder. Sites not named stay as they are; a name that is no site of this
    model, or a candidate its site does not offer, is an error. Returns one row per site
    placed (``layer``, ``current``, ``chosen``, ``kernel_path``, ``aliases``)."""
    model.eval()
    found = find_sites(model, sites)
    for name, cand in choices.items():
        if name not in found:
            raise V.LabkitConfigError("site", name,
                                      f"a site of this model ({', '.join(list(found)[:8])}"
                                      f"{', ...' if len(found) > 8 else ''})")
        if cand not in found[name].candidates:
            raise V.LabkitConfigError(f"candidate of {name}", cand,
                                      "one of " + ", ".join(found[name].candidates))
    names, rows = aliases(model), []
    for name, site in found.items():
        if name not in choices:
            continue
        at, new = names[id(site.module)], site.candidates[choices[name]]
        replace(model, site.module, new, at)
        rows.append({"layer": name, "current": site.current, "chosen": choices[name],
                     "kernel_path": _path_of(new, choices[name]), "aliases": ", ".join(at)})
    return rows


__all__ = ["MODEL", "REUSED", "REVERTED", "Site", "accelerate", "aliases", "choose",
           "chosen_paths", "find_sites", "place", "replace", "set_module", "site_signature",
           "summary"]
