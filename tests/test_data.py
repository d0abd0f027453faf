import json
import warnings

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
    rows = D.synthetic_nli(300, seed=0)
    for r in rows:
        _, _, polarity, obj, _ = r["hypothesis"].split()  # "there is a|no X ."
        present = f"the {obj} is" in r["premise"]
        expect = 1 if not present else (0 if polarity == "a" else 2)
        assert r["label"] == expect, r
    # the hypothesis alone: polarity per label; neutral rows carry both, so 2/3 at best
    by_pol = {}
    for r in rows:
        by_pol.setdefault(r["hypothesis"].split()[2], []).append(r["label"])
    best = sum(max(ls.count(k) for k in range(3)) for ls in by_pol.values()) / len(rows)
    assert abs(best - D.NLI_HYPOTHESIS_ONLY) < 0.05


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
def test_local_directory_loads_same_schema_as_glue(tmp_path, fmt):
    rows = D.synthetic_nli(30, seed=0, part="train")
    evals = D.synthetic_nli(10, seed=0, part="eval")
    D.write_local_glue(tmp_path, "mnli", {"train": rows, "validation_matched": evals}, fmt)
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
    with pytest.raises(LabkitConfigError, match=r"'validation' split: one of validation\.parquet"
                       r".*question, sentence, label \(it has: train\.jsonl\)"):
        D.load_task("qnli", source=str(tmp_path))


@pytest.mark.parametrize("task", sorted(D.SYNTHETIC))
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_synthetic_eval_is_disjoint_from_train(task, seed):
    cols = D.GLUE_SCHEMA[D.SYNTHETIC[task]]["text"]
    train = D.load_rows(task, "train", seed=seed)
    evals = D.load_rows(task, "eval", seed=seed)
    assert D.train_eval_overlap(train, evals, cols) == 0
    # a bigger train set from the same generator still never meets eval
    assert D.train_eval_overlap(D.load_rows(task, "train", n=12000, seed=seed + 1), evals,
                                cols) == 0
    n_labels = len(D.GLUE_SCHEMA[D.SYNTHETIC[task]]["labels"])
    counts = [sum(r["label"] == k for r in evals) for k in range(n_labels)]
    assert max(counts) - min(counts) <= 1  # still balanced
    with warnings.catch_warnings():
        warnings.simplefilter("error", D.DataWarning)
        assert D.load_task(task, n_train=2000, n_eval=300, seed=seed).notes == []


def test_local_folder_overlap_warns_and_is_recorded(tmp_path):
    rows = D.synthetic_qnli(40, seed=0)
    D.write_local_glue(tmp_path, "qnli", {"train": rows, "validation": rows[:5] + rows[-1:]})
    with pytest.warns(D.DataWarning, match="6 of 6 eval rows of qnli"):
        task = D.load_task("qnli", source=str(tmp_path))
    assert task.notes and "word for word in train" in task.notes[0]


def _nli_folder(tmp_path, train, fmt="jsonl"):
    good = [dict(premise="a cat", hypothesis="a dog", label=0)]
    D.write_local_glue(tmp_path, "mnli", {"validation_matched": good}, fmt)
    if fmt == "jsonl":  # by hand: rows may mix types, as hand-made files do
        (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    else:
        D.write_local_glue(tmp_path, "mnli", {"train": train}, fmt)
    return str(tmp_path)


def test_glue_label_names_are_mapped(tmp_path):
    names = ["entailment", "neutral", "contradiction"]
    rows = [dict(premise=f"p {i}", hypothesis=f"h {i}", label=names[i % 3]) for i in range(9)]
    task = D.load_task("mnli", source=_nli_folder(tmp_path, rows))
    assert task.train["labels"].tolist() == [0, 1, 2] * 3
    q = [dict(question="q ?", sentence=f"s {i}", label=["entailment", "not_entailment"][i % 2])
         for i in range(4)]
    D.write_local_glue(tmp_path / "q", "qnli", {"train": q, "validation": q[:2]}, "csv")
    assert D.load_rows("qnli", "train", source=str(tmp_path / "q"))[1]["label"] == 1


@pytest.mark.parametrize(("bad", "match"), [
    (dict(label="maybe"), r"train\.jsonl row 2 column 'label'='maybe' is not allowed: expected"
                          r" an integer in \[0, 2\] or a GLUE label name: 0 'entailment'"),
    (dict(label=7), r"train\.jsonl row 2 column 'label'=7 .*1 'neutral', 2 'contradiction'"),
    (dict(label=-1), r"row 2 column 'label'=-1"),
    (dict(label=None), r"row 2 column 'label'=None"),
    (dict(premise=None), r"train\.jsonl row 2 column 'premise'=None is not allowed: expected a "
                         r"non-empty string"),
    (dict(hypothesis="   "), r"row 2 column 'hypothesis'='   '"),
])
def test_bad_rows_name_file_row_and_what_is_allowed(tmp_path, bad, match):
    first = dict(premise="p", hypothesis="h", label="neutral" if bad.get("label") == "maybe" else 1)
    rows = [first, {**dict(premise="p", hypothesis="h", label=1), **bad}]
    with pytest.raises(LabkitConfigError, match=match):
        D.load_task("mnli", source=_nli_folder(tmp_path, rows))


def test_wrong_columns_and_unreadable_files_name_the_file(tmp_path):
    rows = [dict(sentence1="p", sentence2="h", label=0)]
    with pytest.raises(LabkitConfigError, match=r"train\.csv columns=.*expected GLUE mnli's "
                       r"columns premise, hypothesis, label \(missing: premise, hypothesis\)"):
        D.load_task("mnli", source=_nli_folder(tmp_path, rows, "csv"))
    (tmp_path / "train.csv").unlink()
    (tmp_path / "train.jsonl").write_text('{"premise": "p", "hypothesis": "h", "label": 0}\n{oops\n')
    with pytest.raises(LabkitConfigError, match=r"train\.jsonl='unreadable'.*json file of GLUE"):
        D.load_task("mnli", source=str(tmp_path))


def test_vocab_size_is_a_parameter():
    small = D.load_task("synthetic-nli", n_train=300, n_eval=30, vocab_size=20)
    full = D.load_task("synthetic-nli", n_train=300, n_eval=30)
    assert len(small.tokenizer) == 20 < len(full.tokenizer)
    texts = [r["premise"] for r in D.load_rows("synthetic-nli", "eval", n=30)]
    assert D.unk_rate(small.tokenizer, texts) > 0.1 and D.unk_rate(full.tokenizer, texts) == 0
    with pytest.raises(LabkitConfigError, match="vocab_size=3"):
        D.load_task("synthetic-nli", vocab_size=3)


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
