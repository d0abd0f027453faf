"""Whole-model static INT8 (PT2E + X86InductorQuantizer + Inductor): logits close to fp32 on
the tiny encoder and a post-norm BERT-like one, the kernels that really run, the bytes,
the calibration that matters, and bad input named. Compiles take tens of seconds: each
model is built once per module."""
import copy
import warnings

import pytest
import torch

from labkit import measure
from labkit import model as M
from labkit.techniques import static_int8 as SI
from labkit.validate import LabkitConfigError

pytestmark = pytest.mark.skipif(SI.unavailable() is not None,
                                reason=f"static INT8 unavailable: {SI.unavailable()}")

# Static per-tensor activation ranges cost more than dynamic per-row ones: on these
# untrained encoders 1-3% of the largest fp32 logit (dynamic INT8: ~0.1%). The bound:
TOL = 0.06  # max |logit - fp32 logit| <= TOL * max |fp32 logit|


def _batch(cfg, b, n, g, types=False):
    ids = torch.randint(6, cfg.vocab_size, (b, n), generator=g)  # (B, N)
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[:, n - 3:] = True  # the last 3 tokens are padding
    tt = None
    if types:
        tt = torch.zeros(b, n, dtype=torch.long)
        tt[:, n // 2:] = 1
    return (ids, mask, tt)


def _built(kw, types):
    m = M.build("tiny", **kw).eval()
    g = torch.Generator().manual_seed(1)
    ex = _batch(m.cfg, 16, 32, g, types)
    cal = [_batch(m.cfg, 16, 32, g, types) for _ in range(8)]  # "training rows"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return m, ex, cal, SI.static_int8(m, cal, ex)


@pytest.fixture(scope="module")
def pre():
    return _built({}, False)


@pytest.fixture(scope="module")
def post():  # BERT-like: post-norm, segment embeddings, BERT's LayerNorm eps
    return _built({"norm_position": "post", "type_vocab_size": 2, "norm_eps": 1e-12}, True)


def _rel_err(a, ref):
    return float((a - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("which", ["pre", "post"])
def test_logits_close_to_fp32(which, request):
    m, ex, _, s = request.getfixturevalue(which)
    g = torch.Generator().manual_seed(7)
    other = _batch(m.cfg, 5, 20, g, ex[2] is not None)  # another shape: symbolic shapes
    with torch.no_grad():
        for args in (ex, other):
            assert _rel_err(s(*args), m(*args)) <= TOL
    assert s(*ex).shape == (16, m.cfg.num_labels)


def test_kernels_that_run_are_int8(pre):
    from torch.profiler import ProfilerActivity, profile

    _, ex, _, s = pre
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        s(*ex)
    names = {e.key for e in prof.key_averages()}
    assert any("qlinear_pointwise" in n for n in names), names
    assert not any(n in ("aten::linear", "aten::addmm", "aten::mm") for n in names)
    assert "qlinear_pointwise" in s.kernel_path and SI.cpu_int8_isa() in s.kernel_path


def test_calibration_size_stated_and_calibration_matters(pre):
    m, ex, _, s = pre
    assert s.info["calibration_batches"] == 8 and s.info["calibration_rows"] == 8 * 16
    assert s.info["calibration_tokens"] == 8 * 16 * (32 - 3)
    # ranges from one repeated token: the real batch falls outside them
    bad = [(torch.full((16, 32), 7), torch.zeros(16, 32, dtype=torch.bool), None)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s_bad = SI.static_int8(m, bad, ex)
    with torch.no_grad():
        ref = m(*ex)
        assert _rel_err(s_bad(*ex), ref) > 3 * _rel_err(s(*ex), ref)


def test_bytes_counted_on_what_the_graph_stores(pre):
    m, _, _, s = pre
    b = measure.model_bytes(s)
    linears = [x for n, x in m.named_modules() if isinstance(x, torch.nn.Linear)]
    assert b["int8"] == sum(x.weight.numel() for x in linears)  # every linear's codes
    assert b["total"] < measure.model_bytes(m)["total"]
    # the unused fp32 weights the converted graph still carries are not counted
    assert b["float32"] < measure.model_bytes(m)["float32"] - 3 * b["int8"]


def test_like_with_like_fp32_is_the_same_graph_compiled(pre):
    m, ex, _, _ = pre
    f = SI.compiled_fp32(m, ex)
    with torch.no_grad():
        torch.testing.assert_close(f(*ex), m(*ex), atol=1e-5, rtol=1e-4)
    assert "freezing" in f.kernel_path


def test_inputs_must_match_the_export(post, pre):
    _, ex, _, s = post
    with pytest.raises(LabkitConfigError, match="token_type_ids"):
        s(ex[0], ex[1])  # exported with token types
    with pytest.raises(RuntimeError, match="inference"):
        pre[3].train()
    pre[3].eval()  # eval is fine


def test_bad_calibration_is_named(pre):
    m, ex, cal, _ = pre
    v = m.cfg.vocab_size
    ok = cal[0]
    big = (ok[0].clone().fill_(v), ok[1], None)
    cases = [
        ([ok, big], r"calibration\[1\] ids.*vocab_size"),
        ([(ok[0][0], None, None)], r"calibration\[0\] ids.*2-D"),
        ([(ok[0], ok[1][:, :5], None)], r"calibration\[0\] padding_mask"),
        ([(ok[0], None, None)], r"calibration\[0\] inputs"),  # exported with a mask
        ([], "at least one batch"),
        (ok[0], "a list of batches"),
    ]
    for calib, match in cases:
        with pytest.raises(LabkitConfigError, match=match):
            SI.static_int8(m, calib, ex)
    with pytest.raises(LabkitConfigError, match="max_len"):
        long = torch.randint(6, v, (2, m.cfg.max_len + 1))
        SI.static_int8(m, [long], (long,))
    with pytest.raises(LabkitConfigError, match="backend"):
        SI.static_int8(m, cal, ex, backend="arm_inductor")
    dec = M.build("tiny", kind="decoder")
    with pytest.raises(LabkitConfigError, match="encoder"):
        SI.static_int8(dec, cal, ex)


def test_a_cpu_without_vnni_is_unavailable_not_a_fallback(monkeypatch, pre):
    m, ex, cal, _ = pre
    monkeypatch.setattr(SI, "cpu_int8_isa", lambda: "no VNNI/AMX")
    assert "VNNI" in SI.unavailable()
    with pytest.raises(SI.StaticInt8Unavailable, match="VNNI"):
        SI.static_int8(m, cal, ex)


def test_as_args_reads_batches_and_tuples():
    ids = torch.zeros(2, 4, dtype=torch.long)
    assert SI.as_args({"input_ids": ids, "labels": 0})[1:] == (None, None)
    assert SI.as_args(ids)[0] is ids and len(SI.as_args((ids,))) == 3
    with pytest.raises(LabkitConfigError, match="input_ids"):
        SI.as_args({"ids": ids})


def test_model_left_unchanged(pre):
    m = pre[0]  # quantized and compiled from a copy: the same weights as a fresh build
    fresh = M.build("tiny").state_dict()
    assert all(torch.equal(fresh[k], v) for k, v in m.state_dict().items())
    assert all(type(x) is torch.nn.Linear for x in m.modules() if "Linear" in type(x).__name__)


def test_stacks_on_a_pruned_model_with_int8_embeddings(pre):
    """What the planner hands it: half the FFN neurons removed, embeddings in INT8."""
    from labkit.techniques import EmbeddingInt8Config, apply_
    from labkit.techniques import sparsity as S

    m, ex, cal, _ = pre
    small = apply_(S.compact_neurons_(copy.deepcopy(m), 0.5), EmbeddingInt8Config())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = SI.static_int8(small, cal, ex)
    with torch.no_grad():
        assert _rel_err(s(*ex), small(*ex)) <= TOL
    assert measure.model_bytes(s)["total"] < measure.model_bytes(small)["total"]


def test_keep_fp32_leaves_those_linears_unquantized(pre):
    """Every linear kept fp32: the quantized graph computes fp32's logits exactly; none
    kept: it does not; a name that is no linear of the model is an error naming it."""
    m, ex, cal, _ = pre
    linears = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)]
    with torch.inference_mode():
        ref = m(*ex)
        every = SI.quantized_graph(m, cal, ex, tuple(linears))(*ex)
        none = SI.quantized_graph(m, cal, ex, ())(*ex)
    assert torch.allclose(every, ref, atol=1e-5)
    assert not torch.allclose(none, ref, atol=1e-4)
    with pytest.raises(LabkitConfigError, match="keep_fp32.*blocks.0.norm1"):
        SI.check_keep_fp32(m, ["blocks.0.norm1"])
    with pytest.raises(LabkitConfigError, match="keep_fp32"):
        SI.check_keep_fp32(m, "blocks.0.ffn.down")


def test_rank_fp32_fallback_puts_the_linear_that_matters_first(pre):
    """One hidden unit of each FFN made an outlier (its up row and bias scaled by f, its
    down column by 1 / f: the function barely changes, but the down projection's per-tensor
    input range is set by that one unit), f = 300 in block 0 and 100 in block 1: keeping
    block 0's down projection fp32 brings INT8 closest to fp32, then block 1's, then
    everything quantized; the chooser keeps the fewest that reach its KL fraction."""
    m, ex, cal, _ = pre
    m = copy.deepcopy(m)
    names = SI.ffn_down_names(m)
    assert names == [f"blocks.{i}.ffn.down" for i in range(len(m.blocks))] and len(names) == 2
    with torch.no_grad():
        for i, f in ((0, 300.0), (1, 100.0)):
            up, down = m.get_submodule(f"blocks.{i}.ffn.up"), m.get_submodule(names[i])
            up.weight[0] *= f
            up.bias[0] = 3.0 * f
            down.weight[:, 0] /= f
        for p in m.head.parameters():  # logits that vary, so their KL does
            p.mul_(30.0)
    g = torch.Generator().manual_seed(7)
    check = [_batch(m.cfg, 16, 32, g) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = SI.rank_fp32_fallback(m, cal, check, ex)
    assert [r["name"] for r in rows] == [names[0], names[1], None]
    assert rows == sorted(rows, key=lambda r: r["kl"])
    assert all(0 <= r["flipped"] <= 1 for r in rows)
    with pytest.raises(LabkitConfigError, match="check"):
        SI.rank_fp32_fallback(m, cal, [], ex)
    # the fewest to keep: the outlier's linear alone cuts the KL far below half
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keep, tried = SI.choose_fp32_fallback(m, cal, check, ex, rows, kl_fraction=0.5)
        assert keep == [names[0]] and len(tried) == 1
        assert tried[0]["kl"] <= 0.5 * next(r["kl"] for r in rows if r["name"] is None)
        # a fraction no prefix reaches keeps every linear that helped alone, in order
        keep_all, tried_all = SI.choose_fp32_fallback(m, cal, check, ex, rows, 1e-12)
    base = next(r["kl"] for r in rows if r["name"] is None)
    helpful = [r["name"] for r in rows if r["name"] is not None and r["kl"] < base]
    assert keep_all == helpful and len(tried_all) == len(helpful) > 1
    # a linear that alone made INT8 worse is never kept
    worse = rows + [{"name": "blocks.0.attn.q", "keep_fp32": ["blocks.0.attn.q"],
                     "kl": 2 * base, "flipped": 0.0}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert SI.choose_fp32_fallback(m, cal, check, ex, worse, 1e-12)[0] == helpful
    with pytest.raises(LabkitConfigError, match="kl_fraction"):
        SI.choose_fp32_fallback(m, cal, check, ex, rows, kl_fraction=0)
