"""What every notebook does at its start and end, so notebooks stay thin drivers.

* :func:`start` validates the ``parameters`` cell (a clear error in the first cells),
  seeds, fixes the thread count, and sets a plotly renderer that survives nbconvert HTML.
* :func:`finish` writes the metrics JSON (atomically, never clobbering it on failure)
  that tests and ``labkit report`` read, and returns the closing table.

The metrics JSON: ``{"notebook", "params", "metrics": {name: number}, "headline": [the
3-5 names the report index shows] or null, "rows": [tidy rows], "env": {...}}``.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch

from . import validate as V
from .measure import environment


def start(params: dict, spec: dict | None = None, seed: int | None = 0,
          threads: int | None = None) -> dict:
    """Validate notebook parameters against ``spec`` (see :func:`labkit.validate.params`);
    without one, against :func:`declared` (the ``parameters`` cell's own annotations)."""
    values = V.params(params, declared(params) if spec is None else spec)
    if seed is not None:
        torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    try:
        import plotly.io as pio

        from . import ui

        headless = params.get("interactive") is False
        # plotly's default renderer leaves figures blank in nbconvert HTML; headless runs
        # (papermill, reports) share one plotly.js per report folder instead of embedding it
        pio.renderers.default = shared_plotly_renderer() if headless else "notebook"
        # papermill kernels look live, but nobody renders their widgets: static boards
        ui.set_headless(headless)
    except ImportError:  # pragma: no cover
        pass
    return values


def shared_plotly_renderer() -> str:
    """Register and name a plotly renderer for headless runs: plotly's JSON mimetype (which
    JupyterLab draws) plus HTML that calls ``Plotly`` without embedding plotly.js (4.8 MB);
    the report page loads plotly.js once from its ``assets/`` folder."""
    import plotly.io as pio
    from plotly.io.base_renderers import NotebookRenderer

    if "labkit_shared" not in pio.renderers:
        renderer = NotebookRenderer(include_plotlyjs=False)
        renderer.global_init = False  # its activation would display plotly.js inline
        pio.renderers["labkit_shared"] = renderer
    return "plotly_mimetype+labkit_shared"

# Ranges of the knobs many notebooks share, declared once here. A notebook's other
# parameters are type-checked from their annotation in the ``parameters`` cell, and a
# technique's fields are range-checked by its config (see :func:`config`).
KNOBS = {
    "steps": ("int", 1, None), "batch_size": ("int", 1, 4096), "lr": ("float", 0.0, 1.0, True),
    "eval_every": ("int", 1, None), "n_eval": ("int", 1, None), "n_train": ("int", 1, None),
    "threads": ("int", 0, 256), "seed": ("int", 0, None), "rounds": ("int", 1, 100),
    "min_run_time": ("float", 0.0, 60.0, True), "seq_len": ("int", 8, 4096),
    "max_len": ("int", 8, 4096),
}
_KINDS = {int: ("int",), float: ("float",), bool: ("bool",), str: ("str",)}


def declared(namespace: dict) -> dict:
    """The parameter spec a notebook declares once, in its ``parameters`` cell: every name
    annotated there (``rank: int = 32``, kept in the namespace's ``__annotations__`` even
    when papermill injects new values), its kind from the annotation, ranges from
    :data:`KNOBS` for the shared knobs."""
    spec = {}
    for name, kind in namespace.get("__annotations__", {}).items():
        if kind not in _KINDS:
            raise TypeError(f"parameter {name}: annotate flat literals only (int, float, "
                            f"bool, str), not {kind!r}")
        spec[name] = KNOBS.get(name, _KINDS[kind])
    if not spec:
        raise TypeError("no annotated parameters found: write the parameters cell as "
                        "`name: type = value` lines")
    return spec


def config(cls, params: dict, *names: str, model_cfg=None, **fields: str):
    """Build the technique config ``cls`` from notebook parameters: ``names`` are
    parameters named like the config's fields, ``fields`` maps a field to the parameter
    that feeds it (``parts="sharing"``). With ``model_cfg`` the one model check
    (:func:`labkit.techniques.registry.check`) runs too. A bad value fails here, naming
    the notebook parameter, its value and what the config allows."""
    from .techniques.registry import check

    source = {n: n for n in names} | fields
    try:
        made = cls(**{f: params[p] for f, p in source.items()})
        if model_cfg is not None:
            check(made, model_cfg)
        return made
    except V.LabkitConfigError as e:
        param = source.get(e.name)
        if param is not None and param != e.name:
            raise V.LabkitConfigError(param, params[param], e.allowed) from None
        raise


def _clean(value):
    """JSON-safe: numbers stay numbers, NaN/inf become None, tensors become lists."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if torch.is_tensor(value):
        return _clean(value.tolist())
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def atomic_write(path, write, mode: int | None = 0o644) -> Path:
    """Write ``path`` through ``write(tmp_path)`` on a temp file beside it, then rename: a
    crash, a bad value or a parallel run never leaves a half-written file, and the old
    file survives a failure. The one atomic write of labkit (JSON, text, checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path, payload) -> Path:
    """Write JSON atomically (:func:`atomic_write`)."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1)

    return atomic_write(path, write)


def finish(out: str, notebook: str, params: dict, metrics: dict, rows=None,
           headline=None):
    """Write the metrics JSON to ``out`` (skipped when empty) and return a DataFrame of
    the metrics for display.

    ``headline``: the names of the 3-5 metrics the report's index shows for this notebook,
    claimed vs measured first (the rest stay on the notebook's own page); stored in the
    JSON as ``"headline"``. Without it, the index shows the first 5 with a note."""
    import pandas as pd

    if headline is not None:
        headline = list(headline)
        if not 1 <= len(headline) <= 5 or len(set(headline)) != len(headline):
            raise V.LabkitConfigError("headline", headline, "1 to 5 distinct metric names")
        for name in headline:
            if name not in metrics:
                raise V.LabkitConfigError("headline", name,
                                          "a key of metrics: " + ", ".join(map(str, metrics)))
    if rows is not None and hasattr(rows, "to_dict"):
        rows = rows.to_dict(orient="records")
    payload = {"notebook": notebook, "params": _clean(params), "metrics": _clean(metrics),
               "headline": headline, "rows": _clean(rows or []), "env": environment()}
    if out:
        write_json_atomic(out, payload)
    return pd.DataFrame([{"metric": k, "value": v} for k, v in payload["metrics"].items()])
