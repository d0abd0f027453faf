import pytest
import torch

from labkit import model as M
from labkit.techniques import LayerDropConfig, LayerPruneConfig, apply_, expected
from labkit.techniques.layerdrop import LayerDropExecutor, evenly_spread
from labkit.validate import LabkitConfigError


def _model(kind="decoder", n=6):
    return M.build("tiny", kind=kind, n_layers=n, seed=0)


def test_evenly_spread_every_other_and_any_k():
    assert evenly_spread(8, 4) == (1, 3, 5, 7)
    assert evenly_spread(8, 8) == tuple(range(8))
    for k in range(1, 9):
        s = evenly_spread(8, k)
        assert len(s) == k and list(s) == sorted(set(s)) and s[-1] <= 7


def test_training_skips_about_p_of_blocks_and_eval_runs_all():
    m = _model()
    ids = torch.randint(0, 1000, (1, 4))
    ref = m.eval()(ids)
    apply_(m, LayerDropConfig(p=0.5))
    m.train()
    torch.manual_seed(0)
    ran = []
    for _ in range(100):
        m(ids)
        ran.append(len(m.executor.last_ran))
    frac = sum(ran) / (100 * 6)
    assert 0.4 < frac < 0.6  # 600 Bernoulli(0.5) draws: sd 0.02
    m.eval()
    assert torch.equal(m(ids), ref)  # every block at eval
    assert m.executor.last_ran == list(range(6))


def test_skipped_blocks_get_no_gradient():
    m = _model()
    apply_(m, LayerDropConfig(p=0.5))
    m.train()
    torch.manual_seed(3)
    ids = torch.randint(0, 1000, (2, 12))
    m(ids).sum().backward()
    ran = set(m.executor.last_ran)
    for i, b in enumerate(m.blocks):
        g = b.ffn.down.weight.grad
        assert (g is not None and g.abs().sum() > 0) == (i in ran)


def test_keep_in_eval_equals_real_prune_and_params_match_expected():
    for kind in ("decoder", "encoder"):
        a, b = _model(kind, 8), _model(kind, 8)
        ids = torch.randint(0, 1000, (2, 12))
        keep = evenly_spread(8, 4)
        apply_(a, LayerDropConfig(p=0.3, keep=keep))
        n0 = M.count_params(b)
        apply_(b, LayerPruneConfig(keep=keep))
        assert len(b.blocks) == 4 and b.cfg.n_layers == 4
        assert torch.allclose(a.eval()(ids), b.eval()(ids))
        e = expected(_model(kind, 8).cfg, LayerPruneConfig(keep=keep))
        assert M.count_params(b) - n0 == e["params_after"] - e["params_before"]


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5])
def test_bad_p(p):
    with pytest.raises(LabkitConfigError, match=rf"p={p!r}.*\[0\.0, 1\.0\)"):
        LayerDropConfig(p=p)


@pytest.mark.parametrize("keep,match", [((), "non-empty"), ((0, 9), r"\[0, 7\]"),
                                        ((3, 1), "increasing"), ((-1,), ">= 0")])
def test_bad_keep(keep, match):
    with pytest.raises(LabkitConfigError, match=match) as e:
        apply_(_model(n=8), LayerPruneConfig(keep=keep))
    assert "keep=" in str(e.value)


def test_bad_keep_on_layerdrop_and_executor():
    with pytest.raises(LabkitConfigError, match="keep="):
        apply_(_model(n=4), LayerDropConfig(p=0.1, keep=(1, 4)))
    with pytest.raises(LabkitConfigError, match="p="):
        LayerDropExecutor(p=1.0)
