"""A non-editable install works: build the wheel, install it into a fresh venv (no network:
--no-deps; the venv sees the packages of the Python running the tests through a ``.pth`` file,
wherever they live: a user's venv or the system) and run ``labkit report`` from another
folder. Checks the wheel ships the notebooks, the data file and py.typed, and that
the cache goes to $LABKIT_CACHE, not beside site-packages."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.install


def _run(argv, cwd, env, timeout=900):
    res = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, f"{argv}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _see_runner_packages(py: Path, cwd: Path, env: dict) -> None:
    """Let the new venv import what the test runner's Python has (torch, jupyter, ...), from
    a venv or the system alike: its site-packages folders go, as plain lines, into a ``.pth``
    file of the new venv (plain lines: the runner's own ``.pth`` files, among them an
    editable labkit, are not run, so ``import labkit`` finds the wheel)."""
    runner = [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))]
    assert runner, f"the test runner's Python has no site-packages on sys.path: {sys.path}"
    site = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                cwd, env).stdout.strip()
    (Path(site) / "labkit-test-runner-packages.pth").write_text("\n".join(runner) + "\n")


def test_wheel_install_runs_a_report_from_another_folder(tmp_path):
    src = tmp_path / "src"  # build from a copy: the work tree gets no build/ or egg-info
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "build", "*.egg-info", "reports", "cache", ".venv", "dist",
        ".pytest_cache", ".ruff_cache", "_shipped"))
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "LABKIT_NOTEBOOKS", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", str(tmp_path / "dist"), str(src)], tmp_path, env)
    (wheel,) = (tmp_path / "dist").glob("labkit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    notebooks = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert sorted(n.rsplit("/", 1)[1] for n in names
                  if n.startswith("labkit/_shipped/notebooks/")) == notebooks
    assert "labkit/_shipped/data/sentences_en.txt" in names and "labkit/py.typed" in names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, env)
    py = venv / "bin" / "python"
    _see_runner_packages(py, tmp_path, env)
    _run([str(py), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], tmp_path, env)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([str(py), "-c", "import labkit, labkit.report as R, labkit.data as D;"
                  "print(labkit.__file__); print(R.notebooks_dir()); print(D.DATA_DIR)"],
                 elsewhere, env).stdout.split()
    site = str(venv / "lib")
    assert all(w.startswith(site) for w in where), where  # the wheel, not the source tree

    env["LABKIT_CACHE"] = str(tmp_path / "cache")
    # nbconvert's templates live in <prefix>/share/jupyter; a venv sees only its own prefix
    env["JUPYTER_PATH"] = os.pathsep.join(
        [str(Path(sys.prefix) / "share" / "jupyter"), env.get("JUPYTER_PATH", "")]).strip(os.pathsep)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    res = _run([str(venv / "bin" / "labkit"), "report", "00", "--profile", "fast",
                "--out", "reports"], elsewhere, env)
    (folder,) = (elsewhere / "reports").iterdir()
    assert "00_tour: ok" in res.stdout
    report = json.loads((folder / "report.json").read_text())
    assert [n["ok"] for n in report["notebooks"]] == [True]
    assert (folder / "00_tour.html").is_file() and (folder / "assets" / "plotly.min.js").is_file()
    assert report["notes"] == []  # the wheel ships plotly.js's cartesian bundle (labkit/assets)
    assert not list(Path(site).rglob("*.pt"))  # no cache written beside site-packages
