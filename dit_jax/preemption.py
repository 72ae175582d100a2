"""Stopping for preemption: every process checkpoints the same step, then the run exits 0.

A Spot/preemptible TPU VM (or a Slurm job at its time limit, or an operator's `kill`) gets a
SIGTERM and about 30 s before the hard kill. Training checks `StopRequest.reached(step)` at
every step boundary; when it says True, the loop saves a checkpoint of that step, waits for
it, and returns without the final samples, so the process exits 0 and a restart (the same
command; launch/tpu_watch.sh) resumes from exactly that step.

All processes must agree on the step, or their collectives (and Orbax's multi-process save)
would deadlock:

- several JAX processes (`jax.distributed` initialised): JAX's preemption sync manager. Its
  notifier catches SIGTERM in each process (on Cloud TPU also the maintenance-event notice);
  the coordination service then names one step that every process reaches, and
  `multihost_utils.reached_preemption_sync_point(step)` is True there on all of them. Between
  notices it is a local check (no collective per step). A Python SIGTERM handler would replace
  JAX's, so none is installed here.
- one process: a Python SIGTERM handler sets a flag; the next step boundary stops.

Orbax's `PreemptionCheckpointingPolicy` (in checkpointing.create_manager) asks the same sync
point, so on several processes its `should_save` agrees with `reached`.
"""
from __future__ import annotations

import signal
import threading

from absl import logging


def _sync_manager_active() -> bool:
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


class StopRequest:
  """Whether the run should checkpoint and stop at a step boundary (see module docstring).

  `install()` (or entering it as a context manager) sets up the single-process SIGTERM
  handler; `close()` (or leaving the context) restores the previous one.

  Attributes:
    reason: why it stopped ("SIGTERM", "preemption notice"), or None.
  """

  def __init__(self):
    self.reason: str | None = None
    self._signalled = threading.Event()
    self._distributed = False
    self._previous = None

  @classmethod
  def install(cls) -> "StopRequest":
    return cls().__enter__()

  def close(self) -> None:
    self.__exit__()

  def __enter__(self) -> "StopRequest":
    self._distributed = _sync_manager_active()
    if not self._distributed and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    if not self._signalled.is_set():
      logging.warning("SIGTERM: checkpointing at the next step boundary, then stopping.")
    self._signalled.set()

  def reached(self, step: int) -> bool:
    """True at the step where every process checkpoints and stops. Call once per step."""
    if self._distributed:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      if multihost_utils.reached_preemption_sync_point(int(step)):
        self.reason = "preemption notice"
        return True
      return False
    if self._signalled.is_set():
      self.reason = "SIGTERM"
      return True
    return False
