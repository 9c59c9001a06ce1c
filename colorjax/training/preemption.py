"""Stopping at a step boundary when the cluster takes the machines back, and checkpoints on a wall-clock timer.

Schedulers announce preemption with SIGTERM (SLURM, Kubernetes, Cloud TPU/GCE VMs) and kill the job after a grace
period. A loop calls `Watch.check()` once per step; when it says stop, training saves a checkpoint at that step and
a stage ends with `errors.Preempted`, which `main` turns into exit status 143 (why that status: `main.py`).

Every host must stop after the same step, or those still stepping wait forever in a collective:
- with jax.distributed (multi-host), JAX's preemption service owns SIGTERM: the host that gets it tells the
  coordination service, which picks one sync step for all hosts (`multihost_utils.reached_preemption_sync_point`,
  the call orbax's `CheckpointManager.reached_preemption` makes). It is fed a per-process count of checks, not the
  loop's step, so loops that restart at step 0 in one process (a pipeline's stages) still reach the sync point;
- one process: a Python SIGTERM handler sets a flag, and the previous handler is restored when the loop ends;
- Ctrl-C (SIGINT) is handled like SIGTERM in every case (a second Ctrl-C interrupts at once), and the stage ends
  with status 130 instead of 143;
- several hosts without that service (`jax_enable_preemption_service=False`): the same handler, and the hosts
  all-gather their flags every AGREE_EVERY checks.
The timer (`train.checkpoint_minutes`) runs on process 0's clock; with several hosts its verdict travels in that
same all-gather, so every host saves at the same step.
Work that one process does alone (the distill stage's fit and prediction, on process 0) uses `Watch(local=True)`:
the Python handler only, no collective (the other hosts are not checking).
"""
import itertools
import signal
import threading
from time import monotonic

import jax
import numpy as np
from jax.experimental import multihost_utils

AGREE_EVERY = 10  # multi-host: checks between all-gathers of the timer (and of SIGTERM flags without JAX's service)

_counter = itertools.count(1)  # this process's checks; equal on every host because all hosts check in lockstep


class Watch:
  """One loop's view of preemption and of the checkpoint timer; use as a context manager around the loop."""

  def __init__(self, checkpoint_minutes: float = 0.0, local: bool = False):
    self.seconds = float(checkpoint_minutes) * 60.0
    self.local = local  # this process alone: its own signal handler, never a collective
    self.requested = False  # a SIGTERM or SIGINT reached this process's own handler
    self.signum = signal.SIGTERM  # the signal that asked to stop (a preemption notice through JAX is a SIGTERM)
    self.stopping = False  # every host agreed to stop
    self._previous = {}  # signal -> the handler installed before this loop
    self._jax_service = False
    self._last_save = monotonic()

  def __enter__(self):
    self._last_save = monotonic()
    if jax.distributed.is_initialized() and not self.local:
      try:  # also a first check: a notice may have come before this loop
        self.stopping = multihost_utils.reached_preemption_sync_point(next(_counter))
        self._jax_service = True
      except RuntimeError:  # the preemption service is off
        pass
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGINT,) if self._jax_service else (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._on_signal)
    return self

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      # None: the previous handler was not set from Python, so it cannot be put back; the default is the nearest.
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    self._previous = {}
    return False

  def _on_signal(self, signum, frame):  # pylint: disable=unused-argument
    if signum == signal.SIGINT and self.requested and self.signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the save
    self.requested, self.signum = True, signum  # nothing else: a handler that prints can break a write it interrupted

  def reason(self) -> str:
    """How the stop is told to the user."""
    return "interrupted (Ctrl-C)" if self.signum == signal.SIGINT else "preempted"

  def saved(self) -> None:
    """A checkpoint was written: the timer starts over."""
    self._last_save = monotonic()

  def check(self) -> tuple[bool, bool]:
    """(stop, timer due), the same on every host. Call once per step, on every host, with no step skipped."""
    count = next(_counter)
    due = bool(self.seconds) and monotonic() - self._last_save >= self.seconds
    if self._jax_service and not self.stopping:
      self.stopping = multihost_utils.reached_preemption_sync_point(count)
    if jax.process_count() == 1 or self.local:
      self.stopping = self.stopping or self.requested
      return self.stopping, due
    if (self.seconds or not self._jax_service) and count % AGREE_EVERY == 0:
      flags = np.asarray(multihost_utils.process_allgather(np.array([due, self.requested], np.int32)))
      self.stopping = self.stopping or bool(flags[:, 1].any())
      return self.stopping, bool(flags[0, 0])  # process 0's clock decides
    return self.stopping, False
