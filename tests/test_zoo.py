import warnings

import pytest
import torch

from labkit import data as D
from labkit import zoo

SMALL = dict(steps=5, n_train=100, n_eval=30, progress=False)


def test_trained_baseline_is_cached_and_reloads_identically(tmp_path):
    a = zoo.trained_encoder(**SMALL, cache_dir=tmp_path)
    assert not a.cached and a.path.is_file() and 0 <= a.metrics["accuracy"] <= 1
    b = zoo.trained_encoder(**SMALL, cache_dir=tmp_path)
    assert b.cached and b.metrics == a.metrics
    for (n, p), (_, q) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(p, q), n
    c = zoo.trained_encoder(**{**SMALL, "steps": 6}, cache_dir=tmp_path)
    assert c.path != a.path and not c.cached
    d = zoo.trained_encoder(**SMALL, cache_dir=tmp_path, vocab_size=40)
    assert d.path != a.path and not d.cached and len(d.task.tokenizer) == 40
    assert not list(tmp_path.glob(".*.tmp"))


def _folder(path, label_of_first):
    rows = D.synthetic_nli(60, seed=0, part="train")
    rows[0] = {**rows[0], "label": label_of_first}
    return D.write_local_glue(path, "mnli", {
        "train": rows, "validation_matched": D.synthetic_nli(20, seed=0, part="eval")})


def test_cache_key_follows_the_data_content_not_the_folder(tmp_path):
    args = dict(task="mnli", steps=5, n_train=60, n_eval=20, progress=False,
                cache_dir=tmp_path / "cache")
    folder = _folder(tmp_path / "glue", 0)
    a = zoo.trained_encoder(source=str(folder), **args)
    same = _folder(tmp_path / "copy", 0)  # same rows, another path: the same weights
    assert zoo.trained_encoder(source=str(same), **args).cached
    _folder(folder, 1)  # one label edited in place: the old weights must not load
    b = zoo.trained_encoder(source=str(folder), **args)
    assert not b.cached and b.path != a.path


def test_cache_key_includes_code_version(tmp_path, monkeypatch):
    from labkit import cache

    a = zoo.trained_encoder(**SMALL, cache_dir=tmp_path)
    monkeypatch.setattr(cache, "package_digest", lambda root: "0.0.0+changed")
    b = zoo.trained_encoder(**SMALL, cache_dir=tmp_path)
    assert not b.cached and b.path != a.path


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_cache_retrains_with_a_warning(tmp_path, damage):
    a = zoo.trained_encoder(**SMALL, cache_dir=tmp_path)
    blob = a.path.read_bytes()
    a.path.write_bytes(blob[: len(blob) // 3] if damage == "truncate" else b"not a checkpoint")
    with pytest.warns(zoo.CacheWarning, match="unusable.*retraining"):
        b = zoo.trained_encoder(**SMALL, cache_dir=tmp_path)
    assert not b.cached and b.metrics == a.metrics
    with warnings.catch_warnings():
        warnings.simplefilter("error", zoo.CacheWarning)
        assert zoo.trained_encoder(**SMALL, cache_dir=tmp_path).cached  # repaired


def test_default_cache_is_a_user_folder_or_labkit_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path / "c"))
    assert zoo.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LABKIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    where = zoo.default_cache_dir()
    assert where.name == "labkit" and str(where).startswith(str(tmp_path / "xdg"))
    assert "site-packages" not in str(where)


def test_depth_baselines_share_the_zoo_cache_and_retrain_when_corrupt(tmp_path, monkeypatch):
    """labs.depth caches under zoo's folder, keyed with the code version; a truncated file
    retrains with a CacheWarning instead of crashing."""
    from labkit.labs import depth

    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path))
    first = depth.trained_lm(n_layers=2, steps=3, n_eval=16)
    assert not first.cached and first.path.parent == tmp_path
    assert depth.trained_lm(n_layers=2, steps=3, n_eval=16).cached
    first.path.write_bytes(first.path.read_bytes()[:100])
    with pytest.warns(zoo.CacheWarning, match="unusable"):
        again = depth.trained_lm(n_layers=2, steps=3, n_eval=16)
    assert not again.cached
    assert depth.trained_lm(n_layers=2, steps=3, n_eval=16).cached
    from labkit import cache

    monkeypatch.setattr(cache, "package_digest", lambda root: "other")
    assert not depth.trained_lm(n_layers=2, steps=3, n_eval=16).cached  # new code retrains


def test_the_default_nli_baseline_learns_the_task():
    """Notebooks 01 and 02 (and 04, 06) start from this model: with their defaults it must
    clear chance (1/3) and the hypothesis-only rate (2/3) by a margin, on held-out pairs.
    Trained once per machine (about 1.5 min on one idle core), then loaded from the cache."""
    import ast

    import papermill as pm
    from conftest import NOTEBOOKS

    from labkit import classifiers as CL

    defaults = dict(model="tiny", task="nli", source="synthetic", vocab_size=8192,
                    baseline_steps=0, n_train=4000, n_eval=500, batch_size=32, seed=0)
    for name in ("01_low_rank_attention", "02_kernel_attention"):
        declared = pm.inspect_notebook(str(NOTEBOOKS / f"{name}.ipynb"))
        got = {k: ast.literal_eval(declared[k]["default"]) for k in defaults}
        assert got == defaults, name
    base = CL.classifier("tiny", "nli", "synthetic", n_train=4000, n_eval=500,
                         vocab_size=8192, seed=0, progress=False)
    from labkit import train as T

    acc = T.evaluate(base.model, base.task.eval)["accuracy"]  # re-scored, not the record
    assert acc == pytest.approx(base.metrics["accuracy"])
    assert acc >= 0.75, base.metrics
    assert acc > D.NLI_HYPOTHESIS_ONLY + 0.05  # the premise is used, not only polarity
