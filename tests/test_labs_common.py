"""labkit.labs.common: the helpers every notebook shares."""
import pytest
import torch

from labkit import model as M
from labkit.labs import common as C
from labkit.labs.workloads import workload
from labkit.techniques import FactorizedFFNConfig, SharingConfig
from labkit.techniques import early_exit as E
from labkit.validate import LabkitConfigError


def test_train_variants_same_batches_and_summary():
    work = workload("lm", "tiny", batch_size=4, seq_len=16, n_eval=8)
    models = C.build_variants(work.cfg, {"a": None, "b": [], "c": FactorizedFFNConfig(rank=4)})
    runs = C.train_variants(models, work.make_batches, 3, work.eval_set, before=True)
    losses = {k: [h["loss"] for h in r["result"].history if h["split"] == "train"]
              for k, r in runs.items()}
    assert losses["a"] == losses["b"] != losses["c"]  # same init and batches for a and b
    rows = C.summary(runs, window=2)
    assert [r["variant"] for r in rows] == ["a", "b", "c"]
    assert rows[2]["params"] < rows[0]["params"] and "before_eval_loss" in rows[0]


def test_build_variants_copies_a_trained_model():
    base = M.build("tiny", seed=3)
    out = C.build_variants(base, {"dense": None, "shared": SharingConfig()})
    assert out["dense"] is not base and out["shared"].blocks[1].ffn is out["shared"].blocks[0].ffn
    assert base.blocks[1].ffn is not base.blocks[0].ffn  # the original is untouched


def test_claimed_vs_counted_agree_on_a_batch():
    dense = M.build("tiny")
    configs = [FactorizedFFNConfig(rank=8), SharingConfig(("ffn",))]
    model = C.build_variants(dense, {"v": configs})["v"]
    ids = torch.randint(6, 200, (3, 40))
    c = C.claimed_vs_counted(dense, model, configs, (ids,))
    for q in ("params", "bytes", "flops"):
        assert c[f"{q}_claimed_before"] == c[f"{q}_counted_before"]
        assert c[f"{q}_claimed_after"] == c[f"{q}_counted_after"]
    assert c["params_ratio_claimed"] > 1 and c["flops_ratio_claimed"] > 1


def test_timed_flags_noise_with_an_injected_timer():
    seconds = {"dense": [1.0, 1.0, 1.0], "fast": [0.5, 0.5, 0.5], "wild": [0.5, 2.0, 0.6],
               "magic": [0.1, 0.1, 0.1]}
    calls = {k: iter(v) for k, v in seconds.items()}

    def timer(name, fn, mrt):
        return next(calls[name])

    models = {k: torch.nn.Identity() for k in seconds}
    rows = {r["variant"]: r for r in C.timed(models, (torch.zeros(1),), "dense",
                                             {"fast": 2.5, "wild": 2.5, "magic": 2.5},
                                             rounds=3, timer=timer)}
    assert rows["dense"]["verdict"] == "reference"
    assert rows["fast"]["speedup"] == pytest.approx(2.0) and rows["fast"]["verdict"] == "measured"
    assert rows["wild"]["verdict"].startswith("noise: spread")  # 2x, 0.5x, ...
    assert rows["magic"]["verdict"].startswith("noise: above the FLOP ratio")  # 10x > 2.5x


def test_small_helpers():
    assert C.binomial_se(0.5, 100) == pytest.approx(0.05)
    assert C.int_list("ks", "8, 16,32", 1) == (8, 16, 32) == C.int_list("ks", [8, 16, 32])
    with pytest.raises(LabkitConfigError, match="ks='8,x'"):
        C.int_list("ks", "8,x")
    with pytest.raises(LabkitConfigError, match="ks"):
        C.int_list("ks", "8,0", 1)
    rows = [{"layer": 0, "index": i, "energy": e} for i, e in enumerate([0.5, 0.95, 1.0], 1)]
    assert C.rank_for_energy(rows, 0.9) == {0: 2}


def test_notebook_parameters_declared_once():
    from labkit import notebook as nb
    from labkit.techniques import sharing as S

    ns = {"__annotations__": {"rank": int, "lr": float, "sharing": str, "interactive": bool,
                              "steps": int},
          "rank": 8, "lr": 1e-3, "sharing": "ffn", "interactive": False, "steps": 5}
    assert nb.declared(ns)["steps"] == nb.KNOBS["steps"] and nb.declared(ns)["rank"] == ("int",)
    P = nb.start(ns, threads=None)
    assert P == {k: ns[k] for k in ns["__annotations__"]}
    with pytest.raises(LabkitConfigError, match="steps=0"):
        nb.start({**ns, "steps": 0})
    with pytest.raises(LabkitConfigError, match="rank='8'"):
        nb.start({**ns, "rank": "8"})
    share = nb.config(S.SharingConfig, P, parts="sharing", model_cfg=M.preset("tiny"))
    assert share.parts == ("ffn",)
    with pytest.raises(LabkitConfigError, match="sharing='both'.*'attn', 'ffn'"):
        nb.config(S.SharingConfig, {**P, "sharing": "both"}, parts="sharing")
    with pytest.raises(LabkitConfigError, match=r"rank=999 .*min\(d_model, d_ff\)"):
        nb.config(FactorizedFFNConfig, {**P, "rank": 999}, "rank", model_cfg=M.preset("tiny"))


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    from labkit import notebook as nb

    path = nb.write_json_atomic(tmp_path / "m.json", {"a": 1})
    with pytest.raises(TypeError):
        nb.write_json_atomic(path, {"a": object()})  # not JSON: fails mid-write
    assert path.read_text().replace(" ", "").replace("\n", "") == '{"a":1}'
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temp file left


def test_list_parameters_parsed_once_naming_the_parameter():
    from labkit.labs import common as C

    assert C.float_list("sparsities", "0.1, 0.5", 0.0, 1.0, True, True) == (0.1, 0.5)
    assert C.float_list("qs", (0.5, 1)) == (0.5, 1.0)
    assert C.choice_list("tasks", "nli,qnli,nli", ("nli", "qnli")) == ("nli", "qnli")
    for call, match in [
            (lambda: C.float_list("sparsities", "0.2,lots"), "sparsities='0.2,lots'.*numbers"),
            (lambda: C.float_list("sparsities", "0.2,1.0", 0.0, 1.0, True, True),
             r"sparsities=1.0 .*\(0.0, 1.0\)"),
            (lambda: C.int_list("kept_counts", " , "), "kept_counts=' , '.*non-empty"),
            (lambda: C.int_list("kept_counts", "8,9", 1, 8), r"kept_counts=9 .*\[1, 8\]"),
            (lambda: C.choice_list("methods", "ours,foo", ("ours", "sdn")),
             "methods='foo'.*'ours', 'sdn'")]:
        with pytest.raises(LabkitConfigError, match=match):
            call()


def test_depth_headlines_exist_without_process_measurements():
    # notebook 09 with measure_processes=False, notebook 08 with no threshold within 1 point
    from labkit.labs import depth_summary as DS

    cfg = M.preset("tiny", kind="decoder", n_layers=8)
    params = {"start": 4, "end": 8, "P": 2, "D": 0}
    mine = {"sequential_loss": 2.0, "cqil_loss": 2.5, "ideal_cut": 0.25}
    _, m9 = DS.cqil_summary(params, cfg, mine, [], [], "skipped")
    assert set(DS.HEADLINE_09) <= set(m9) and m9["measured_cut"] is None
    prune = [{"model": mdl, "blocks_kept": k, "eval_loss": 1.0 + (k == 4), "params": 10 * k,
              "speedup": 8 / k} for mdl in ("no LayerDrop", "LayerDrop") for k in (8, 4)]
    first, final = torch.arange(200) < 120, torch.arange(200) < 180
    choice = {"q": None, "calib_blocks": None, "first_exit_accuracy": 0.6,
              "full_accuracy": 0.9, "exit_accuracy": None, "exit_blocks": None,
              **E.verdict(first, final, None, None, 6, 1.5)}
    _, m8 = DS.layerdrop_exit_summary(
        {"n_layers": 8, "sdn_layers": 6, "calibrate": True}, prune, [],
        [{"ece_before": 0.2, "ece_after": 0.1}], choice, cfg, {"lm": True, "sdn": True})
    assert set(DS.HEADLINE_08) <= set(m8) and m8["blocks_ratio"] is None
    assert m8["exit_verdict"] == "not met" and "no threshold" in m8["exit_why"]
    assert m8["pruned_speedup_claimed"] == 2.0 and m8["pruned_speedup"] == 2.0


def test_depth_and_paper_figures_follow_the_house_style():
    from labkit.labs import depth_summary as DS
    from labkit.labs import paper_verdicts as PV

    prune = [{"model": mdl, "blocks_kept": k, "eval_loss": 1.0 + k, "latency_ms": 10.0 * k}
             for mdl in ("no LayerDrop", "LayerDrop") for k in (8, 4)]
    cross = [{"d_model": d, "block_ms": d / 100, "allreduce_ms": 0.5, "measured_cut": c,
              "cut_min": c - 0.05, "cut_max": c + 0.05, "ideal_cut": 0.25,
              "expected_cut": 0.25 - 1 / d} for d, c in ((64, -1.0), (384, 0.15))]
    fc = DS.crossing_figure(cross)
    assert {t.name for t in fc.data} == {"one block", "one all-reduce", "measured cut",
                                          "ideal", "ideal less all-reduces"}
    fig = DS.prune_figure(prune)
    for name in ("no LayerDrop", "LayerDrop"):
        traces = [t for t in fig.data if t.name == name]
        assert len(traces) == 2 and len({t.line.color for t in traces}) == 1  # both panels
        assert sum(bool(t.showlegend) for t in traces) == 1  # legend once
    assert fig.layout.width is None and fig.layout.autosize  # fills the cell
    times = [{"method": m, "sparsity": s, "median_ms": ms, "min_ms": ms * 0.9,
              "max_ms": ms * 1.1, "status": "measured"}
             for m, ms in (("dense", 1000.0), ("ours", 5.0)) for s in (0.1, 0.5)]
    f1 = PV.fig1(times)
    assert f1.layout.yaxis.type == "log"  # 5 ms next to 1000 ms: decades apart
    conv = [{"method": "ours", "n_train": n, "seconds_to_target": 1.0, "status": "measured"}
            for n in (250, 500)]
    ours1 = next(t for t in f1.data if t.name == "ours")
    assert next(t for t in PV.fig2(conv).data if t.name == "ours").line.color == ours1.line.color
