import pytest
import torch

from labkit import model as M
from labkit.validate import LabkitConfigError


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_forward_shapes_and_seams(kind):
    m = M.build("tiny", kind=kind, num_labels=3)
    ids = torch.randint(0, m.cfg.vocab_size, (2, 16))
    out = m(ids)
    assert out.shape == ((2, 3) if kind == "encoder" else (2, 16, m.cfg.vocab_size))
    assert isinstance(m.blocks[0].attn, M.Attention) and isinstance(m.blocks[0].ffn, M.MLP)
    norm = M.RMSNorm if kind == "decoder" else torch.nn.LayerNorm
    assert isinstance(m.blocks[0].norm1, norm)


def test_decoder_is_causal():
    m = M.build("tiny", kind="decoder").eval()
    ids = torch.randint(0, m.cfg.vocab_size, (1, 12))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % m.cfg.vocab_size
    with torch.no_grad():
        a, b = m(ids), m(changed)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_padding_does_not_change_encoder_output():
    m = M.build("tiny", num_labels=2).eval()
    ids = torch.randint(4, m.cfg.vocab_size, (1, 10))
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], 1)
    mask = padded == 0
    with torch.no_grad():
        torch.testing.assert_close(m(ids), m(padded, mask), atol=1e-5, rtol=1e-5)


def test_seeded_build_repeats_and_base_is_about_100m():
    a, b = M.build("tiny", seed=3), M.build("tiny", seed=3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    n = M.count_params(M.build("base", seed=None))
    assert 90e6 < n < 130e6


def test_tied_embeddings_counted_once():
    m = M.build("tiny", kind="decoder")
    assert m.head.weight is m.embed.weight
    assert M.count_params(m) == sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("field,value", [("n_heads", 3), ("d_model", 4), ("kind", "rnn"),
                                         ("dropout", 1.0), ("vocab_size", 0)])
def test_bad_config_names_field(field, value):
    with pytest.raises(LabkitConfigError, match=field):
        M.ModelConfig(**{field: value})


def test_unknown_preset_and_too_long_sequence():
    with pytest.raises(LabkitConfigError, match="preset='huge'.*'tiny'"):
        M.preset("huge")
    m = M.build("tiny", max_len=16)
    with pytest.raises(LabkitConfigError, match="sequence length=20.*max_len=16"):
        m(torch.zeros(1, 20, dtype=torch.long))
