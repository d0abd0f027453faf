import itertools
import warnings

import pytest
import torch
from torch import nn

import labkit.model as Mo
from labkit import kernels as K
from labkit.kernels import masks as MK
from labkit.techniques import pruning as P
from labkit.techniques import registry as R
from labkit.techniques import sparsity as S
from labkit.validate import LabkitConfigError

STRUCTS = [("unstructured", {}), ("nm", {}), ("nm", {"n": 1, "m": 4}), ("block", {"block": 16}),
           ("row", {}), ("column", {}), ("neuron", {}), ("head", {"parts": ("attn",)})]


def _model(kind="encoder"):
    return Mo.build("tiny", kind=kind, vocab_size=64).eval()


def _ids():
    return torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
@pytest.mark.parametrize("structure,kw", STRUCTS)
def test_requested_sparsity_and_structure_and_expected(kind, structure, kw):
    m = _model(kind)
    cfg = S.SparsityConfig(sparsity=0.75, structure=structure, **kw)
    R.apply_(m, cfg)
    lins = S.masked_linears(m)
    assert lins
    for name, lin in lins.items():
        mask = lin.mask
        if structure == "nm":
            MK.check_mask(mask, "nm", n=cfg.n, m=cfg.m)
        elif structure == "block":
            MK.check_mask(mask, "block", 0.75, block=16)
        elif structure in ("row", "column"):
            MK.check_mask(mask, structure, 0.75)
        elif structure == "neuron":
            MK.check_mask(mask, "column" if name.endswith("down") else "row", 0.75)
        elif structure == "head":
            kind_ = "column" if name.endswith(".o") else "row"
            MK.check_mask(mask, kind_, 0.75, group=m.cfg.head_dim)
        else:
            MK.check_mask(mask, "unstructured", 0.75)
    e = R.expected(m.cfg, cfg)["detail"]
    nonzero = sum(int(lin.weight.count_nonzero()) for lin in lins.values())
    total = sum(lin.weight.numel() for lin in lins.values())
    assert e["weights_dense"] == total
    assert e["weights_nonzero"] == nonzero
    assert S.actual_sparsity(m) == pytest.approx(e["sparsity"])
    if "bytes_sparse" in e and structure in ("unstructured", "block", "nm"):
        path = {"unstructured": "csr", "block": "bsr", "nm": "nm"}[structure]
        counted = sum(S.storage_bytes(lin.weight, path, block=16, n=cfg.n, m=cfg.m)["total"]
                      for lin in lins.values())
        assert counted == e["bytes_sparse"]


def test_neuron_groups_line_up_across_up_gate_down():
    m = _model("decoder")
    R.apply_(m, S.SparsityConfig(sparsity=0.5, structure="neuron"))
    ffn = m.blocks[0].ffn
    alive_up = ffn.up.mask.any(1)
    assert torch.equal(alive_up, ffn.gate.mask.any(1))
    assert torch.equal(alive_up, ffn.down.mask.any(0))
    assert int(alive_up.sum()) == 128


def test_global_scope_one_threshold():
    m = _model()
    with torch.no_grad():
        m.blocks[1].ffn.up.weight.mul_(10)
    R.apply_(m, S.SparsityConfig(sparsity=0.5, scope="global"))
    lins = S.masked_linears(m)
    assert S.actual_sparsity(m) == pytest.approx(0.5, abs=1e-6)
    assert MK.sparsity_of(lins["blocks.1.ffn.up"].weight) < 0.2
    assert MK.sparsity_of(lins["blocks.0.ffn.up"].weight) > 0.5


@pytest.mark.parametrize("structure,kw", STRUCTS)
def test_every_path_agrees_with_masked_layer(structure, kw):
    m = _model("decoder" if structure != "head" else "encoder")
    R.apply_(m, S.SparsityConfig(sparsity=0.5, structure=structure, **kw))
    ids = _ids()
    with torch.no_grad():
        ref = m(ids)
    # every single path on every layer
    for path in S.LINEAR_PATHS:
        if path in ("bsr", "block-gathered-dense") and structure != "block":
            continue
        if path == "nm-simulated" and structure != "nm":
            continue
        import copy
        mm = copy.deepcopy(m)
        S.convert(mm, path)
        assert not S.masked_linears(mm)
        with torch.no_grad():
            torch.testing.assert_close(mm(ids), ref, atol=1e-5, rtol=1e-4, msg=path)
        assert S.actual_sparsity(mm) == pytest.approx(S.actual_sparsity(m), abs=1e-6)
    # accelerate: measured choice, outputs unchanged, a path recorded for every layer
    with warnings.catch_warnings(record=True):  # a revert warns; the rows record it
        rows = S.accelerate(m, ids, rounds=1, min_run_time=0.002, verify=True, verify_rounds=1)
    with torch.no_grad():
        torch.testing.assert_close(m(ids), ref, atol=1e-5, rtol=1e-4)
    chosen = S.chosen_paths(rows)
    assert chosen and all(isinstance(p, str) and p for p in chosen.values())
    assert any(r["layer"] == "<model>" for r in rows) or structure == "nm"
    from labkit.measure import kernel_paths
    recorded = kernel_paths(m)
    for layer, path in chosen.items():
        assert recorded[layer] == path == m.get_submodule(layer).kernel_path
    if structure == "nm":
        assert all("speed not measured" in p for p in chosen.values())


def test_sparsity_zero_equals_dense():
    m = _model("decoder")
    ids = _ids()
    with torch.no_grad():
        ref = m(ids)
    for structure, kw in STRUCTS:
        if structure == "nm":
            continue
        mm = _model("decoder")
        R.apply_(mm, S.SparsityConfig(sparsity=0.0, structure=structure,
                                      **{**kw, "parts": ("attn", "ffn")}))
        assert S.actual_sparsity(mm) == 0.0
        with torch.no_grad():
            torch.testing.assert_close(mm(ids), ref)


def test_cubic_schedule_endpoints_and_shape():
    f = P.cubic_schedule
    assert f(0, 0.0, 0.9, t0=10, n=5, dt=4) == 0.0
    assert f(10, 0.1, 0.9, t0=10, n=5, dt=4) == pytest.approx(0.1)
    assert f(30, 0.1, 0.9, t0=10, n=5, dt=4) == pytest.approx(0.9)
    assert f(99, 0.1, 0.9, t0=10, n=5, dt=4) == pytest.approx(0.9)
    mid = f(20, 0.0, 0.8, t0=10, n=5, dt=4)
    assert mid == pytest.approx(0.8 + (0 - 0.8) * (1 - 0.5) ** 3)
    vals = [f(t, 0.0, 0.9, 0, 10, 3) for t in range(31)]
    assert all(a <= b for a, b in itertools.pairwise(vals))


def _lm_batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randint(0, 64, (4, 16), generator=g)
        yield {"input_ids": x, "labels": x.roll(-1, 1)}


def test_masks_survive_optimizer_steps_and_gradual_reaches_target():
    m = Mo.build("tiny", kind="decoder", vocab_size=64)
    cfg = S.SparsityConfig(sparsity=0.8, structure="unstructured", method="gradual",
                           prune_steps=4, prune_every=3)
    R.apply_(m, cfg)
    res = P.train_sparse(m, cfg, _lm_batches(), steps=20, eval_fn=lambda: {"loss": 0.0},
                         eval_every=5, lr=1e-2)
    assert S.actual_sparsity(m) == pytest.approx(0.8, abs=1e-4)
    spars = [h["sparsity"] for h in res.history if h["split"] == "eval"]
    assert spars[0] < spars[-1] and all(a <= b + 1e-9 for a, b in itertools.pairwise(spars))
    # weights pruned stay zero after further optimizer steps
    before = {n: lin.mask.clone() for n, lin in S.masked_linears(m).items()}
    from labkit.train import fit
    fit(m, _lm_batches(1), 5, lr=1e-2, progress=False, weight_decay=0.1)
    for n, lin in S.masked_linears(m).items():
        assert torch.equal(lin.mask, before[n])
        assert bool((lin.weight[~before[n]] == 0).all())


@pytest.mark.parametrize("structure,kw", [("block", {"block": 16}), ("nm", {})])
def test_l1_and_oneshot_reach_target(structure, kw):
    for method in ("magnitude", "l1"):
        m = Mo.build("tiny", kind="decoder", vocab_size=64)
        cfg = S.SparsityConfig(sparsity=0.5, structure=structure, method=method,
                               l1_lambda=1e-3, **kw)
        P.train_sparse(m, cfg, _lm_batches(), steps=6, prune_at=0.5)
        assert S.actual_sparsity(m) == pytest.approx(cfg.target_sparsity)


def test_l1_penalty_shrinks_weights():
    def run(lam):
        m = Mo.build("tiny", kind="decoder", vocab_size=64)
        cfg = S.SparsityConfig(method="l1", l1_lambda=lam)
        S.attach(m, cfg)
        from labkit.train import fit
        fit(m, _lm_batches(), 15, lr=1e-2, extra_loss=P.l1_penalty(lam), progress=False)
        return sum(float(lin.weight.detach().abs().sum()) for lin in S.masked_linears(m).values())
    assert run(1e-2) < 0.8 * run(0.0)


def test_storage_bytes_counts_indices():
    w = torch.randn(64, 128)
    w = w * MK.make_mask(w, "unstructured", 0.9)
    nnz = int(w.count_nonzero())
    csr = S.storage_bytes(w, "csr")
    assert csr == {"values": 4 * nnz, "index": 8 * nnz + 8 * 65, "total": 12 * nnz + 8 * 65}
    t = w.to_sparse_csr()
    assert csr["index"] == t.crow_indices().numel() * 8 + t.col_indices().numel() * 8
    assert S.storage_bytes(w, "dense")["total"] == 64 * 128 * 4
    lin = nn.Linear(128, 64)
    with torch.no_grad():
        lin.weight.copy_(w)
    from labkit.measure import model_bytes
    counted = model_bytes(K.CSRLinear(lin))
    assert counted["float32"] == 4 * nnz + 4 * 64  # values + bias
    assert counted["int64"] == csr["index"]


def test_bsr_and_compacted_bytes_are_what_the_stored_tensors_hold():
    """The one storage formula (kernels.storage.layout_bytes) against torch's own BSR
    tensor and a compacted weight; the analytic claim uses the same formula."""
    w = torch.randn(64, 128)
    w = w * MK.make_mask(w, "block", 0.75, block=16)
    bsr = K.storage_bytes(w, "bsr", block=16)
    t = w.to_sparse_bsr((16, 16))
    assert bsr["values"] == t.values().numel() * 4
    assert bsr["index"] == (t.crow_indices().numel() + t.col_indices().numel()) * 8
    dense = torch.randn(64, 128)
    rows = dense * MK.make_mask(dense, "row", 0.5)
    kept = rows[rows.any(1)]
    got = K.storage_bytes(rows, "compacted")
    assert got["values"] == kept.numel() * 4 and got["index"] == 8 * kept.shape[0]
    assert K.layout_bytes("bitmap", 64, 128, 100, element_bytes=1) == \
        {"values": 100, "index": 64 * 128 // 8, "total": 100 + 64 * 128 // 8}
    with pytest.raises(ValueError, match="layout.*'coo'"):
        K.layout_bytes("coo", 4, 4)


@pytest.mark.parametrize("kwargs,name", [
    ({"sparsity": 1.0}, "sparsity"),
    ({"sparsity": -0.01}, "sparsity"),
    ({"structure": "nm", "n": 5, "m": 4}, "n"),
    ({"structure": "diagonal"}, "structure"),
    ({"method": "lottery"}, "method"),
    ({"l1_lambda": -1e-4}, "l1_lambda"),
    ({"block": 0}, "block"),
    ({"structure": "head"}, "parts"),
    ({"scope": "global", "structure": "block"}, "scope"),
    ({"initial_sparsity": 0.6, "sparsity": 0.5}, "initial_sparsity"),
    ({"method": "gradual", "structure": "nm"}, "method"),
])
def test_bad_config_names_parameter(kwargs, name):
    with pytest.raises(LabkitConfigError) as e:
        S.SparsityConfig(**kwargs)
    assert e.value.name == name and name in str(e.value)


@pytest.mark.parametrize("cfg,name", [
    (S.SparsityConfig(structure="nm", n=2, m=3), "m"),  # 3 does not divide 64
    (S.SparsityConfig(structure="block", block=48), "block"),  # 48 does not tile 256 x 64
])
def test_bad_shape_dependent_input(cfg, name):
    with pytest.raises(LabkitConfigError) as e:
        R.apply_(_model(), cfg)
    assert e.value.name == name


def test_layers_and_parts_select_where_pruning_applies():
    m = _model("decoder")
    cfg = S.SparsityConfig(sparsity=0.5, parts=("attn", "ffn"), layers=(1,))
    R.apply_(m, cfg)
    lins = S.masked_linears(m)
    assert lins and all(n.startswith("blocks.1.") for n in lins)
    assert {n.split(".")[2] for n in lins} == {"attn", "ffn"}
    e = R.expected(m.cfg, cfg)["detail"]
    assert e["weights_dense"] == sum(lin.weight.numel() for lin in lins.values())
    with pytest.raises(LabkitConfigError) as err:
        R.apply_(_model(), S.SparsityConfig(layers=(7,)))
    assert err.value.name == "layers"
