"""What the notebooks share, one module per family, on :mod:`labkit.labs.common`.

* :mod:`.common`: build and train several variants on the same batches, summaries, claimed
  vs counted, side-by-side timing with a noise verdict, small parameter helpers.
* :mod:`.workloads`: the decoder LM or the encoder on synthetic NLI, sized for a preset.
* :mod:`.attention`: attention maps, spectra and low-rank errors (notebooks 01, 02).
* :mod:`.ffn`: FFN spectra, SVD sweeps, claimed vs measured, size sweeps (notebook 03).
* :mod:`.sparsity`, :mod:`.pruning`: sparse training, pruning methods, the survey's curve
  study, claimed vs measured and accelerate (notebook 04), latency against sparsity (05).
* :mod:`.structures`: the sparse-structure benchmark's parameters, figures, metrics (05).
* :mod:`.quant`, :mod:`.quant_study`: fake quantization, Hessian bits, INT8 latency and
  bytes, and notebook 06's studies (06).
* :mod:`.depth`: cached depth baselines, LayerDrop / early-exit / CQIL sweeps (notebooks 08, 09).
* :mod:`.depth_summary`: notebooks 08-09's parameter checks, figures, claimed vs measured.
* :mod:`.paper`, :mod:`.paper_verdicts`, :mod:`.paper_convergence`: the seed paper's matched
  methods, verdicts and Fig. 2 (notebook 10).
"""
