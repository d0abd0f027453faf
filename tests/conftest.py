"""Shared fixtures. ``run_notebook(name, **params)`` executes ``notebooks/<name>.ipynb``
through papermill with the notebook's own fast parameters (metadata ``labkit.fast``),
overridden by ``params``, and returns its metrics JSON. Results are cached per session,
so several tests can assert on one run (run with ``--dist loadfile``)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"


def fast_params(name: str) -> dict:
    nb = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
    return dict(nb["metadata"].get("labkit", {}).get("fast", {}))


@pytest.fixture(scope="session")
def run_notebook(tmp_path_factory):
    cache: dict = {}

    def run(name: str, fast: bool = True, **params):
        from labkit.report import execute_notebook

        merged = {**(fast_params(name) if fast else {}), **params}
        key = (name, json.dumps(merged, sort_keys=True))
        if key not in cache:
            out = tmp_path_factory.mktemp(name)
            cache[key] = execute_notebook(NOTEBOOKS / f"{name}.ipynb", out, merged)
        return cache[key]

    return run
