"""Execute notebooks headlessly and collect them into a self-contained HTML report.

* :func:`execute_notebook` runs one notebook through papermill with parameters, rejects
  parameters its ``parameters`` cell does not define, and returns the metrics JSON the
  notebook wrote with :func:`labkit.notebook.finish`.
* :func:`report` executes several notebooks into a fresh, timestamped folder: the executed
  notebooks, one offline HTML page per notebook (plotly.js embedded), an ``index.html``
  with every notebook's status and headline metrics, and ``results.jsonl`` with one tidy
  row per notebook x metric plus the notebooks' own rows. Earlier folders are never touched.
"""
from __future__ import annotations

import datetime as _dt
import html
import json
import os
import tempfile
from pathlib import Path

from . import validate as V
from .notebook import write_json_atomic


def notebooks_dir() -> Path:
    """The notebooks folder: ``$LABKIT_NOTEBOOKS`` or the repository's ``notebooks/``."""
    env = os.environ.get("LABKIT_NOTEBOOKS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "notebooks"


def available(folder: Path | None = None) -> list[str]:
    """Names (stems) of the notebooks in ``folder``, sorted."""
    folder = Path(folder) if folder is not None else notebooks_dir()
    return sorted(p.stem for p in folder.glob("*.ipynb") if not p.name.startswith("."))


def resolve(names, folder: Path | None = None) -> list[Path]:
    """Notebook paths for names like ``01_low_rank_attention``, a prefix ``01`` or a path.
    ``None``/empty means all notebooks. Unknown or ambiguous names raise
    :class:`~labkit.validate.LabkitConfigError` listing the allowed names."""
    folder = Path(folder) if folder is not None else notebooks_dir()
    names_all = available(folder)
    if not names:
        if not names_all:
            raise V.LabkitConfigError("notebooks", str(folder), "a folder with *.ipynb notebooks")
        return [folder / f"{n}.ipynb" for n in names_all]
    out = []
    for name in names:
        p = Path(name)
        if p.suffix == ".ipynb" and p.is_file():
            out.append(p)
            continue
        stem = p.stem if p.suffix == ".ipynb" else str(name)
        hits = [n for n in names_all if n == stem] or [n for n in names_all if n.startswith(stem)]
        if len(hits) != 1:
            what = "a unique name or prefix of " if hits else "one of "
            raise V.LabkitConfigError("notebook", name, what + (", ".join(hits or names_all)
                                                                   or "(no notebooks found)"))
        out.append(folder / f"{hits[0]}.ipynb")
    return out


def notebook_parameters(path) -> dict:
    """``{name: default}`` of the notebook's ``parameters`` cell (via papermill)."""
    import papermill as pm

    return {k: v["default"] for k, v in pm.inspect_notebook(str(path)).items()}


def check_parameters(path, params: dict) -> None:
    """Reject parameters the notebook does not define (papermill would only warn)."""
    defined = notebook_parameters(path)
    for name, value in params.items():
        if name not in defined:
            raise V.LabkitConfigError(
                name, value, f"a parameter of {Path(path).stem}: one of " + ", ".join(defined))


def fast_parameters(path) -> dict:
    """The notebook's fast parameter set (metadata ``labkit.fast``)."""
    nb = json.loads(Path(path).read_text())
    return dict(nb.get("metadata", {}).get("labkit", {}).get("fast", {}))


def notebook_title(path) -> str:
    nb = json.loads(Path(path).read_text())
    return nb.get("metadata", {}).get("labkit", {}).get("title") or Path(path).stem


class NotebookFailed(RuntimeError):
    """A notebook raised while executing; the message carries the notebook's error text."""

    def __init__(self, notebook: str, error: str, executed: str):
        self.notebook, self.error, self.executed = notebook, error, executed
        super().__init__(f"{notebook} failed: {error} (executed notebook: {executed})")


def _error_text(exc: BaseException) -> str:
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    if ename is not None:
        return f"{ename}: {evalue}"
    return f"{type(exc).__name__}: {exc}"


def execute_notebook(path, out_dir, params: dict, raise_on_error: bool = True,
                     timeout: float | None = None) -> dict:
    """Run ``path`` through papermill into ``out_dir`` with ``params`` (plus
    ``interactive=False`` and ``out=<out_dir>/<name>.metrics.json``).

    Returns the metrics JSON dict (``notebook, params, metrics, rows, env``) with
    ``"_executed"``: the executed notebook's path. On failure, raises
    :class:`NotebookFailed` (``raise_on_error``) or returns
    ``{"notebook", "ok": False, "error", "_executed"}``.
    """
    import papermill as pm

    path = Path(path)
    if not path.is_file():
        raise V.LabkitConfigError("notebook", str(path), "one of " + (
            ", ".join(available(path.parent)) or f"the notebooks in {path.parent}"))
    params = dict(params or {})
    check_parameters(path, params)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = path.stem
    executed = out_dir / f"{name}.ipynb"
    metrics_path = (out_dir / f"{name}.metrics.json").resolve()
    metrics_path.unlink(missing_ok=True)  # never read a stale file from an earlier run
    inject = {**params, "interactive": False, "out": str(metrics_path)}
    try:
        pm.execute_notebook(
            str(path), str(executed), parameters=inject, kernel_name="python3",
            progress_bar=False, cwd=str(path.parent), execution_timeout=timeout,
            store_widget_state=False)
        if not metrics_path.is_file():
            raise RuntimeError(f"the notebook did not write its metrics JSON to {metrics_path}"
                               " (does it call labkit.notebook.finish(out, ...)?)")
        result = json.loads(metrics_path.read_text())
    except Exception as exc:  # noqa: BLE001 - reported, or re-raised with the notebook's text
        error = _error_text(exc)
        if raise_on_error:
            raise NotebookFailed(name, error, str(executed)) from exc
        return {"notebook": name, "ok": False, "error": error, "_executed": str(executed)}
    result["_executed"] = str(executed)
    return result
