import torch

from labkit import zoo


def test_trained_baseline_is_cached_and_reloads_identically(tmp_path):
    a = zoo.trained_encoder(steps=30, n_train=200, n_eval=50, progress=False, cache_dir=tmp_path)
    assert not a.cached and a.path.is_file() and 0 <= a.metrics["accuracy"] <= 1
    b = zoo.trained_encoder(steps=30, n_train=200, n_eval=50, progress=False, cache_dir=tmp_path)
    assert b.cached and b.metrics == a.metrics
    for (n, p), (_, q) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(p, q), n
    c = zoo.trained_encoder(steps=31, n_train=200, n_eval=50, progress=False, cache_dir=tmp_path)
    assert c.path != a.path and not c.cached
    assert not list(tmp_path.glob(".*.tmp"))
