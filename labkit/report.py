"""Execute notebooks headlessly and collect them into a self-contained HTML report.

* :func:`execute_notebook` runs one notebook through papermill with parameters, rejects
  parameters its ``parameters`` cell does not define, and returns the metrics JSON the
  notebook wrote with :func:`labkit.notebook.finish`.
* :func:`report` executes several notebooks into a fresh, timestamped folder: the executed
  notebooks, one offline HTML page per notebook sharing one plotly.js and one MathJax in
  ``assets/`` (:mod:`labkit.report_html`), an ``index.html`` with every notebook's status
  and its 3-5 headline metrics, and ``results.jsonl`` with one tidy row per notebook x
  metric plus the notebooks' own rows. Earlier folders are never touched.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import time
import warnings
from pathlib import Path

from . import report_html as H
from . import validate as V
from .notebook import atomic_write, write_json_atomic
from .report_html import notebook_html  # noqa: F401 - labkit.report.notebook_html


def notebooks_dir() -> Path:
    """The notebooks folder: ``$LABKIT_NOTEBOOKS``, else the copy shipped in an installed
    wheel (``labkit/_shipped/notebooks``, see setup.py), else the source tree's
    ``notebooks/`` (a checkout or an editable install)."""
    env = os.environ.get("LABKIT_NOTEBOOKS")
    if env:
        return Path(env)
    shipped = Path(__file__).resolve().parent / "_shipped" / "notebooks"
    if shipped.is_dir():
        return shipped
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


def latest_benchmarks(folder) -> list[dict]:
    """The newest ``labkit bench`` results file of each benchmark in ``folder`` (files
    ``bench-<name>-<UTC>.json``, as ``labkit bench`` writes them); none without a folder."""
    if folder is None:
        return []
    folder = Path(folder)
    if not folder.is_dir():
        raise V.LabkitConfigError("bench_dir", str(folder), "a folder of labkit bench results")
    newest: dict = {}
    for path in sorted(folder.glob("bench-*.json")):
        try:
            data = json.loads(path.read_text())
        except ValueError:
            warnings.warn(f"{path} is not a labkit bench results file (not JSON); skipped",
                          stacklevel=2)
            continue
        if isinstance(data, dict) and "bench" in data and "result" in data:
            order = (data["date"], path.stat().st_mtime_ns)  # same second: the later write
            if data["bench"] not in newest or order >= newest[data["bench"]]["_order"]:
                newest[data["bench"]] = {**data, "file": path.name, "_order": order}
    return [newest[k] for k in sorted(newest)]


def real_parameters(path) -> dict:
    """The notebook's own additions to the real-text profile (metadata ``labkit.real``):
    what a real model on real text needs beyond the offline default (a longer search, more
    recovery steps)."""
    nb = json.loads(Path(path).read_text())
    return dict(nb.get("metadata", {}).get("labkit", {}).get("real", {}))


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


def quiet_kernel_manager(log_path: Path):
    """A kernel manager whose kernel writes its stdout/stderr to ``log_path``: ipykernel's
    "running over TCP without encryption" warning at every start and its "KeyboardInterrupt
    caught in kernel" at shutdown are recorded there instead of filling the terminal.
    (Cell outputs travel over the kernel's messages, not these streams.)"""
    from jupyter_client.manager import AsyncKernelManager

    class QuietKernelManager(AsyncKernelManager):
        async def _async_launch_kernel(self, kernel_cmd, **kw):
            with open(log_path, "ab") as log:  # the kernel process keeps its own copy
                kw["stdout"] = kw["stderr"] = log
                return await super()._async_launch_kernel(kernel_cmd, **kw)

    return QuietKernelManager


KERNEL_START_TIMEOUT = 300  # seconds for a kernel to answer after start


def execute_notebook(path, out_dir, params: dict, raise_on_error: bool = True,
                     timeout: float | None = None, progress: str | None = None) -> dict:
    """Run ``path`` through papermill into ``out_dir`` with ``params`` (plus
    ``interactive=False`` and ``out=<out_dir>/<name>.metrics.json``).

    Returns the metrics JSON dict (``notebook, params, metrics, rows, env``) with
    ``"_executed"``: the executed notebook's path. On failure, raises
    :class:`NotebookFailed` (``raise_on_error``) or returns
    ``{"notebook", "ok": False, "error", "_executed"}``. ``progress``: a label for a
    per-cell progress bar (cells done, elapsed time), or None for no bar. The kernel's own
    stderr goes to ``out_dir/kernels.log``; the executed notebook is stored without widget
    state, without an inline copy of plotly.js and without the HTML copy of each figure
    (:func:`labkit.report_html.slim_notebook`).
    """
    import papermill as pm

    path = Path(path)
    if not path.is_file():
        raise V.LabkitConfigError("notebook", str(path), "one of " + (
            ", ".join(available(path.parent)) or f"the notebooks in {path.parent}"))
    params = dict(params or {})
    check_parameters(path, params)
    out_dir = Path(out_dir).resolve()  # papermill runs inside the notebook's folder
    out_dir.mkdir(parents=True, exist_ok=True)
    name = path.stem
    executed = out_dir / f"{name}.ipynb"
    metrics_path = (out_dir / f"{name}.metrics.json").resolve()
    metrics_path.unlink(missing_ok=True)  # never read a stale file from an earlier run
    inject = {**params, "interactive": False, "out": str(metrics_path)}
    bar = {"desc": progress, "unit": "cell", "leave": False} if progress else False
    try:
        try:
            pm.execute_notebook(
                str(path), str(executed), parameters=inject, kernel_name="python3",
                progress_bar=bar, cwd=str(path.parent), execution_timeout=timeout,
                # a kernel importing torch on a busy 2-core box can take over papermill's 60 s
                start_timeout=KERNEL_START_TIMEOUT, store_widget_state=False,
                kernel_manager_class=quiet_kernel_manager(out_dir / "kernels.log"))
        finally:
            _slim_executed(executed)
        if not metrics_path.is_file():
            raise RuntimeError(f"the notebook did not write its metrics JSON to {metrics_path}"
                               " (does it call labkit.notebook.finish(out, ...)?)")
        result = json.loads(metrics_path.read_text())
        os.chmod(metrics_path, 0o644)
    except Exception as exc:  # reported, or re-raised with the notebook's text
        error = _error_text(exc)
        if raise_on_error:
            raise NotebookFailed(name, error, str(executed)) from exc
        return {"notebook": name, "ok": False, "error": error, "_executed": str(executed)}
    result["_executed"] = str(executed)
    return result


def _slim_executed(executed: Path) -> None:
    """Rewrite the executed notebook slimmed for storage (atomic): no widget state, no
    inline plotly.js, figures as plotly JSON only (see :func:`labkit.report_html.slim_notebook`)."""
    import nbformat

    if not executed.is_file():
        return
    nb = nbformat.read(str(executed), as_version=4)
    if H.slim_notebook(nb):
        _write_text_atomic(executed, nbformat.writes(nb))


def _read_notebook(path: Path):
    import nbformat

    return nbformat.read(str(path), as_version=4)


def _write_text_atomic(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _new_folder(base: Path) -> Path:
    """``base/report-YYYYmmdd-HHMMSS`` (UTC), with ``-2``, ``-3``... if taken; created
    with ``exist_ok=False`` so two runs never share (or overwrite) a folder."""
    base.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("report-%Y%m%d-%H%M%S")
    for i in range(1, 1000):
        folder = base / (stamp if i == 1 else f"{stamp}-{i}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new report folder under {base}")


# --------------------------------------------------------------------------- report

class NothingRan(V.LabkitConfigError):
    """Every notebook stopped at a bad-input check in its first cells: nothing was measured,
    so no report folder is kept. The message carries each notebook's error."""

    def __init__(self, failures: list[dict]):
        self.failures = failures
        self.name, self.value, self.allowed = "notebooks", [f["notebook"] for f in failures], ""
        ValueError.__init__(self, "; ".join(f"{f['notebook']}: {f['error']}" for f in failures)
                            + " (nothing ran, so no report folder was written)")


def check_out(out) -> Path:
    """The parent folder of report folders: an existing folder or a path to create."""
    base = (Path(out) if out is not None else Path("reports")).expanduser().absolute()
    if base.exists() and not base.is_dir():
        raise V.LabkitConfigError("out", str(base),
                                  "a folder to put report folders in (this path is a file)")
    for parent in base.parents:
        if parent.exists():
            if not parent.is_dir():
                raise V.LabkitConfigError("out", str(base), f"a folder path ({parent} is a file)")
            break
    return base


def _config_failure(entry: dict) -> bool:
    return not entry["ok"] and entry["error"].startswith("LabkitConfigError")


def report(notebooks=None, out=None, profile: str = "full", params: dict | None = None,
           timeout: float | None = None, progress: bool = True, source_dir=None,
           model: str | None = None, bench_dir=None) -> Path:
    """Execute ``notebooks`` (names, prefixes or paths; default all) into a new folder under
    ``out`` (default ``./reports``) and return that folder.

    ``profile="fast"`` uses each notebook's ``labkit.fast`` parameters, ``"full"`` its
    defaults; ``params`` override both for every notebook (checked before anything runs).
    A failing notebook is marked failed in ``index.html`` and the others still run. If every
    notebook fails a bad-input check (a ``LabkitConfigError``), nothing was measured: the new
    folder is removed and :class:`NothingRan` is raised. Earlier folders are never touched.
    ``progress`` shows the running notebook, its cells done and the elapsed time.
    ``source_dir`` (a folder with ``mnli/``, ``qnli/``) and ``model`` run the real-text
    profile: each notebook that has those parameters gets them and its backbone's recipe
    (:func:`labkit.classifiers.real_text_params`). ``bench_dir``: a folder of ``labkit
    bench`` results files; the newest of each benchmark is shown with its date and load.
    """
    from tqdm.auto import tqdm

    from .measure import environment

    V.choice("profile", profile, ["full", "fast"])
    paths = resolve(notebooks)
    params = dict(params or {})
    from .classifiers import real_text_params

    per_notebook = {}
    for p in paths:  # fail before running anything
        check_parameters(p, params)
        per_notebook[p] = {**real_text_params(notebook_parameters(p), source_dir, model),
                           **(real_parameters(p) if source_dir is not None else {})}
    base = check_out(out)
    base_existed = base.exists()
    folder = _new_folder(base)
    notes = H.write_assets(folder)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    entries, lines = [], []
    for i, path in enumerate(paths, start=1):
        name = path.stem
        label = f"[{i}/{len(paths)}] {name}"
        merged = {**(fast_parameters(path) if profile == "fast" else {}), **per_notebook[path],
                  **params}
        t0 = time.perf_counter()
        res = execute_notebook(path, folder, merged, raise_on_error=False, timeout=timeout,
                               progress=label if progress else None)
        seconds = time.perf_counter() - t0
        ok = res.get("ok", True)
        if progress:
            tqdm.write(f"{label}: {'ok' if ok else 'FAILED'} in {seconds:.1f} s")
        entry = {"notebook": name, "title": notebook_title(path), "ok": ok,
                 "error": res.get("error", ""), "seconds": seconds,
                 "metrics": res.get("metrics", {}), "headline": res.get("headline"),
                 "params": res.get("params", merged),
                 "claims": [r for r in res.get("rows", []) if r.get("table") == "claims"]}
        executed = Path(res["_executed"])
        if executed.is_file():
            entry["ipynb"] = executed.name
            note = H.cover_figures(folder, _read_notebook(executed), name)
            if note:  # the full plotly.js replaces the small bundle: said and recorded
                warnings.warn(note, stacklevel=2)
                notes.append(note)
            try:
                page = _write_text_atomic(folder / f"{name}.html", H.notebook_html(
                    executed, mathjax=H.mathjax_source() is not None, folder=folder))
                entry["html"] = page.name
            except Exception as exc:  # noqa: BLE001 - recorded, the report goes on
                entry["ok"] = False
                entry["error"] = (entry["error"] + "; " if entry["error"] else "") + \
                    f"HTML export failed: {_error_text(exc)}"
        entries.append(entry)
        base_row = {"report": folder.name, "notebook": name, "profile": profile}
        lines.append({**base_row, "kind": "status", "ok": entry["ok"], "error": entry["error"],
                      "seconds": seconds})
        for k, v in entry["metrics"].items():
            lines.append({**base_row, "kind": "metric", "metric": k, "value": v,
                          "headline": k in H.headline(entry["metrics"], entry["headline"])[0]})
        for row in res.get("rows", []):
            lines.append({**row, **base_row, "kind": "row"})
        # rewrite both after every notebook: a crash leaves a consistent partial report
        _write_text_atomic(folder / "results.jsonl",
                           "".join(json.dumps(x) + "\n" for x in lines))
        _write_text_atomic(folder / "index.html",
                           H.index_html(folder, entries, profile, environment(), notes,
                                        benches=latest_benchmarks(bench_dir)))
    if entries and all(_config_failure(e) for e in entries):
        shutil.rmtree(folder)  # only the folder this call created
        if not base_existed and not any(base.iterdir()):
            base.rmdir()
        raise NothingRan(entries)
    write_json_atomic(folder / "report.json", {
        "folder": str(folder), "profile": profile, "params": params, "env": environment(),
        "source_dir": None if source_dir is None else str(source_dir), "model": model,
        "notes": notes, "notebooks": entries})
    os.chmod(folder / "report.json", 0o644)
    return folder
