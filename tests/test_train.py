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
