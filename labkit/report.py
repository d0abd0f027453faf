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
import re
import time
from pathlib import Path

from . import validate as V
from .notebook import atomic_write, write_json_atomic


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
        os.chmod(metrics_path, 0o644)
    except Exception as exc:  # reported, or re-raised with the notebook's text
        error = _error_text(exc)
        if raise_on_error:
            raise NotebookFailed(name, error, str(executed)) from exc
        return {"notebook": name, "ok": False, "error": error, "_executed": str(executed)}
    result["_executed"] = str(executed)
    return result


# --------------------------------------------------------------------------- HTML

_REMOTE_SCRIPT = re.compile(r'<script\b[^>]*\bsrc="https?://[^"]*"[^>]*>\s*</script>', re.IGNORECASE)


def _offline(page: str) -> str:
    """Make an nbconvert page self-sufficient offline: plotly.js is already inline (the
    ``notebook`` renderer embeds it once per notebook); drop require.js (nothing here uses
    it) and plotly's per-figure MathJax 3 tag, and load nbconvert's MathJax ``async`` so
    equations typeset when a network is there and nothing waits for it when not."""
    def fix(m):
        tag = m.group(0)
        if "mathjax/2." in tag:
            return tag.replace("<script ", "<script async ", 1)
        return ""

    return _REMOTE_SCRIPT.sub(fix, page)


def notebook_html(executed) -> str:
    """One self-contained HTML page for an executed notebook (nbconvert, lab template)."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(executed), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            # widget views (e.g. tqdm.auto bars) without stored state only keep the text
            # of their first frame ("0/30"), which would misreport the run: drop them
            cell.outputs = [o for o in cell.outputs
                            if "application/vnd.jupyter.widget-view+json" not in o.get("data", {})]
    page, _ = HTMLExporter(template_name="lab", embed_images=True).from_notebook_node(nb)
    return _offline(page)


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


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _claims_html(entries: list[dict]) -> str:
    """The one-page summary on top of the index: every claim a notebook checked (its rows
    with ``table == "claims"``: claim, verdict, evidence), linked to the notebook's page."""
    e = html.escape
    rows = []
    for r in entries:
        link = f'<a href="{e(r["html"])}">{e(r["notebook"])}</a>' if r.get("html") else \
            e(r["notebook"])
        for c in r.get("claims") or []:
            v = str(c.get("verdict", ""))
            cls = "ok" if v == "holds" else "failed" if v.startswith("does not") else "partial"
            rows.append(f"<tr><td>{e(str(c.get('claim', '')))}</td><td class='{cls}'>{e(v)}"
                        f"</td><td class='small'>{e(str(c.get('evidence', '')))}</td>"
                        f"<td>{link}</td></tr>")
    if not rows:
        return ""
    return ("<h2>Claims and verdicts</h2><p class='small'>Each claim of the papers checked "
            "on this machine; the figures are on the linked notebook page.</p><table><tr>"
            "<th>claim</th><th>verdict</th><th>evidence</th><th>notebook</th></tr>"
            + "".join(rows) + "</table>")


def _index_html(folder: Path, entries: list[dict], profile: str, env: dict) -> str:
    e = html.escape
    rows = []
    for r in entries:
        status = ('<span class="ok">ok</span>' if r["ok"] else
                  f'<span class="failed">failed</span><div class="err">{e(r["error"])}</div>')
        links = []
        if r.get("html"):
            links.append(f'<a href="{e(r["html"])}">{e(r["notebook"])}</a>')
        else:
            links.append(e(r["notebook"]))
        if r.get("ipynb"):
            links.append(f'<a class="small" href="{e(r["ipynb"])}">ipynb</a>')
        metrics = "".join(f"<tr><td>{e(str(k))}</td><td>{_fmt(v)}</td></tr>"
                          for k, v in (r.get("metrics") or {}).items())
        params = ", ".join(f"{e(str(k))}={_fmt(v)}" for k, v in (r.get("params") or {}).items()
                           if k not in ("out", "interactive"))
        rows.append(
            f"<tr><td>{' '.join(links)}<div class='small'>{e(r['title'])}</div></td>"
            f"<td>{status}</td><td>{r['seconds']:.1f}</td>"
            f"<td><table class='m'>{metrics}</table></td><td class='small'>{params}</td></tr>")
    envrows = "".join(f"<tr><td>{e(str(k))}</td><td>{_fmt(v)}</td></tr>" for k, v in env.items())
    n_ok = sum(r["ok"] for r in entries)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>labkit report {e(folder.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px;
vertical-align: top; text-align: left; }} table.m td {{ border: none; padding: 0 8px 0 0; }}
.ok {{ color: #070; font-weight: bold; }} .failed {{ color: #b00; font-weight: bold; }}
.err {{ color: #b00; font-family: monospace; white-space: pre-wrap; max-width: 40em; }}
.small {{ font-size: 85%; color: #555; }} .partial {{ color: #a60; font-weight: bold; }}
</style></head><body>
<h1>labkit report</h1>
<p>{e(folder.name)} &middot; profile <b>{e(profile)}</b> &middot; {n_ok}/{len(entries)} notebooks
ok &middot; every number was measured on the machine below; tidy rows in
<a href="results.jsonl">results.jsonl</a>.</p>
{_claims_html(entries)}
<h2>Notebooks</h2>
<table><tr><th>notebook</th><th>status</th><th>seconds</th><th>headline metrics</th>
<th>parameters</th></tr>
{''.join(rows)}
</table>
<h2>Environment</h2><table>{envrows}</table>
</body></html>
"""


# --------------------------------------------------------------------------- report

def report(notebooks=None, out=None, profile: str = "full", params: dict | None = None,
           timeout: float | None = None, source_dir=None, model: str | None = None) -> Path:
    """Execute ``notebooks`` (names, prefixes or paths; default all) into a new folder under
    ``out`` (default ``./reports``) and return that folder.

    ``profile="fast"`` uses each notebook's ``labkit.fast`` parameters, ``"full"`` its
    defaults; ``params`` override both for every notebook (checked before anything runs).
    A failing notebook is marked failed in ``index.html`` and the others still run.
    ``source_dir`` (a folder with ``mnli/``, ``qnli/``) and ``model`` run the real-text
    profile: each notebook that has those parameters gets them
    (:func:`labkit.classifiers.real_text_params`).
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
        per_notebook[p] = real_text_params(notebook_parameters(p), source_dir, model)
    folder = _new_folder(Path(out) if out is not None else Path.cwd() / "reports")
    entries, lines = [], []
    for path in tqdm(paths, desc="report", unit="notebook"):
        name = path.stem
        merged = {**(fast_parameters(path) if profile == "fast" else {}), **per_notebook[path],
                  **params}
        t0 = time.perf_counter()
        res = execute_notebook(path, folder, merged, raise_on_error=False, timeout=timeout)
        seconds = time.perf_counter() - t0
        ok = res.get("ok", True)
        entry = {"notebook": name, "title": notebook_title(path), "ok": ok,
                 "error": res.get("error", ""), "seconds": seconds,
                 "metrics": res.get("metrics", {}), "params": res.get("params", merged),
                 "claims": [r for r in res.get("rows", []) if r.get("table") == "claims"]}
        executed = Path(res["_executed"])
        if executed.is_file():
            entry["ipynb"] = executed.name
            try:
                page = _write_text_atomic(folder / f"{name}.html", notebook_html(executed))
                entry["html"] = page.name
            except Exception as exc:  # noqa: BLE001 - recorded, the report goes on
                entry["ok"] = False
                entry["error"] = (entry["error"] + "; " if entry["error"] else "") + \
                    f"HTML export failed: {_error_text(exc)}"
        entries.append(entry)
        base = {"report": folder.name, "notebook": name, "profile": profile}
        lines.append({**base, "kind": "status", "ok": entry["ok"], "error": entry["error"],
                      "seconds": seconds})
        for k, v in entry["metrics"].items():
            lines.append({**base, "kind": "metric", "metric": k, "value": v})
        for row in res.get("rows", []):
            lines.append({**row, **base, "kind": "row"})
        # rewrite both after every notebook: a crash leaves a consistent partial report
        _write_text_atomic(folder / "results.jsonl",
                           "".join(json.dumps(x) + "\n" for x in lines))
        _write_text_atomic(folder / "index.html",
                           _index_html(folder, entries, profile, environment()))
    write_json_atomic(folder / "report.json", {
        "folder": str(folder), "profile": profile, "params": params, "env": environment(),
        "source_dir": None if source_dir is None else str(source_dir), "model": model,
        "notebooks": entries})
    os.chmod(folder / "report.json", 0o644)
    return folder
