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


def start(params: dict, spec: dict, seed: int | None = 0, threads: int | None = None) -> dict:
    """Validate notebook parameters against ``spec`` (see :func:`labkit.validate.params`)."""
    values = V.params(params, spec)
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


def write_json_atomic(path, payload) -> Path:
    """Write JSON to a temp file beside ``path`` and rename: a failure leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
