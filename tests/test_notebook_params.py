"""Parameters that depend on the backbone, and the two forms of ``source``.

Every notebook that takes ``model`` leaves its backbone-dependent parameters at 0 (or "")
and resolves them in one place (:func:`labkit.classifiers.with_recipe`), so ``model="minilm"``
alone passes the parameter checks. ``source`` may be a task's own folder (``.../mnli``) or a
folder holding task folders (``.../`` with ``mnli/``, ``qnli/``); the notebook prints and
records which (``params["source_used"]``). The notebook checks run through papermill on each
notebook's cells up to its first code cell (its parameter checks), with the fast parameters.
"""
from __future__ import annotations

import nbformat
import pytest
import torch
from conftest import NOTEBOOKS, fast_params, requires_minilm

from labkit import classifiers as CL
from labkit import data as D
from labkit import glue_files as G
from labkit.validate import LabkitConfigError

MODEL_NOTEBOOKS = ["00_tour", "01_low_rank_attention", "02_kernel_attention",
                   "03_factorized_ffn_and_sharing", "04_sparsity_and_pruning",
                   "06_quantization", "10_paper_reproduction", "11_compression_planner"]


def _checks_only(name: str, folder) -> str:
    """``name`` cut after its first code cell past the parameters (its checks), ending in a
    cell that records the checked parameters ``P`` through ``nb.finish``."""
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    i = next(k for k, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    j = next(k for k in range(i + 1, len(nb.cells)) if nb.cells[k].cell_type == "code")
    nb.cells = nb.cells[: j + 1] + [nbformat.v4.new_code_cell(
        f"nb.finish(out, {name!r}, P, {{'checked': 1}})")]
    path = folder / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path


def _checked_params(name: str, tmp_path, **params) -> dict:
    import tempfile
    from pathlib import Path

    from labkit.report import execute_notebook

    work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=tmp_path))
    res = execute_notebook(_checks_only(name, work), work / "out",
                           {**fast_params(name), **params})
    return res["params"]


def _recipe_names(name: str) -> dict:
    """The notebook's parameters that default to the backbone's recipe: {name: field}."""
    import papermill as pm

    declared = pm.inspect_notebook(str(NOTEBOOKS / f"{name}.ipynb"))
    return {n: f for n, f in CL.RECIPE_FIELDS.items()
            if n in declared and declared[n]["default"] in ("0", "0.0")}


def test_every_model_notebook_defers_backbone_parameters_to_the_recipe():
    """The static half: no notebook that takes ``model`` hard-codes a learning rate, a step
    count or a length that only suits one backbone."""
    import papermill as pm

    for name in MODEL_NOTEBOOKS:
        declared = pm.inspect_notebook(str(NOTEBOOKS / f"{name}.ipynb"))
        assert "model" in declared, name
        for p in CL.RECIPE_FIELDS:
            if p in declared and not (name.startswith("04") and p == "seq_len"):
                assert declared[p]["default"] in ("0", "0.0"), (name, p, declared[p])
    assert _recipe_names("00_tour") == {"baseline_steps": "steps", "lr": "lr",
                                        "max_len": "max_len"}


@requires_minilm
@pytest.mark.parametrize("name", [n for n in MODEL_NOTEBOOKS if not n.startswith("10")])
def test_model_minilm_alone_passes_the_parameter_checks(name, tmp_path):
    fast = fast_params(name)
    p = _checked_params(name, tmp_path, model="minilm")
    recipe = CL.DEFAULTS["minilm"]
    names = _recipe_names(name)
    assert names, name
    for param, field in names.items():
        if param in fast:  # the fast profile gives it: kept as given
            assert p[param] == fast[param]
        else:
            assert p[param] == recipe[field], (param, p[param])
            assert param in p["recipe_filled"]
    for param in ("lr", "finetune_lr", "qat_lr", "baseline_lr"):
        if param in p and param in names:
            assert 0 < p[param] <= CL.MAX_LR["minilm"]
    if name.startswith("03"):
        assert p["task"] == "nli"  # the LM has no MiniLM: the classifier workload


def test_tiny_defaults_resolve_to_the_tiny_recipe_and_the_lm():
    base = {"model": "tiny", "task": "nli", "source": "synthetic", "baseline_steps": 0,
            "lr": 0.0, "max_len": 0}
    p = CL.with_recipe(base, "baseline_steps", "lr", "max_len")
    assert (p["baseline_steps"], p["lr"], p["max_len"]) == (3000, 1e-3, 64)
    assert p["source_used"] == {"synthetic-nli": "synthetic"}
    given = CL.with_recipe({**base, "lr": 5e-4, "baseline_steps": 10}, "baseline_steps", "lr")
    assert (given["baseline_steps"], given["lr"]) == (10, 5e-4)
    assert given["recipe_filled"] == []
    lm = CL.with_recipe({"model": "tiny", "task": "", "source": "synthetic", "lr": 0.0,
                         "seq_len": 0}, "lr", "seq_len", lm_task=True)
    assert (lm["task"], lm["lr"], lm["seq_len"]) == ("lm", 3e-3, 32)
    with pytest.raises(LabkitConfigError, match=r"lr=0.001.*0.0005"):  # tiny's rate on MiniLM
        CL.with_recipe({**base, "model": "minilm", "lr": 1e-3}, "lr")
    with pytest.raises(LabkitConfigError, match="max_len"):
        CL.with_recipe({**base, "max_len": 4}, "max_len")


# --------------------------------------------------------------------------- source forms

def _glue(tmp_path):
    def mnli(n, off):
        return [{"premise": f"the {w} sat on a mat {i}", "hypothesis": f"a {w} sat {i % 3}",
                 "label": i % 3, "idx": i}
                for i, w in ((k, ("cat", "dog", "owl")[k % 3]) for k in range(off, off + n))]

    def qnli(n, off):
        return [{"question": f"where is the {i} key ?", "sentence": f"the key is in box {i}",
                 "label": i % 2, "idx": i} for i in range(off, off + n)]

    root = tmp_path / "glue"
    D.write_local_glue(root / "mnli", "mnli", {"train": mnli(24, 0),
                                               "validation_matched": mnli(9, 100)})
    D.write_local_glue(root / "qnli", "qnli", {"train": qnli(16, 0),
                                               "validation": qnli(6, 100)})
    return root


def test_both_source_forms_read_the_same_rows(tmp_path):
    root = _glue(tmp_path)
    assert G.task_folder(root, "mnli") == (root / "mnli", "root")
    assert G.task_folder(root / "mnli", "mnli") == (root / "mnli", "task")
    a = D.load_task("mnli", source=str(root), max_len=32)
    b = D.load_task("mnli", source=str(root / "mnli"), max_len=32)
    for split in ("train", "eval"):
        for k in a.train:
            assert torch.equal(getattr(a, split)[k], getattr(b, split)[k])
    assert CL.describe_source(str(root), "qnli") == {
        "source": str(root), "path": str(root / "qnli"), "form": "a folder of task folders"}
    assert CL.describe_source(str(root / "qnli"), "qnli")["form"] == "the task's own folder"
    # the other task's own folder is refused by name, not read as this task
    with pytest.raises(LabkitConfigError, match="this is the mnli folder"):
        D.load_task("qnli", source=str(root / "mnli"))
    with pytest.raises(LabkitConfigError, match="or a folder holding qnli/"):
        D.load_task("qnli", source=str(tmp_path))


def test_a_classifier_records_which_source_form_it_read(tmp_path):
    root = _glue(tmp_path)
    fast = dict(steps=3, batch_size=4, max_len=32, progress=False, cache_dir=tmp_path / "c")
    one = CL.classifier("tiny", "qnli", str(root), **fast)
    two = CL.classifier("tiny", "qnli", str(root / "qnli"), **fast)
    assert two.cached and two.path == one.path  # the same rows: the same trained model
    assert one.recipe["data"]["form"] == "a folder of task folders"
    assert two.recipe["data"]["form"] == "the task's own folder"
    assert one.recipe["data"]["path"] == two.recipe["data"]["path"] == str(root / "qnli")


@pytest.mark.parametrize("form", ["root", "task"])
def test_notebook_00_reads_either_form_and_says_which(form, tmp_path):
    root = _glue(tmp_path)
    source = root if form == "root" else root / "qnli"
    p = _checked_params("00_tour", tmp_path, source=str(source))
    used = p["source_used"]["qnli"]
    assert used.startswith(str(root / "qnli"))
    assert used.endswith("(a folder of task folders)" if form == "root"
                         else "(the task's own folder)")


def test_notebook_10_reads_a_task_folder_too(tmp_path):
    root = _glue(tmp_path)
    p = _checked_params("10_paper_reproduction", tmp_path, source=str(root / "mnli"),
                        tasks="nli")
    assert p["source_used"] == {"mnli": f"{root / 'mnli'} (the task's own folder)"}
    p = _checked_params("10_paper_reproduction", tmp_path, source=str(root))
    assert set(p["source_used"]) == {"mnli", "qnli"}
