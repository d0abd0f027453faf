"""Every notebook follows the notebook contract (static checks, no kernel): a ``parameters``
cell with ``interactive`` and ``out``, a fast parameter set naming only real parameters,
outputs stripped, and its own tests/test_notebook_<NN>.py."""
from __future__ import annotations

import json
import re
from pathlib import Path

import papermill as pm
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
ids = [p.stem for p in NOTEBOOKS]


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/*.ipynb is empty"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_name_is_numbered(path):
    assert re.fullmatch(r"\d\d_[a-z0-9_]+", path.stem), path.stem


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_one_parameters_cell_with_interactive_and_out(path):
    nb = json.loads(path.read_text())
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.stem}: {len(tagged)} cells tagged parameters"
    params = pm.inspect_notebook(str(path))
    assert params["interactive"]["default"] == "True"
    assert params["out"]["default"] in ('""', "''")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_fast_parameters_are_parameters(path):
    nb = json.loads(path.read_text())
    fast = nb["metadata"].get("labkit", {}).get("fast")
    assert isinstance(fast, dict) and fast, f"{path.stem}: metadata labkit.fast missing"
    defined = set(pm.inspect_notebook(str(path)))
    assert set(fast) <= defined, f"{path.stem}: not parameters: {sorted(set(fast) - defined)}"
    assert not {"interactive", "out"} & set(fast), "the runner sets interactive and out"
    assert nb["metadata"]["labkit"].get("title"), f"{path.stem}: metadata labkit.title missing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_outputs_are_stripped(path):
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"{path.stem} cell {i} has stored outputs"
            assert cell.get("execution_count") is None, f"{path.stem} cell {i} was executed"
    assert "widgets" not in nb["metadata"], f"{path.stem} stores widget state"
    assert "papermill" not in nb["metadata"], f"{path.stem} is an executed copy"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_each_notebook_has_its_test_file(path):
    number = path.stem.split("_", 1)[0]
    assert (ROOT / "tests" / f"test_notebook_{number}.py").is_file(), \
        f"tests/test_notebook_{number}.py is missing for {path.name}"
