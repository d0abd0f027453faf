import pytest
import torch
from torch import nn

from labkit.kernels import masks as M
from labkit.validate import LabkitConfigError


@pytest.fixture
def w():
    torch.manual_seed(0)
    return torch.randn(64, 128)


@pytest.mark.parametrize("s", [0.0, 0.1, 0.5, 0.9, 0.99])
def test_unstructured_exact_sparsity_keeps_largest(w, s):
    mask = M.unstructured_mask(w.abs(), s)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert (~mask).sum() == round(s * w.numel())
    if 0 < s:
        assert w.abs()[mask].min() >= w.abs()[~mask].max()
    M.check_mask(mask, "unstructured", s)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (1, 2), (4, 4)])
def test_nm_every_group_exact(w, n, m):
    mask = M.make_mask(w, "nm", n=n, m=m)
    per = mask.reshape(-1, m).sum(-1)
    assert bool((per == n).all())
    assert M.sparsity_of(mask) == pytest.approx(1 - n / m)
    # the kept entries are the largest of their group
    g, k = w.abs().reshape(-1, m), mask.reshape(-1, m)
    kept_min = torch.where(k, g, torch.inf).min(-1).values
    dropped_max = torch.where(~k, g, -torch.inf).max(-1).values
    assert bool((kept_min >= dropped_max).all())
    M.check_mask(mask, "nm", n=n, m=m)


@pytest.mark.parametrize("b,s", [(8, 0.5), (16, 0.75), (32, 0.5), (4, 0.9)])
def test_block_whole_blocks(w, b, s):
    mask = M.make_mask(w, "block", s, block=b)
    tiles = M.block_scores(mask.float(), b)
    assert bool(((tiles == 0) | (tiles == b * b)).all())
    assert int((tiles == 0).sum()) == round(s * tiles.numel())
    M.check_mask(mask, "block", s, block=b)


def test_rows_and_columns_and_groups(w):
    r = M.make_mask(w, "row", 0.25)
    assert int((~r.any(1)).sum()) == 16 and bool((r.all(1) | ~r.any(1)).all())
    c = M.make_mask(w, "column", 0.5)
    assert int((~c.any(0)).sum()) == 64
    g = M.make_mask(w, "row", 0.5, group=16)  # 4 "heads" of 16 rows
    alive = g[:, 0].reshape(4, 16)
    assert bool((alive.all(1) | ~alive.any(1)).all()) and int(alive.all(1).sum()) == 2
    M.check_mask(g, "row", 0.5, group=16)
    M.check_mask(c, "column", 0.5)


def test_check_mask_detects_broken_structure(w):
    mask = M.make_mask(w, "nm", n=2, m=4)
    mask[0, 0] = ~mask[0, 0]
    with pytest.raises(ValueError, match="groups"):
        M.check_mask(mask, "nm", n=2, m=4)
    b = M.make_mask(w, "block", 0.5, block=16)
    b[0, 0] = ~b[0, 0]
    with pytest.raises(ValueError, match="blocks"):
        M.check_mask(b, "block", block=16)
    with pytest.raises(ValueError, match="sparsity"):
        M.check_mask(M.make_mask(w, "unstructured", 0.5), "unstructured", 0.6)


def test_global_masks_one_threshold():
    torch.manual_seed(0)
    a, b = torch.randn(32, 32), 10 * torch.randn(32, 32)
    masks = M.global_unstructured_masks({"a": a.abs(), "b": b.abs()}, 0.5)
    total_zero = sum(int((~m).sum()) for m in masks.values())
    assert total_zero == 1024
    assert M.sparsity_of(masks["a"]) > M.sparsity_of(masks["b"])


def test_sparsity_zero_keeps_everything(w):
    for s in ("unstructured", "block", "row", "column"):
        assert bool(M.make_mask(w, s, 0.0, block=8).all())


@pytest.mark.parametrize("kwargs,name", [
    ({"structure": "unstructured", "sparsity": 1.0}, "sparsity"),
    ({"structure": "unstructured", "sparsity": -0.1}, "sparsity"),
    ({"structure": "nm", "n": 3, "m": 2}, "n"),
    ({"structure": "nm", "n": 2, "m": 5}, "m"),
    ({"structure": "block", "sparsity": 0.5, "block": 48}, "block"),
    ({"structure": "diagonal", "sparsity": 0.5}, "structure"),
    ({"structure": "row", "sparsity": 0.5, "group": 5}, "group"),
])
def test_bad_input_names_parameter(w, kwargs, name):
    with pytest.raises(LabkitConfigError) as e:
        M.make_mask(w, **kwargs)
    assert e.value.name == name and name in str(e.value)


def test_mask_survives_optimizer_steps():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    mask = M.make_mask(lin.weight, "nm", n=2, m=4)
    M.attach_mask(lin, "weight", mask)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(5):
        loss = lin(torch.randn(4, 16)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert bool((lin.weight[~mask] == 0).all())
    assert torch.equal(M.mask_of(lin, "weight"), mask)
    M.set_mask(lin, "weight", torch.ones_like(mask))
    assert bool(M.mask_of(lin).all())
    M.set_mask(lin, "weight", mask)
    M.remove_mask(lin, "weight")
    assert not hasattr(lin, "parametrizations") or "weight" not in lin.parametrizations
    assert bool((lin.weight[~mask] == 0).all())


def test_high_sparsity_never_deletes_everything():
    w = torch.randn(16, 16)
    m = M.make_mask(w, "row", 0.9, group=4)  # 4 groups: round(3.6) = 4 would kill all
    assert int(m[:, 0].sum()) == 4
    M.check_mask(m, "row", 0.9, group=4)
