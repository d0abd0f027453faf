"""GLUE MNLI/QNLI rows from the hub or a local folder, checked against GLUE's schema up front.

A local folder holds one file per split, ``<dir>/<split>.{parquet,jsonl,json,csv,tsv}``
(``source`` may also be the folder holding ``<task>/``, e.g. ``mnli/`` and ``qnli/``),
with GLUE's columns (MNLI: premise, hypothesis, label; QNLI: question, sentence, label).
Both sources go through ``datasets.load_dataset``, so the rows have the hub's columns and
types, and then through :func:`check_rows` before anything is tokenised or trained:

* labels are GLUE's integers (0 entailment, 1 neutral, 2 contradiction for MNLI; 0
  entailment, 1 not_entailment for QNLI) or the same label *names*, which are mapped to
  the integers (GLUE exports often carry the names);
* a label outside the task's range, an empty or null text, a missing column or a missing
  split is a :class:`~labkit.validate.LabkitConfigError` naming the file, the row (counted
  from 1, the header excluded) and what is allowed.

One pass over the rows: O(rows) time, nothing kept but the mapped rows.
"""
from __future__ import annotations

from pathlib import Path

from . import validate as V

GLUE_SCHEMA = {
    "mnli": dict(text=("premise", "hypothesis"), labels=("entailment", "neutral", "contradiction"),
                 eval_split="validation_matched"),
    "qnli": dict(text=("question", "sentence"), labels=("entailment", "not_entailment"),
                 eval_split="validation"),
}
LOCAL_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv", ".tsv")


class DatasetUnavailable(RuntimeError):
    """A dataset could not be loaded; the message says what to do instead."""


def allowed_labels(name: str) -> str:
    labels = GLUE_SCHEMA[name]["labels"]
    return (f"an integer in [0, {len(labels) - 1}] or a GLUE label name: "
            + ", ".join(f"{i} {lab!r}" for i, lab in enumerate(labels)))


def check_rows(rows, name: str, where: str) -> list[dict]:
    """GLUE-schema ``rows`` with labels as integers; raises on the first bad row.

    ``where`` names the file (or hub split) in the message."""
    glue = GLUE_SCHEMA[name]
    names = {lab: i for i, lab in enumerate(glue["labels"])}
    out = []
    for i, row in enumerate(rows, start=1):
        for col in glue["text"]:
            text = row.get(col)
            if not isinstance(text, str) or not text.strip():
                raise V.LabkitConfigError(f"{where} row {i} column {col!r}", text,
                                          "a non-empty string (no null or blank text)")
        label = row.get("label")
        if isinstance(label, str) and label.strip() in names:
            label = names[label.strip()]
        elif isinstance(label, float) and label.is_integer():
            label = int(label)
        if isinstance(label, bool) or not isinstance(label, int) or \
                not 0 <= label < len(glue["labels"]):
            raise V.LabkitConfigError(f"{where} row {i} column 'label'", row.get("label"),
                                      allowed_labels(name))
        out.append({**row, "label": label})
    return out


def rows_from_hub(name: str, split: str) -> list[dict]:
    try:
        import datasets

        rows = list(datasets.load_dataset("nyu-mll/glue", name, split=split))
    except Exception as e:  # no network, no cache, or the hub refused
        raise DatasetUnavailable(
            f"could not load GLUE {name!r} split {split!r} from the hub ({type(e).__name__}: "
            f"{str(e)[:200]}). Use the offline default task='synthetic-{'nli' if name == 'mnli' else 'qnli'}'"
            f" (source='synthetic'), or point source= at a local folder holding "
            f"{split}.parquet/.jsonl/.csv with columns {GLUE_SCHEMA[name]['text'] + ('label',)}."
        ) from e
    return check_rows(rows, name, f"GLUE {name} {split} (hub)")


def local_file(folder: Path, split: str) -> Path | None:
    for suffix in LOCAL_SUFFIXES:
        if (folder / f"{split}{suffix}").exists():
            return folder / f"{split}{suffix}"
    return None


FOLDER_FORMS = {"root": "a folder of task folders", "task": "the task's own folder"}


def task_folder(folder, name: str) -> tuple[Path, str]:
    """Where GLUE task ``name``'s files are: ``folder/name`` when that is a folder (``folder``
    holds task folders, ``mnli/``, ``qnli/``: form ``"root"``), else ``folder`` itself (the
    task's own files: form ``"task"``). The other task's own folder is refused by name."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise V.LabkitConfigError("source", str(folder),
                                  f"'synthetic', 'hub' or an existing folder: {name}'s own "
                                  f"folder (train.jsonl, ...) or one holding {name}/")
    if (folder / name).is_dir():
        return folder / name, "root"
    if folder.name in GLUE_SCHEMA and folder.name != name:
        raise V.LabkitConfigError(
            "source", str(folder), f"GLUE {name}'s files: this is the {folder.name} folder; "
            f"give {name}'s own folder or the folder holding {name}/ (and {folder.name}/)")
    return folder, "task"


def rows_from_dir(folder: Path, name: str, split: str) -> list[dict]:
    """One split of a GLUE-schema folder (the task's own, or one holding it: see
    :func:`task_folder`), read through ``datasets`` and checked."""
    glue = GLUE_SCHEMA[name]
    need = (*glue["text"], "label")
    folder, _ = task_folder(folder, name)
    path = local_file(folder, split)
    if path is None:
        present = sorted(p.name for p in folder.iterdir() if p.suffix in LOCAL_SUFFIXES)
        raise V.LabkitConfigError(
            "source", str(folder),
            f"a folder with GLUE {name}'s {split!r} split: one of "
            + ", ".join(f"{split}{s}" for s in LOCAL_SUFFIXES)
            + f" with columns {', '.join(need)} (it has: {', '.join(present) or 'no data files'})"
            + f", or a folder holding {name}/ with them")
    import datasets

    kind = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv",
            ".tsv": "csv"}[path.suffix]
    extra = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
    try:
        ds = datasets.load_dataset(kind, data_files={split: str(path)}, split=split, **extra)
    except Exception as e:  # mixed column types, broken JSON, ... : name the file
        cause = e.__cause__ or e
        raise V.LabkitConfigError(
            str(path), "unreadable",
            f"a {kind} file of GLUE {name} rows with columns {', '.join(need)} "
            f"(datasets: {type(cause).__name__}: {str(cause)[:300]})") from e
    missing = [c for c in need if c not in ds.column_names]
    if missing:
        raise V.LabkitConfigError(
            f"{path} columns", ds.column_names,
            f"GLUE {name}'s columns {', '.join(need)} (missing: {', '.join(missing)})")
    return check_rows(ds, name, str(path))


def write_local_glue(folder, rows_by_split: dict[str, list[dict]], fmt: str = "jsonl") -> Path:
    """Write rows as a GLUE-schema folder (used by tests and to cache a download)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    V.choice("fmt", fmt, ("jsonl", "parquet", "csv"))
    import datasets

    for split, rows in rows_by_split.items():
        ds = datasets.Dataset.from_list(rows)
        path = folder / f"{split}.{fmt}"
        {"jsonl": ds.to_json, "parquet": ds.to_parquet, "csv": ds.to_csv}[fmt](str(path))
    return folder
