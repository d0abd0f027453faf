"""labkit.cache: one cache keyed by the arguments, the package's content and torch."""
import shutil
import warnings

import pytest
import torch

from labkit import cache


def _counter():
    calls = []

    def compute():
        calls.append(1)
        return {"w": torch.arange(4.0), "n": len(calls)}
    return calls, compute


def test_a_second_call_loads_what_the_first_computed(tmp_path):
    calls, compute = _counter()
    a = cache.cached("t", {"x": 1}, compute, folder=tmp_path)
    b = cache.cached("t", {"x": 1}, compute, folder=tmp_path)
    assert (a.hit, b.hit, len(calls)) == (False, True, 1) and a.path == b.path
    assert torch.equal(b.value["w"], a.value["w"]) and b.value["n"] == 1
    assert not cache.cached("t", {"x": 2}, compute, folder=tmp_path).hit  # other arguments
    assert not cache.cached("u", {"x": 1}, compute, folder=tmp_path).hit  # another kind
    assert len(calls) == 3 and not list(tmp_path.glob(".*.tmp"))


def test_an_edit_anywhere_in_a_copy_of_the_package_misses(tmp_path, monkeypatch):
    """The key reads every module's content, not a list of files: a copy of the package
    hits (content, not path), an edit to measure.py or a kernel misses."""
    copy = tmp_path / "labkit"
    shutil.copytree(cache.PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    calls, compute = _counter()
    folder = tmp_path / "c"
    first = cache.cached("t", {}, compute, folder=folder)
    monkeypatch.setattr(cache, "PACKAGE", copy)
    assert cache.cached("t", {}, compute, folder=folder).hit
    for edited in ("measure.py", "kernels/bsr.py"):
        (copy / edited).write_text((copy / edited).read_text() + "\n# edited\n")
        cache.package_digest.cache_clear()  # as a new process would: it imports the edit
        again = cache.cached("t", {}, compute, folder=folder)
        assert not again.hit and again.path != first.path, edited
    assert len(calls) == 3


def test_the_torch_version_is_part_of_the_key(tmp_path, monkeypatch):
    calls, compute = _counter()
    cache.cached("t", {}, compute, folder=tmp_path)
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert not cache.cached("t", {}, compute, folder=tmp_path).hit


@pytest.mark.parametrize("damage", [b"truncated", b""])
def test_an_unreadable_or_refused_file_is_computed_again(tmp_path, damage):
    calls, compute = _counter()
    a = cache.cached("t", {}, compute, folder=tmp_path)
    a.path.write_bytes(damage)
    with pytest.warns(cache.CacheWarning, match="unusable"):
        assert not cache.cached("t", {}, compute, folder=tmp_path).hit
    with warnings.catch_warnings():
        warnings.simplefilter("error", cache.CacheWarning)
        assert cache.cached("t", {}, compute, folder=tmp_path).hit  # repaired

    def refuse(record):
        raise ValueError("another config")
    with pytest.warns(cache.CacheWarning, match="another config"):
        assert not cache.cached("t", {}, compute, folder=tmp_path, check=refuse).hit
    assert len(calls) == 3


def test_digest_sees_content_not_identity():
    assert cache.digest({"a": torch.ones(2)}) == cache.digest({"a": torch.ones(2)})
    assert cache.digest({"a": torch.ones(2)}) != cache.digest({"a": torch.ones(2).double()})
    assert cache.digest(torch.ones(2, 3)) != cache.digest(torch.ones(3, 2))
    assert cache.digest([1, 2]) != cache.digest([2, 1])
    assert cache.digest({"a": 1, "b": 2}) == cache.digest({"b": 2, "a": 1})
    assert cache.digest({"a": [1]}, 2) != cache.digest({"a": [1, 2]})


def test_a_kind_that_cannot_name_a_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match="kind='a/b'.*not allowed"):
        cache.cached("a/b", {}, dict, folder=tmp_path)
