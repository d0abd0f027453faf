import torch

from labkit import data as D
from labkit import model as M
from labkit import train as T


def _run(seed, steps=20, callbacks=()):
    corpus = D.load_lm_corpus(n_sentences=300)
    m = M.build("tiny", kind="decoder", vocab_size=len(corpus.tokenizer), seed=seed)
    ev = [next(D.lm_batches(corpus.eval, 8, 16, seed=1))]
    r = T.fit(m, D.lm_batches(corpus.train, 8, 16, seed=seed), steps=steps, lr=3e-3, seed=seed,
              eval_fn=lambda: T.evaluate(m, ev), eval_every=10, callbacks=callbacks,
              progress=False)
    return m, r


def test_seeded_run_repeats_exactly():
    (m1, r1), (m2, r2) = _run(0), _run(0)
    assert [h["loss"] for h in r1.history] == [h["loss"] for h in r2.history]
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    _, r3 = _run(1)
    assert [h["loss"] for h in r3.history] != [h["loss"] for h in r1.history]


def test_loss_falls_and_callbacks_fire():
    seen = {"step": 0, "eval": 0}

    class Count(T.Callback):
        def on_step(self, s):
            seen["step"] += 1

        def on_eval(self, s):
            seen["eval"] += 1

    _, r = _run(0, steps=60, callbacks=[Count()])
    losses = [h["loss"] for h in r.history if h["split"] == "train"]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    assert seen == {"step": 60, "eval": 6}


def test_steps_to_target_and_early_stop():
    corpus = D.load_lm_corpus(n_sentences=300)
    m = M.build("tiny", kind="decoder", vocab_size=len(corpus.tokenizer))
    ev = [next(D.lm_batches(corpus.eval, 8, 16, seed=1))]
    first = T.evaluate(m, ev)["loss"]
    r = T.fit(m, D.lm_batches(corpus.train, 8, 16), steps=80, lr=3e-3, progress=False,
              eval_fn=lambda: T.evaluate(m, ev), eval_every=5, target=("loss", first * 0.7))
    assert r.steps_to_target is not None and r.steps_to_target % 5 == 0
    evals = {h["step"]: h["loss"] for h in r.history if h["split"] == "eval"}
    assert evals[r.steps_to_target] <= first * 0.7
    assert all(v > first * 0.7 for s, v in evals.items() if s < r.steps_to_target)

    class Stop(T.Callback):
        def on_step(self, s):
            s.stop = s.step == 7

    r = T.fit(m, D.lm_batches(corpus.train, 8, 16), steps=50, progress=False, callbacks=[Stop()])
    assert r.steps == 7


def test_evaluate_runs_one_forward_per_batch_with_token_types():
    from labkit import baselines as B

    m = M.build("tiny", num_labels=3, vocab_size=50, type_vocab_size=2, seed=0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(6, 50, (10, 12), generator=g)
    ids[:, 0] = D.CLS
    pad = torch.zeros_like(ids, dtype=torch.bool)
    pad[:3, 9:] = True
    # segment ids that the separator rule would not derive: dropping them changes the logits
    tt = torch.randint(0, 2, ids.shape, generator=g)
    data = {"input_ids": ids, "padding_mask": pad, "token_type_ids": tt,
            "labels": torch.arange(10) % 3}
    calls = []
    handle = m.register_forward_pre_hook(lambda mod, args: calls.append(args))
    try:
        out = T.evaluate(m, data, batch_size=4)
    finally:
        handle.remove()
    assert len(calls) == 3  # batches of 4, 4, 2: one pass each
    assert all(len(a) == 3 and a[2] is not None for a in calls)
    assert torch.equal(torch.cat([a[2] for a in calls]), tt)
    with torch.no_grad():
        logits = m(ids, pad, tt)
        dropped = m(ids, pad)
    assert not torch.allclose(logits, dropped)
    loss = torch.nn.functional.cross_entropy(logits, data["labels"]).item()
    assert abs(out["loss"] - loss) < 1e-5
    assert out["accuracy"] == int((logits.argmax(-1) == data["labels"]).sum()) / 10
    ref = B.evaluate(m, data, batch_size=4)  # the pretrained path agrees
    assert abs(ref["loss"] - out["loss"]) < 1e-4 and ref["accuracy"] == out["accuracy"]
