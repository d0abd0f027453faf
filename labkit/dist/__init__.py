"""Parallel training on ``torch.distributed``, launched by ``torchrun``: the lab's
parallel-degree knob (the seed paper's Eq. 7-10: data, model and pipeline parallel, and
their hybrid).

* :mod:`~labkit.dist.launcher` runs an experiment under ``torchrun`` (``--standalone`` on
  this machine, a rendezvous endpoint on a cluster), streams per-step JSON lines back and
  returns the result the last rank wrote atomically.
* :mod:`~labkit.dist.worker` is what torchrun runs on every rank: it sets up the process
  group (gloo on CPU, nccl on GPUs, always with a timeout) and dispatches to an experiment
  by name (``ddp``, ``tensor``, ``pipeline``, ``hybrid``, ``calibrate``, ``memory``,
  ``suite``) or by ``"package.module:function"``.
* :mod:`~labkit.dist.ddp`, :mod:`~labkit.dist.tensor`, :mod:`~labkit.dist.pipeline`: the
  strategies; :mod:`~labkit.dist.memory`: the bytes each strategy's ranks allocate;
  :mod:`~labkit.dist.simulator`: step time, bubble and memory at scale, calibrated on
  what this machine measured.
"""
from .launcher import LaunchError, LaunchResult, command, launch, pick_backend

__all__ = ["LaunchError", "LaunchResult", "command", "launch", "pick_backend"]
