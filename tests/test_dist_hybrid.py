"""Hybrid: a 2-D (data x pipeline) mesh on 4 gloo ranks gives the gradients of one process
on the whole batch (slow on 2 cores, but correct)."""
from labkit.dist import launch


def test_data_x_pipeline_mesh_equals_one_process():
    r = launch("hybrid", {"task": "lm", "stages": 2, "microbatches": 2, "batch": 8,
                          "steps": 2, "schedule": "1f1b"}, nproc=4, timeout=90)
    ranks = r.result["ranks"]
    assert [(x["dp_rank"], x["pp_rank"]) for x in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for x in ranks:
        assert x["dp"] == 2 and x["grad_max_abs_diff"] <= 1e-6 and x["loss_abs_diff"] <= 1e-6
    # the tied embedding/head: equal on both stages of both replicas after training
    assert len({x["tied_checksums"][0] for x in ranks}) == 1
