"""labkit.labs.paper: the caches of notebook 10's method variants (content-keyed, recomputed
when unreadable) and its parameter checks; labs.paper_convergence stops at the target."""
import warnings

import pytest
import torch

from labkit import model as M
from labkit import zoo
from labkit.cache import digest
from labkit.labs import paper as PL
from labkit.validate import LabkitConfigError


def test_cached_computes_once_keyed_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path))
    calls = []

    def compute():
        calls.append(1)
        return {"rows": [{"layer": "a", "trace": 1.5}], "w": torch.ones(2)}

    a = PL._cached("t", {"base": "x"}, compute)
    b = PL._cached("t", {"base": "x"}, compute)
    assert len(calls) == 1 and b["rows"] == a["rows"] and torch.equal(b["w"], a["w"])
    PL._cached("t", {"base": "y"}, compute)  # other content: another key
    assert len(calls) == 2
    for f in tmp_path.glob("paper-t-*.pt"):
        f.write_bytes(b"truncated")
    with pytest.warns(zoo.CacheWarning):
        PL._cached("t", {"base": "x"}, compute)
    assert len(calls) == 3


def test_content_digest_sees_weights_and_data():
    cfg = M.ModelConfig(vocab_size=32, d_model=16, n_heads=2, d_ff=32, n_layers=1,
                        max_len=8, num_labels=2)
    a, b = M.build(cfg, seed=0), M.build(cfg, seed=0)
    assert digest(a) == digest(b)
    with torch.no_grad():
        b.blocks[0].ffn.up.weight[0, 0] += 1e-3
    assert digest(a) != digest(b)
    assert digest({"x": torch.arange(3)}) != digest({"x": torch.arange(1, 4)})


def test_sdn_exits_cached_equal_to_trained(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path))
    cfg = M.ModelConfig(vocab_size=32, d_model=16, n_heads=2, d_ff=32, n_layers=2,
                        max_len=8, num_labels=2)
    base = M.build(cfg, seed=0)

    def batches():
        g = torch.Generator().manual_seed(0)
        while True:
            yield {"input_ids": torch.randint(1, 32, (4, 8), generator=g),
                   "padding_mask": torch.ones(4, 8, dtype=torch.bool),
                   "labels": torch.randint(0, 2, (4,), generator=g)}

    first = PL.sdn_exits(base, batches(), steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a cache hit: no training, no warning
        again = PL.sdn_exits(base, batches(), steps=3)
    assert len(list(tmp_path.glob("paper-sdn-exits-*.pt"))) == 1
    for (k, v), (k2, v2) in zip(first.executor.state_dict().items(),
                                again.executor.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    fresh = M.build(cfg, seed=0)
    from labkit.techniques import EarlyExitConfig, apply_
    apply_(fresh, EarlyExitConfig())  # untrained heads differ from the cached ones
    assert not torch.equal(fresh.executor.heads[0].out.weight, again.executor.heads[0].out.weight)


@pytest.mark.parametrize("change,message", [
    ({"sparsities": "0.1,x"}, "sparsities='0.1,x'"), ({"operating_sparsity": 0.2}, "one of"),
    ({"tasks": "nli,sst2"}, "tasks='sst2'"), ({"hessian_samples": 0}, "hessian_samples=0"),
    ({"recover_steps": 0}, "recover_steps=0")])
def test_setup_names_the_bad_parameter(change, message):
    params = {"model": "tiny", "tasks": "nli,qnli", "methods": "ours,sdn",
              "sparsities": "0.1,0.5", "operating_sparsity": 0.5, "baseline_steps": 0,
              "n_eval": 64, "hessian_samples": 1, "sdn_steps": 5, "conv_steps": 10,
              "conv_eval_every": 5, "conv_lr": 1e-3, "target_accuracy": 0.0,
              "sample_sizes": "64,128", "recover_steps": 5}
    assert PL.setup(params)["sparsities"] == [0.1, 0.5]
    with pytest.raises(LabkitConfigError, match=message):
        PL.setup({**params, **change})


def test_headline_names_exist_whatever_was_measured():
    # the default run may leave a claim unmeasured (a method unavailable): the names stay
    from labkit.labs import paper_verdicts as PV

    m = PV.metrics([], {"model_ratio": 0.6, "peak_ratio": 0.7}, [], {"synthetic-nli": 0.9}, 0.5)
    assert set(PV.HEADLINE) <= set(m) and m["verdict_fig1"] is None
    assert m["memory_model_ratio"] == 0.6


def test_fig1_fall_needs_paired_speedup_bands_to_separate():
    # the machine got quieter between sparsities: absolute times fell for a dense-architecture
    # method, its speedup over dense in the same rounds did not
    from labkit.labs import paper_verdicts as PV

    def row(m, s, ms, lo, hi):
        return {"method": m, "sparsity": s, "median_ms": ms, "min_ms": ms * 0.98,
                "max_ms": ms * 1.02, "speedup_min": lo, "speedup_max": hi}

    rows = [row("qbert", 0.1, 860.0, 0.97, 1.03), row("qbert", 0.5, 750.0, 0.98, 1.02),
            row("ours", 0.1, 500.0, 1.6, 1.7), row("ours", 0.5, 300.0, 2.4, 2.6)]
    v = PV.verdict_fig1(rows)
    assert v["qbert"]["falls"] is False and v["ours"]["falls"] is True
    unpaired = [{k: x for k, x in r.items() if not k.startswith("speedup")} for r in rows]
    assert PV.verdict_fig1(unpaired)["qbert"]["falls"] is True  # what absolute ms said


def test_sweep_hands_hessian_samples_to_qbert(monkeypatch):
    seen = []
    monkeypatch.setattr(PL, "qbert_sensitivity",
                        lambda base, batch, samples=4: seen.append(samples) or [])
    monkeypatch.setattr(PL, "qbert", lambda base, s, rows: PL.Variant("qbert", s, None))
    monkeypatch.setattr(PL, "accuracy", lambda model, eval_set: 0.5)
    monkeypatch.setattr(PL, "operating_point", lambda *args: {})
    PL.sweep(None, "0.5", ["qbert"], (), {}, None, "nli", timed=False, hessian_samples=7)
    assert seen == [7]


def test_chance_level_is_the_majority_rate_with_two_standard_errors():
    from labkit.labs.paper_convergence import chance_level

    p, margin = chance_level(torch.tensor([0, 0, 0, 1]))
    assert p == 0.75 and abs(margin - 2 * (0.75 * 0.25 / 4) ** 0.5) < 1e-12


def _conv_rows(target, chance=0.5, margin=0.04):
    return [{"method": m, "n_train": n, "status": "measured", "target": target,
             "chance": chance, "chance_margin": margin, "steps_to_target": 10,
             "seconds_to_target": 1.0 if m == "ours" else 2.0}
            for n in (64, 128) for m in ("dense", "ours", "layerdrop")]


def test_fig2_target_at_chance_is_inconclusive_not_a_verdict():
    from labkit.labs import paper_verdicts as PV

    near = PV.verdicts([], [], {}, _conv_rows(target=0.52), 0.5)
    far = PV.verdicts([], [], {}, _conv_rows(target=0.70), 0.5)
    assert near[0]["verdict"] == "inconclusive" and "chance" in near[0]["evidence"]
    assert far[0]["verdict"] == "holds"


def test_auto_target_lies_between_chance_and_the_best_dense_accuracy(monkeypatch):
    from types import SimpleNamespace

    from labkit.labs import paper_convergence as PC

    def fake_fit(model, batches, steps, **kw):  # the dense run's evaluations: 0.5, 0.7, 0.9
        hist = [{"split": "eval", "step": 10 * (i + 1), "seconds": float(i + 1),
                 "accuracy": a} for i, a in enumerate((0.5, 0.7, 0.9))]
        return SimpleNamespace(final={"accuracy": 0.9}, history=hist, steps=30,
                               steps_to_target=None, seconds_to_target=None)

    monkeypatch.setattr(PC.T, "fit", fake_fit)
    cfg = M.preset("tiny", kind="encoder", num_labels=2, vocab_size=64, max_len=16)
    train = {"input_ids": torch.zeros(8, 4, dtype=torch.long),
             "labels": torch.zeros(8, dtype=torch.long)}
    pairs = SimpleNamespace(train=train, eval={"labels": torch.tensor([0] * 6 + [1] * 4)})
    rows = PC.convergence(pairs, cfg, [], [8], 0.5, 0.0, 30, 1e-3)
    assert rows[0]["chance"] == 0.6
    assert abs(rows[0]["target"] - (0.6 + 0.9 * (0.9 - 0.6))) < 1e-9  # not 0.9 * 0.9
    assert rows[0]["steps_to_target"] == 30


def test_ours_int8_measured_once_per_shape_and_reused_across_tasks():
    """The second task's model (same shapes, other weights) gets the first one's measured
    INT8 paths, said so in info["plan"]; another sparsity (another d_ff) is measured."""
    cfg = M.ModelConfig(vocab_size=32, d_model=16, n_heads=2, d_ff=32, n_layers=1,
                        max_len=8, num_labels=2)
    sample = (torch.randint(1, 32, (2, 8), generator=torch.Generator().manual_seed(0)), None)
    plans = {}
    a = PL.ours(M.build(cfg, seed=0), 0.5, sample, min_run_time=1e-3, plans=plans)
    b = PL.ours(M.build(cfg, seed=1), 0.5, sample, min_run_time=1e-3, plans=plans)
    c = PL.ours(M.build(cfg, seed=1), 0.25, sample, min_run_time=1e-3, plans=plans)
    assert (a.info["plan"], b.info["plan"], c.info["plan"]) == ("measured", "reused", "measured")
    assert b.info["paths"] == a.info["paths"]
    assert [r["chosen"] for r in b.model.acceleration] == [r["chosen"] for r in a.model.acceleration]
    assert len(plans["models"]) == 2
    alone = PL.ours(M.build(cfg, seed=1), 0.5, sample, min_run_time=1e-3)
    assert alone.info["plan"] == "measured"  # no plans given: always measured


def test_sdn_with_precomputed_logits_picks_the_same_threshold():
    cfg = M.ModelConfig(vocab_size=32, d_model=16, n_heads=2, d_ff=32, n_layers=3,
                        max_len=8, num_labels=2)
    from labkit.techniques import EarlyExitConfig, apply_
    from labkit.techniques.early_exit import exit_logits

    trained = M.build(cfg, seed=0)
    apply_(trained, EarlyExitConfig())
    trained.eval()
    g = torch.Generator().manual_seed(0)
    held = {"input_ids": torch.randint(1, 32, (64, 8), generator=g),
            "padding_mask": torch.ones(64, 8, dtype=torch.bool),
            "labels": torch.randint(0, 2, (64,), generator=g)}
    z = exit_logits(trained, held)
    for s in (0.1, 0.5):
        once = PL.sdn(trained, s, trained, held, z)
        fresh = PL.sdn(trained, s, trained, held)
        assert once.info == fresh.info


def test_shaped_like_cuts_or_pads_columns_to_the_other_workload():
    from labkit.data import PAD

    ids = torch.tensor([[2, 7, 8, 3], [2, 9, 3, PAD]])
    mask = ids == PAD
    like = (torch.zeros(2, 6, dtype=torch.long), torch.zeros(2, 6, dtype=torch.bool))
    pi, pm = PL.shaped_like((ids, mask), like)
    assert pi.shape == pm.shape == (2, 6) and torch.equal(pi[:, :4], ids)
    assert (pi[:, 4:] == PAD).all() and pm[:, 4:].all() and torch.equal(pm[:, :4], mask)
    ci, cm = PL.shaped_like((ids, mask), (like[0][:, :3], like[1][:, :3]))
    assert torch.equal(ci, ids[:, :3]) and torch.equal(cm, mask[:, :3])


def test_ours_warnings_reach_the_timing_and_accuracy_rows(monkeypatch):
    """What accelerate warned (a revert) and noted per site reaches the sweep's rows, and is
    still shown as a warning."""
    from labkit import accelerate as A
    from labkit.techniques import int8 as I

    def fake_accelerate(model, inputs, **kw):
        warnings.warn("the per-layer choice ran the whole model at 0.90x: reverted")  # noqa: B028
        return [{"layer": "blocks.0.ffn.up", "current": "fp32", "chosen": "fp32",
                 "warnings": "torch_dynamic: packed weights are CPU only"},
                {"layer": A.MODEL, "current": "fp32", "chosen": "fp32", "reverted": True,
                 "warnings": "the per-layer choice ran the whole model at 0.90x: reverted"}]

    monkeypatch.setattr(I, "accelerate_", fake_accelerate)
    cfg = M.ModelConfig(vocab_size=32, d_model=16, n_heads=2, d_ff=32, n_layers=1,
                        max_len=8, num_labels=2)
    g = torch.Generator().manual_seed(0)
    ev = {"input_ids": torch.randint(1, 32, (8, 8), generator=g),
          "padding_mask": torch.zeros(8, 8, dtype=torch.bool),
          "labels": torch.randint(0, 2, (8,), generator=g)}
    sample = (ev["input_ids"][:2], ev["padding_mask"][:2])
    with pytest.warns(UserWarning, match="0.90x: reverted"):
        times, accs, _ = PL.sweep(M.build(cfg, seed=0).eval(), "0.5", ["ours"], sample, {},
                                  ev, "nli", rounds=1, timer=lambda name, fn, mrt: 1.0)
    for rows in (times, accs):
        (row,) = [r for r in rows if r.get("method") == "ours"]
        assert "0.90x: reverted" in row["warnings"]
        assert "packed weights are CPU only" in row["warnings"]
        assert row["warnings"].count("0.90x") == 1


def test_gap_closed_is_the_fraction_of_the_one_shot_loss_recovered():
    from labkit.labs import paper_verdicts as PV

    assert PV.gap_closed(0.8, 0.5, 0.65) == pytest.approx(0.5)
    assert PV.gap_closed(0.8, 0.5, 0.8) == pytest.approx(1.0)
    assert PV.gap_closed(0.8, 0.5, 0.4) == pytest.approx(-1 / 3)
    assert PV.gap_closed(0.8, 0.8, 0.9) is None  # nothing lost: no gap to close
    accs = [{"method": "dense", "sparsity": 0.0, "task": "t", "accuracy": 0.8},
            {"method": "ours", "sparsity": 0.5, "task": "t", "accuracy": 0.5,
             "status": "measured"},
            {"method": "sdn", "sparsity": 0.5, "task": "t", "accuracy": 0.7,
             "status": "measured"}]
    rec = [{"method": "ours", "task": "t", "accuracy": 0.74, "recover_steps": 9},
           {"method": "sdn", "task": "t", "accuracy": 0.75, "recover_steps": 9}]
    rows = PV.recovery_rows(accs, rec, 0.5)
    assert [r["gap_closed"] for r in rows] == pytest.approx([0.8, 0.5])
    assert PV.recovered_gap_closed_min(rows) == pytest.approx(0.5)


@pytest.mark.parametrize("accs,verdict", [
    ((0.795, 0.792), "holds"), ((0.70, 0.60), "does not hold"),
    ((0.795, 0.60), "holds only for ours on t"), ((), "inconclusive")])
def test_accuracy_verdict_gives_each_verdict(accs, verdict):
    from labkit.labs import paper_verdicts as PV

    rows = [{"method": "dense", "sparsity": 0.0, "task": "t", "accuracy": 0.8}] + [
        {"method": m, "sparsity": 0.5, "task": "t", "accuracy": a, "status": "measured"}
        for m, a in zip(("ours", "sdn"), accs)]
    got = PV.verdict_accuracy(rows, 0.5, key="accuracy_recovered", how=" after 9 steps")
    assert got["verdict"] == verdict and got["key"] == "accuracy_recovered"
    assert got["claim"].endswith("after 9 steps")


def test_recovery_keeps_each_methods_constraint():
    """Recovered variants keep what the method removed or rounded: ours' narrower FFN,
    LayerDrop's blocks, Q-BERT's fake-quantized linears at their bits, SDN's exits."""
    from labkit.labs.workloads import workload
    from labkit.techniques.quant import FakeQuantLinear

    wl = workload("nli", "tiny", batch_size=8, seq_len=16, n_train=64, n_eval=32)
    base = M.build(wl.cfg, seed=0).eval()
    batch = next(wl.make_batches(0))
    cache = {"qbert_rows": PL.qbert_sensitivity(base, batch, samples=1),
             "sdn_model": PL.sdn_exits(base, wl.make_batches(1), steps=2),
             "sdn_held_out": {k: v[:16] for k, v in wl.eval_set.items()}}
    before = {k: v.clone() for k, v in base.state_dict().items()}
    got = {m: PL.recovered(m, base, 0.5, wl, 2, 1e-3, cache, wl.sample, 0.001)
           for m in ("ours", "layerdrop", "qbert", "sdn")}
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())  # teacher
    d_ff = base.cfg.d_ff
    frac = PL.neuron_fraction(0.5, cache["ffn_share"])  # 0.5 of the work, not of the FFN
    assert frac > 0.5
    assert all(abs(b.ffn.up.out_features - (1 - frac) * d_ff) <= 1
               for b in got["ours"].model.blocks)
    assert len(got["layerdrop"].model.blocks) == base.cfg.n_layers - round(
        0.5 * base.cfg.n_layers)
    fq = [m for m in got["qbert"].model.modules() if isinstance(m, FakeQuantLinear)]
    bits = PL.qbert(base, 0.5, cache["qbert_rows"]).info["bits"]
    assert len(fq) == len(bits)
    assert got["sdn"].model.executor.exits and "q" in got["sdn"].info
    w = "blocks.0.ffn.up.weight"  # SDN's backbone trains with its exits now
    assert not torch.equal(got["sdn"].model.state_dict()[w], cache["sdn_model"].state_dict()[w])
    assert all(v.info["recover_steps"] == 2 for v in got.values())


def test_fig1_verdict_gives_each_verdict_and_a_simulated_method_is_inconclusive():
    from labkit.labs import paper_verdicts as PV

    def row(m, s, ms, lo, hi, simulated=False):
        return {"method": m, "sparsity": s, "median_ms": ms, "min_ms": ms * 0.98,
                "max_ms": ms * 1.02, "speedup_min": lo, "speedup_max": hi,
                "status": "measured", "simulated": simulated}

    def verdict(rows):
        return next(c for c in PV.verdicts(rows, [], {}, [], 0.5) if c["key"] == "fig1")

    ours = [row("ours", 0.1, 500.0, 1.6, 1.7), row("ours", 0.5, 300.0, 2.4, 2.6)]
    ld = [row("layerdrop", 0.1, 600.0, 1.3, 1.4), row("layerdrop", 0.5, 400.0, 1.9, 2.0)]
    flat = [row("layerdrop", 0.1, 600.0, 1.3, 1.4), row("layerdrop", 0.5, 590.0, 1.3, 1.4)]
    # Q-BERT's 2-4 bit widths timed as fp32, slower-looking, and faster than ours at 0.5
    qb = [row("qbert", 0.1, 900.0, 0.97, 1.03, True), row("qbert", 0.5, 200.0, 0.98, 1.02, True)]
    assert verdict(ours + ld)["verdict"] == "holds"
    slow_ours = [row("ours", 0.1, 700.0, 1.0, 1.1), row("ours", 0.5, 700.0, 1.0, 1.1)]
    assert verdict(slow_ours + flat)["verdict"] == "does not hold"
    c = verdict(ours + ld + qb)
    assert c["verdict"] == ("holds only for: time falls for layerdrop, ours; ours fastest at "
                            "every s; qbert inconclusive (simulated)")
    assert "qbert: 900.0 -> 200.0 ms (inconclusive (simulated))" in c["evidence"]
    f1 = PV.verdict_fig1(ours + ld + qb)
    assert f1["qbert"]["falls"] is None and f1["qbert"]["time"] == "inconclusive (simulated)"
    assert f1["fastest_by_sparsity"] == {0.1: "ours", 0.5: "ours"}  # qbert's fp32 time left out
    assert f1["layerdrop"]["time"] == "falls"
    assert verdict(qb)["verdict"] == "inconclusive (simulated)"


def test_every_method_is_placed_by_the_work_it_removes():
    """ours removes s of the dense model's counted FLOPs (its neuron fraction s / FFN
    share, not s of the FFN), LayerDrop round(s L) of L blocks; beyond what the FFN holds
    the row says the work is not matched."""
    from labkit.labs.workloads import workload

    wl = workload("nli", "tiny", batch_size=8, seq_len=16, n_train=64, n_eval=32)
    base = M.build(wl.cfg, seed=0).eval()
    sample = wl.sample[:2]
    share = PL.ffn_work_share(base, sample)
    cfg = base.cfg  # per token: FFN 2 d d_ff of 4 d^2 + 2 d d_ff + attention scores
    assert share < 2 * cfg.d_ff / (4 * cfg.d_model + 2 * cfg.d_ff) and share > 0.4
    v = PL.ours(base, 0.3, sample, int8="none", ffn_share=share)
    assert PL.work_removed(v, base, sample) == pytest.approx(0.3, abs=0.02)
    assert v.info["work_matched"] and v.info["neuron_fraction"] == pytest.approx(0.3 / share)
    too_far = PL.ours(base, 0.9, sample, int8="none", ffn_share=share)
    assert not too_far.info["work_matched"]
    assert too_far.info["neuron_fraction"] == PL.MAX_NEURON_FRACTION
    ld = PL.layerdrop(base, 0.5)
    L = cfg.n_layers
    assert PL.work_removed(ld, base, sample) == pytest.approx(round(0.5 * L) / L, abs=0.05)
    op = PL.operating_point(v, base, sample, wl.eval_set)
    assert op["work_removed"] == pytest.approx(0.3, abs=0.02) and op["work_matched"]
    # INT8 after the pruning changes how the linears compute, not how much
    for int8 in ("torchao", "accelerate"):
        q = PL.ours(base, 0.3, sample, min_run_time=1e-3, int8=int8, ffn_share=share)
        assert PL.work_removed(q, base, sample) == pytest.approx(0.3, abs=0.02), q.info


def test_early_exit_reports_the_blocks_it_ran_on_the_eval_rows():
    from labkit.labs.workloads import workload
    from labkit.techniques.early_exit import predict

    wl = workload("nli", "tiny", batch_size=8, seq_len=16, n_train=64, n_eval=32)
    base = M.build(wl.cfg, seed=0).eval()
    trained = PL.sdn_exits(base, wl.make_batches(1), steps=2)
    v = PL.sdn(base, 0.5, trained, {k: x[:16] for k, x in wl.eval_set.items()})
    op = PL.operating_point(v, base, wl.sample[:2], wl.eval_set)
    with torch.inference_mode():
        run = predict(v.model, wl.eval_set["input_ids"], wl.eval_set.get("padding_mask"))[1]
    L = base.cfg.n_layers
    assert op["blocks_run_eval"] == pytest.approx(float(run.float().mean()))
    assert op["blocks_target"] == 0.5 * L
    assert op["blocks_on_target"] == (abs(op["blocks_run_eval"] - 0.5 * L) <= 0.05 * L)
    assert op["work_removed"] == pytest.approx(1 - op["blocks_run_eval"] / L)
