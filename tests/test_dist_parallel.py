"""DDP, tensor parallel and pipeline parallel (GPipe, 1F1B, interleaved) on 2 gloo ranks,
all in one launch (torchrun start-up costs seconds), each checked against one process on
the same batch; and bad degrees refused before any process starts."""
import pytest

from labkit.dist import launch
from labkit.dist.pipeline import split_blocks
from labkit.dist.pipeline import validate as pp_validate
from labkit.dist.tensor import validate as tp_validate
from labkit.validate import LabkitConfigError

PARTS = [
    {"name": "ddp", "experiment": "ddp", "config": {"steps": 3, "batch": 8}},
    {"name": "ddp_lm", "experiment": "ddp", "config": {"task": "lm", "steps": 2, "batch": 8}},
    {"name": "tp", "experiment": "tensor", "config": {"steps": 2, "batch": 8}},
    {"name": "tp_lm", "experiment": "tensor", "config": {"task": "lm", "steps": 2, "batch": 8}},
    {"name": "gpipe", "experiment": "pipeline",
     "config": {"steps": 3, "batch": 8, "microbatches": 4}},
    {"name": "1f1b_lm", "experiment": "pipeline",
     "config": {"task": "lm", "steps": 3, "batch": 8, "microbatches": 2, "schedule": "1f1b"}},
    {"name": "interleaved", "experiment": "pipeline",
     "config": {"size": "small", "seq": 16, "steps": 1, "batch": 8, "microbatches": 4,
                "schedule": "interleaved", "sweep_m": [2], "mb_rows": 2, "reps": 1}},
]


@pytest.fixture(scope="module")
def suite():
    return launch("suite", {"parts": PARTS}, nproc=2, timeout=60).result["ranks"]


def test_ddp_gradients_equal_one_process_on_the_whole_batch(suite):
    for key in ("ddp", "ddp_lm"):
        for r in suite:
            assert r[key]["grad_max_abs_diff"] <= 1e-6
            assert r[key]["rows_per_rank"] == 4
        a, b = (r[key]["weights_checksum"] for r in suite)
        assert a == b  # replicas took identical steps


def test_tensor_parallel_outputs_and_gradients_equal_the_unsplit_model(suite):
    for key in ("tp", "tp_lm"):
        r = suite[0][key]
        assert r["output_max_abs_diff"] <= 1e-5 and r["grad_max_abs_diff"] <= 1e-5
        mem = r["memory"]
        # block weights are halved: fewer bytes than a replica, more than the naive 1/T claim
        assert r["claimed_param_bytes"] < mem["param_bytes"] < 2 * r["claimed_param_bytes"]
        assert mem["param_bytes"] == r["claimed_param_bytes_blocks_only"]


def test_pipeline_loss_and_gradients_equal_one_process(suite):
    for key in ("gpipe", "1f1b_lm", "interleaved"):
        for r in suite:
            assert r[key]["grad_max_abs_diff"] <= 1e-6, key
            assert r[key]["loss_abs_diff"] <= 1e-6, key
        last = suite[-1][key]
        assert len(last["losses"]) == last.get("steps", len(last["losses"]))
        assert all(x is None for x in suite[0][key]["losses"])  # only the last stage has it
    assert [r["interleaved"]["blocks"] for r in suite] == [[["0"], ["2"]], [["1"], ["3"]]]


def test_decoder_tied_embedding_stays_in_sync_across_stages(suite):
    first, last = (r["1f1b_lm"]["tied_checksums"][0] for r in suite)
    assert first == last


def test_pipeline_records_what_ran(suite):
    for r in suite:
        row = r["interleaved"]["bubble"][0]
        kinds = sorted((e[0], e[1], e[2]) for e in row["events"])
        stages = {0: (0, 2), 1: (1, 3)}[r["interleaved"]["rank"]]
        assert kinds == sorted((k, s, m) for k in "BF" for s in stages for m in range(2))
        assert 0 <= row["bubble"] < 1 and row["busy_s"] <= row["wall_s"]


def test_bad_degrees_are_refused():
    with pytest.raises(LabkitConfigError, match="degree"):
        tp_validate({"size": "tiny"}, 3)  # 4 heads
    with pytest.raises(LabkitConfigError, match="degree=8"):
        tp_validate({"size": "tiny", "degree": 8}, 8)
    with pytest.raises(LabkitConfigError, match="stages"):
        pp_validate({"size": "tiny", "stages": 4}, 4)  # 2 blocks
    with pytest.raises(LabkitConfigError, match="stages=3.*divisor of the 4 blocks"):
        pp_validate({"size": "small", "stages": 3, "batch": 12}, 3)
    with pytest.raises(LabkitConfigError, match="microbatches"):
        pp_validate({"schedule": "1f1b", "microbatches": 1}, 2)
    with pytest.raises(LabkitConfigError, match="batch"):
        pp_validate({"batch": 10, "microbatches": 4}, 2)
    with pytest.raises(LabkitConfigError, match="batch"):
        launch("ddp", {"batch": 7}, nproc=2)
    with pytest.raises(LabkitConfigError, match="schedule"):
        pp_validate({"schedule": "zigzag"}, 2)
    assert [list(r) for r in split_blocks(5, 2)] == [[0, 1, 2], [3, 4]]
