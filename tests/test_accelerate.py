"""The one autotuner, with an injected timer: given these timings, this path is chosen;
given a slower whole model, everything reverts. For sparsity and for INT8, and with a
shared FFN (ALBERT sharing) that must stay one module."""
import warnings

import pytest
import torch

import labkit.model as Mo
from labkit import accelerate as A
from labkit import kernels as K
from labkit.techniques import SharingConfig, apply_
from labkit.techniques import int8 as I
from labkit.techniques import sparsity as S


def _ids(m):
    return torch.randint(4, m.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))


def fake_timer(per_path: dict, model: dict | None = None, default: float = 1.0):
    """Seconds by candidate name (``"<layer>/<path>"`` -> path) and, for the whole-model
    check, ``model={"current": s, "accelerated": s}`` (a list: one value per round, in
    order). Records every call."""
    calls = []

    def timer(name, fn, mrt):
        calls.append(name)
        layer, _, cand = name.rpartition("/")
        if layer == A.MODEL:
            v = (model or {"current": 1.0, "accelerated": 0.5})[cand]
            if isinstance(v, list):
                return v[sum(c == name for c in calls) - 1]
            return v
        return per_path.get(cand, default)
    timer.calls = calls
    return timer


def _pruned(structure="block", **kw):
    m = Mo.build("tiny", kind="decoder", vocab_size=64).eval()
    apply_(m, S.SparsityConfig(sparsity=0.75, structure=structure, **kw))
    return m


def test_sparsity_picks_the_fastest_path_by_the_timer():
    m = _pruned(block=16)
    ids = _ids(m)
    with torch.no_grad():
        ref = m(ids)
    t = fake_timer({"dense": 1.0, "csr": 0.9, "bsr": 0.3, "block-gathered-dense": 0.5,
                    "compacted-dense": 0.97})
    rows = S.accelerate(m, ids, rounds=2, timer=t)
    layers = [r for r in rows if r["layer"] != A.MODEL]
    assert layers and all(r["chosen"] == "bsr" for r in layers)
    assert all(isinstance(m.get_submodule(r["layer"]), K.BSRLinear) for r in layers)
    assert all(r["speedup"] == pytest.approx(1 / 0.3) for r in layers)
    model_row = rows[-1]
    assert model_row["layer"] == A.MODEL and not model_row["reverted"]
    assert model_row["chosen"] == "per-layer" and model_row["speedup"] == pytest.approx(2.0)
    assert any(c.startswith(A.MODEL) for c in t.calls)
    with torch.no_grad():
        torch.testing.assert_close(m(ids), ref, atol=1e-5, rtol=1e-4)


def test_sparsity_margin_keeps_dense_when_the_gain_is_noise():
    m = _pruned(block=16)
    rows = S.accelerate(m, _ids(m), rounds=2, margin=0.05,
                        timer=fake_timer({"dense": 1.0, "bsr": 0.97}, default=2.0))
    layers = [r for r in rows if r["layer"] != A.MODEL]
    assert all(r["chosen"] == "dense" for r in layers)  # 3% faster is inside the margin
    assert all(isinstance(m.get_submodule(r["layer"]), K.DenseLinear) for r in layers)
    assert not any(isinstance(x, K.BSRLinear) for x in m.modules())


def test_sparsity_whole_model_slower_reverts_every_layer():
    m = _pruned(block=16)
    t = fake_timer({"dense": 1.0, "bsr": 0.3}, default=2.0,
                   model={"current": 1.0, "accelerated": 1.3})
    with pytest.warns(UserWarning, match="reverted"):
        rows = S.accelerate(m, _ids(m), rounds=2, timer=t)
    model_row = rows[-1]
    assert model_row["reverted"] and model_row["chosen"] == "dense"
    assert model_row["choice_speedup"] == pytest.approx(1 / 1.3)
    assert model_row["speedup"] == 1.0  # the model left runs the dense paths themselves
    assert "reverted" in model_row["warnings"]
    layers = [r for r in rows if r["layer"] != A.MODEL]
    assert all(r["chosen"] == "dense" and r["kernel_path"] == "dense" for r in layers)
    assert not any(isinstance(x, K.BSRLinear) for x in m.modules())


def test_int8_picks_by_timer_and_reverts_a_slower_model():
    m = Mo.build("tiny").eval()
    ids = _ids(m)
    per = {"fp32": 1.0, "bf16": 0.9, "int8_dynamic": 0.4, "int8_weight_only": 0.8,
           "torch_dynamic": 0.6}
    rows = I.accelerate_(m, (ids,), rounds=2, timer=fake_timer(per))
    layers = [r for r in rows if r["layer"] != A.MODEL]
    assert len(layers) == 6 * m.cfg.n_layers
    assert all(r["chosen"] == "int8_dynamic" for r in layers)
    assert all(m.get_submodule(r["layer"]).candidate == "int8_dynamic" for r in layers)
    assert not rows[-1]["reverted"]

    m2 = Mo.build("tiny").eval()
    with pytest.warns(UserWarning, match="reverted"):
        rows = I.accelerate_(m2, (ids,), rounds=2, timer=fake_timer(
            per, model={"current": 1.0, "accelerated": 1.1}))
    assert rows[-1]["reverted"] and rows[-1]["chosen"] == "fp32"
    layers = [r for r in rows if r["layer"] != A.MODEL]
    assert all(r["chosen"] == "fp32" for r in layers)
    assert all(m2.get_submodule(r["layer"]).candidate == "fp32" for r in layers)


def test_int8_keeps_fp32_when_nothing_beats_it():
    m = Mo.build("tiny").eval()
    rows = I.accelerate_(m, (_ids(m),), rounds=2, timer=fake_timer(
        {"fp32": 1.0}, default=1.5))
    assert all(r["chosen"] == "fp32" for r in rows if r["layer"] != A.MODEL)
    assert rows[-1]["chosen"] == "fp32" and not rows[-1]["reverted"]


@pytest.mark.parametrize("winner", ["compacted-dense", "dense"])
def test_shared_ffn_neuron_pruning_accelerate_stays_shared(winner):
    m = Mo.build("tiny", vocab_size=64).eval()
    apply_(m, SharingConfig(parts=("ffn",)))
    before = Mo.count_params(m)
    apply_(m, S.SparsityConfig(sparsity=0.5, structure="neuron"))
    ids = _ids(m)
    with torch.no_grad():
        ref = m(ids)
    loser = "dense" if winner == "compacted-dense" else "compacted-dense"
    with warnings.catch_warnings(record=True):
        rows = S.accelerate(m, ids, rounds=2, timer=fake_timer({winner: 0.2, loser: 1.0}))
    ffns = {id(b.ffn) for b in m.blocks}
    assert len(ffns) == 1  # every block still points at one module
    ffn = m.blocks[0].ffn
    sites = [r for r in rows if r["layer"] != A.MODEL]
    assert [r["layer"] for r in sites] == ["blocks.0.ffn"]
    assert sites[0]["aliases"] == ", ".join(f"blocks.{i}.ffn" for i in range(m.cfg.n_layers))
    after = Mo.count_params(m)
    if winner == "compacted-dense":
        assert isinstance(ffn, K.CompactedMLP) and ffn.up.out_features == m.cfg.d_ff // 2
        assert after < before
    else:
        assert after == before
    with torch.no_grad():
        torch.testing.assert_close(m(ids), ref, atol=1e-5, rtol=1e-4)


def test_shared_ffn_convert_compacts_once():
    m = Mo.build("tiny", vocab_size=64).eval()
    apply_(m, SharingConfig(parts=("ffn",)))
    before = Mo.count_params(m)
    apply_(m, S.SparsityConfig(sparsity=0.5, structure="neuron"))
    S.convert(m, "compacted-dense")
    assert len({id(b.ffn) for b in m.blocks}) == 1
    assert isinstance(m.blocks[1].ffn, K.CompactedMLP)
    assert Mo.count_params(m) < before


def test_int8_plan_reused_only_for_identical_shapes():
    """Identical sites (class, parameter and input shapes) are timed once, in a model and
    across models; a model identical in shapes to a measured one (other weights) gets its
    choices untimed, rows marked; other input or weight shapes are measured."""
    plans = {}
    ids = _ids(Mo.build("tiny"))
    first = fake_timer({"fp32": 1.0, "int8_dynamic": 0.4, "torch_dynamic": 0.6})
    rows = I.accelerate_(Mo.build("tiny").eval(), (ids,), rounds=2, timer=first, plans=plans)
    timed = {c.rpartition("/")[0] for c in first.calls} - {A.MODEL}
    sites = [r for r in rows if r["layer"] != A.MODEL]
    assert len(timed) == 3 and len(sites) == 12  # q/k/v/o share one shape, up, down
    assert {r["layer"] for r in sites if not r.get("reused")} == timed
    assert all("reused" in r["warnings"] for r in sites if r.get("reused"))
    assert {r["chosen"] for r in sites} == {"int8_dynamic"} and not rows[-1].get("reused")

    other = fake_timer({"fp32": 1.0, "int8_dynamic": 2.0, "torch_dynamic": 0.3})
    m2 = Mo.build("tiny", seed=1).eval()  # other weights, same shapes
    rows2 = I.accelerate_(m2, (ids,), rounds=2, timer=other, plans=plans)
    assert other.calls == []  # nothing re-timed, not even the whole model
    assert [r["chosen"] for r in rows2] == [r["chosen"] for r in rows]
    assert all(r["reused"] and "reused" in r["warnings"] for r in rows2)
    assert all(m2.get_submodule(r["layer"]).candidate == "int8_dynamic"
               for r in rows2 if r["layer"] != A.MODEL)

    for model, inputs in ((Mo.build("tiny").eval(), (ids[:1, :8],)),  # other input shape
                          (Mo.build("tiny", d_ff=128).eval(), (ids,))):  # other FFN shape
        t = fake_timer({"fp32": 1.0, "int8_dynamic": 2.0, "torch_dynamic": 0.3})
        got = I.accelerate_(model, inputs, rounds=2, timer=t, plans=plans)
        assert A.MODEL in {c.rpartition("/")[0] for c in t.calls}
        assert not got[-1].get("reused")
        new = {r["chosen"] for r in got if r["layer"] != A.MODEL and not r.get("reused")}
        assert new == {"torch_dynamic"}
    assert len(plans["models"]) == 3


def test_plan_not_reused_when_only_a_weight_shape_differs():
    """Same input shape, another output width: another kernel problem, measured again."""
    import copy

    def sites(model):
        def site(name, m):
            if isinstance(m, torch.nn.Linear):
                return A.Site(name, m, {"fp32": m, "copy": copy.deepcopy(m)}, "fp32")
            return None
        return site

    plans, x = {}, torch.randn(2, 8)
    for width, winner in ((16, "copy"), (32, "fp32")):
        t = fake_timer({"fp32": 1.0, "copy": 0.5 if winner == "copy" else 2.0})
        rows = A.accelerate(torch.nn.Sequential(torch.nn.Linear(8, width)), (x,), sites,
                            rounds=2, timer=t, verify=False, plans=plans)
        assert t.calls and rows[0]["chosen"] == winner and not rows[0].get("reused")
    assert len(plans["models"]) == len(plans["sites"]) == 2


def _int8_sites_on(m):
    return {m.get_submodule(r["layer"]).candidate
            for r in m.acceleration if r["layer"] != A.MODEL}


def test_a_revert_reports_the_model_left_not_the_rejected_choice():
    """A verify ratio of 0.916 reverts every layer; the model then runs its current paths,
    so its reported speedup is that of those paths (1), the rejected 0.916 beside it."""
    m = Mo.build("tiny").eval()
    per = {"fp32": 1.0, "int8_dynamic": 0.4, "torch_dynamic": 0.6}
    with pytest.warns(UserWarning, match="reverted"):
        rows = I.accelerate_(m, (_ids(m),), rounds=2, timer=fake_timer(
            per, model={"current": 1.0, "accelerated": 1 / 0.916}))
    whole = A.summary(rows)
    assert whole["reverted"] and whole["speedup"] == 1.0
    assert whole["choice_speedup"] == pytest.approx(0.916)
    assert _int8_sites_on(m) == {"fp32"}


@pytest.mark.parametrize("ratios,kept", [
    ([1.10, 0.90, 1.02], False),  # median 1.02 but one round at 0.90 < 1 - margin
    ([0.99, 0.98, 0.99], False),  # steadily a little slower
    ([1.03, 0.97, 1.05], True),   # every round >= 0.95, median >= 1
    ([1.30, 1.25, 1.40], True)])
def test_whole_model_check_keeps_only_a_choice_shown_not_slower(ratios, kept):
    m = Mo.build("tiny").eval()
    t = fake_timer({"fp32": 1.0, "int8_dynamic": 0.4}, default=2.0,
                   model={"current": [1.0] * 3, "accelerated": [1 / r for r in ratios]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = I.accelerate_(m, (_ids(m),), rounds=2, margin=0.05, timer=t)  # verify: 3 rounds
    whole = A.summary(rows)
    assert whole["reverted"] == (not kept)
    assert whole["choice_speedup"] == pytest.approx(sorted(ratios)[1])
    assert whole["choice_speedup_min"] == pytest.approx(min(ratios))
    assert _int8_sites_on(m) == ({"int8_dynamic"} if kept else {"fp32"})
    if kept:
        assert whole["speedup"] == pytest.approx(sorted(ratios)[1]) and not caught
    else:
        assert whole["speedup"] == 1.0
        assert any("reverted" in str(w.message) for w in caught)
        assert ("in one of 3 paired rounds" in whole["warnings"]) == (sorted(ratios)[1] >= 1)


def test_a_reused_plan_holds_the_choice_a_revert_left():
    """Model A's sites chose INT8 but A's whole-model check reverted them; model B (other
    depth: another whole-model plan, the same site shapes) reuses the reverted fp32, says
    so, and is not re-timed."""
    plans, ids = {}, _ids(Mo.build("tiny"))
    per = {"fp32": 1.0, "int8_dynamic": 0.4, "torch_dynamic": 0.6}
    a = Mo.build("tiny").eval()
    with pytest.warns(UserWarning, match="reverted"):
        I.accelerate_(a, (ids,), rounds=2, plans=plans, timer=fake_timer(
            per, model={"current": 1.0, "accelerated": 1.3}))
    assert _int8_sites_on(a) == {"fp32"}
    b = Mo.build("tiny", n_layers=3).eval()
    t = fake_timer(per, model={"current": 1.0, "accelerated": 0.5})
    rows = I.accelerate_(b, (ids,), rounds=2, plans=plans, timer=t)
    sites = [r for r in rows if r["layer"] != A.MODEL]
    assert len(sites) == 18 and all(r["reused"] for r in sites)
    assert t.calls == []
    assert all(r["chosen"] == "fp32" and A.REVERTED in r["warnings"] for r in sites)
    assert _int8_sites_on(b) == {"fp32"}
