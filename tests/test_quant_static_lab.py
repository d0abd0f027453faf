"""The static INT8 accuracy study's statistics and plumbing (the real-text run is the
lead's): paired accuracy by hand, and the study on the tiny encoder with a fake timer."""
import math

import pytest
import torch

from labkit import model as M
from labkit.labs import quant_static as QS
from labkit.techniques import static_int8 as SI


def test_paired_accuracy_by_hand():
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 1, 1, 0, 0])
    ref = labels.clone()
    ref[0] = 1  # fp32 wrong on row 0
    pred = labels.clone()
    pred[[1, 2, 3]] = 1 - labels[[1, 2, 3]]  # wrong on rows 1-3, right on row 0
    r = QS.paired_accuracy(pred, ref, labels)
    assert r["accuracy"] == pytest.approx(0.7) and r["rows"] == 10
    assert r["accuracy_se"] == pytest.approx(math.sqrt(0.7 * 0.3 / 10))
    assert (r["only_reference_right"], r["only_this_right"]) == (3, 1)
    assert r["drop_points"] == pytest.approx(20.0)  # 0.9 -> 0.7
    assert r["drop_se_points"] == pytest.approx(100 * math.sqrt(4 - 4 / 10) / 10)
    assert r["mcnemar_p"] == pytest.approx(0.625)  # exact: 2 * P(X <= 1 | n=4, 1/2)
    same = QS.paired_accuracy(ref, ref, labels)
    assert same["drop_points"] == 0 and same["mcnemar_p"] == 1.0


@pytest.mark.skipif(SI.unavailable() is not None, reason="static INT8 unavailable here")
def test_study_on_the_tiny_encoder():
    m = M.build("tiny").eval()
    g = torch.Generator().manual_seed(0)

    def batch(n):
        ids = torch.randint(6, m.cfg.vocab_size, (n, 16), generator=g)
        return {"input_ids": ids, "padding_mask": torch.zeros(n, 16, dtype=torch.bool),
                "labels": torch.randint(0, 3, (n,), generator=g)}

    t = {"fp32": 2.0, "fp32_compiled": 1.0, "static_int8": 0.4, "static_int8_mixed": 0.5,
         "int8_dynamic": 1.5}
    res = QS.study(m, [batch(8), batch(8)], [batch(16), batch(16)], batch(4), rounds=2,
                   timer=lambda name, fn, mrt: t[name], keep_fp32=["blocks.0.ffn.down"])
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == set(t)
    assert rows["fp32"]["drop_points"] == 0 and rows["fp32"]["rows"] == 32
    assert rows["static_int8"]["calibration_rows"] == 16
    assert rows["static_int8"]["speedup_vs_fp32_compiled"] == pytest.approx(2.5)
    assert rows["static_int8"]["speedup_vs_fp32"] == pytest.approx(5.0)
    # the untrained encoder's near-tied logits let INT8 flip a few rows, not most
    assert abs(rows["static_int8"]["drop_points"]) < 25
    assert res["headline"]["calibration_rows"] == 16
    assert rows["static_int8_mixed"]["keep_fp32"] == ["blocks.0.ffn.down"]
    assert res["headline"]["mixed_speedup_vs_fp32_compiled"] == pytest.approx(2.0)
    assert res["headline"]["mixed_keep_fp32"] == ["blocks.0.ffn.down"]
    assert "1 linear(s) kept fp32" in rows["static_int8_mixed"]["kernel_path"]
    assert rows["static_int8"]["bytes"] < rows["fp32"]["bytes"]
