"""Notebook 04's library side: a default method valid for every structure, run labels that
carry the real sparsity, list parameters that fail naming themselves."""
import pytest

from labkit.labs import common as C
from labkit.labs import pruning as PL
from labkit.techniques import sparsity as S
from labkit.validate import LabkitConfigError


@pytest.mark.parametrize("structure", S.STRUCTURES)
def test_auto_method_is_valid_for_every_structure(structure):
    method = PL.method_for(structure, "auto")
    parts = ("attn",) if structure == "head" else ("ffn",)
    cfg = S.SparsityConfig(sparsity=0.9, structure=structure, method=method, parts=parts)
    assert cfg.method == ("magnitude" if structure == "nm" else "gradual")
    assert PL.method_for(structure, "l1") == "l1"


@pytest.mark.parametrize("n,m,label", [(2, 4, "nm 2:4 (50%)"), (1, 4, "nm 1:4 (75%)"),
                                       (1, 8, "nm 1:8 (88%)")])
def test_nm_label_is_the_real_sparsity_not_the_ignored_field(n, m, label):
    cfg = S.SparsityConfig(sparsity=0.9, structure="nm", n=n, m=m)
    assert cfg.label == label and cfg.target_sparsity == 1 - n / m
    assert S.SparsityConfig(sparsity=0.9, structure="block").label == "block 90%"


@pytest.mark.parametrize("fn,args,name", [
    (C.float_list, ("curve_sparsities", "0.5,1.5", 0.0, 1.0, False, True), "curve_sparsities"),
    (C.float_list, ("sparsities", "a,b", 0.0, 1.0, False, True), "sparsities"),
    (C.choice_list, ("curve_structures", "unstructured,diagonal", PL.MLP_STRUCTURES),
     "curve_structures"),
    (PL.method_for, ("nm", "lottery"), "method")])
def test_list_parameters_fail_naming_themselves(fn, args, name):
    with pytest.raises(LabkitConfigError) as e:
        fn(*args)
    assert e.value.name == name
