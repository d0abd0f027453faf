import pytest
import torch

from labkit import data as D
from labkit.validate import LabkitConfigError


def test_synthetic_tasks_are_deterministic_and_balanced():
    a, b = D.synthetic_nli(300, seed=1), D.synthetic_nli(300, seed=1)
    assert a == b and a != D.synthetic_nli(300, seed=2)
    labels = [r["label"] for r in a]
    assert {labels.count(k) for k in range(3)} == {100}
    assert set(a[0]) == {"premise", "hypothesis", "label", "idx"}
    q = D.synthetic_qnli(100, seed=0)
    assert set(q[0]) == {"question", "sentence", "label", "idx"}


def test_nli_labels_mean_what_glue_says():
    for r in D.synthetic_nli(60, seed=0):
        obj, col = r["hypothesis"].split()[1], r["hypothesis"].split()[3]
        stated = f"the {obj} is {col}" in r["premise"]
        present = f"the {obj} is" in r["premise"]
        expect = 0 if stated else (2 if present else 1)
        assert r["label"] == expect, r


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
def test_local_directory_loads_same_schema_as_glue(tmp_path, fmt):
    rows = D.synthetic_nli(30, seed=0)
    D.write_local_glue(tmp_path, "mnli", {"train": rows, "validation_matched": rows[:10]}, fmt)
    got = D.load_rows("mnli", "train", source=str(tmp_path))
    assert [r["premise"] for r in got] == [r["premise"] for r in rows]
    assert {"premise", "hypothesis", "label"} <= set(got[0])
    task = D.load_task("mnli", source=str(tmp_path), max_len=48)
    assert task.labels == ("entailment", "neutral", "contradiction")
    assert task.train["input_ids"].shape[0] == 30 and task.eval["labels"].shape == (10,)


def test_missing_local_dataset_says_what_to_do(tmp_path):
    with pytest.raises(LabkitConfigError, match="source="):
        D.load_task("qnli", source=str(tmp_path / "nope"))
    (tmp_path / "train.jsonl").write_text('{"question": "q", "sentence": "s", "label": 0}\n')
    with pytest.raises(D.DatasetUnavailable, match="no 'validation' split"):
        D.load_task("qnli", source=str(tmp_path))


def test_hub_failure_names_offline_default(monkeypatch):
    import datasets

    def boom(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(D.DatasetUnavailable, match="synthetic-qnli.*local folder"):
        D.load_rows("qnli", "train", source="hub")


def test_bad_task_and_tokenizer_round_trip():
    with pytest.raises(LabkitConfigError, match="task='sst2'"):
        D.load_task("sst2")
    tok = D.WordTokenizer.fit(["the cat is red ."])
    assert tok.decode(tok.encode("The cat is red .")) == "the cat is red ."
    assert tok.encode("zebra") == [D.UNK]
    ids = tok.encode_pair("the cat " * 50, "is red", max_len=16)
    assert len(ids) == 16 and ids[0] == D.CLS and ids.count(D.SEP) == 2


def test_lm_batches_are_next_token_shifted():
    corpus = D.load_lm_corpus(n_sentences=200)
    b = next(D.lm_batches(corpus.train, 4, 16))
    assert b["input_ids"].shape == (4, 16)
    assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1])
