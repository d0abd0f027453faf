"""What every notebook does at its start and end, so notebooks stay thin drivers.

* :func:`start` validates the ``parameters`` cell (a clear error in the first cells),
  seeds, fixes the thread count, and sets a plotly renderer that survives nbconvert HTML.
* :func:`finish` writes the metrics JSON (atomically, never clobbering it on failure)
  that tests and ``labkit report`` read, and returns the closing table.

The metrics JSON: ``{"notebook", "params", "metrics": {headline name: number},
"rows": [tidy rows], "env": {...}}``.
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

        # plotly's default renderer leaves figures blank in nbconvert HTML
        pio.renderers.default = "notebook"
        from . import ui

        # papermill kernels look live, but nobody renders their widgets: static boards
        ui.set_headless(params.get("interactive") is False)
    except ImportError:  # pragma: no cover
        pass
    return values


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


def finish(out: str, notebook: str, params: dict, metrics: dict, rows=None):
    """Write the metrics JSON to ``out`` (skipped when empty) and return a DataFrame of
    the headline metrics for display."""
    import pandas as pd

    if rows is not None and hasattr(rows, "to_dict"):
        rows = rows.to_dict(orient="records")
    payload = {"notebook": notebook, "params": _clean(params), "metrics": _clean(metrics),
               "rows": _clean(rows or []), "env": environment()}
    if out:
        write_json_atomic(out, payload)
    return pd.DataFrame([{"metric": k, "value": v} for k, v in payload["metrics"].items()])
