"""One training run per workdir: a lock file held with a heartbeat lease.

`<workdir>/lock.json` holds {"token", "host", "pid", "started", "heartbeat", "lease_secs"}.
A training run (process 0 of a multi-host run) takes it before touching the checkpoints and
rewrites "heartbeat" every lease_secs / 4 from a background thread; it deletes the file when it
ends. A second run on the same workdir finds a live lease and stops at once with a message
naming the holder (host, PID, start time). Readers (sampling, evaluation of a live run) never
take it.

Staleness is judged by the lease, not by the PID, so that it works across hosts: a lock whose
heartbeat is older than its lease_secs belongs to a dead run (killed, preempted, its VM gone)
and the next run takes it over. Clocks of the hosts sharing a workdir are assumed to agree to
well within the lease (NTP on cloud VMs). On `gs://` there is no atomic create-if-absent through
etils.epath, so taking the lock is write-then-verify: write our unique token, wait `settle_secs`,
read back, and hold the lock only if our token is still there (of two runs racing, the one whose
write landed last wins, the other stops).

launch/tpu_watch.sh: a run restarted after a preemption (on a new VM, minutes later) finds the
old lease expired and takes over; a restart within lease_secs of a crash finds it live and
exits with code 2, so a restart loop should wait lease_secs (config.checkpoint.lock_lease_secs)
before restarting a run that died.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import socket
import threading
import time
import uuid
from typing import Callable

from absl import logging
from etils import epath

from dit_jax import errors

LOCK_FILE = "lock.json"


class WorkdirLocked(errors.UserError):
  """Another live run holds the workdir's lock."""


def _read(path: epath.Path) -> dict | None:
  try:
    value = json.loads(path.read_text())
  except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
    return None  # Absent, or a torn local write: nobody holds a readable lease.
  return value if isinstance(value, dict) and "token" in value else None


def _write(path: epath.Path, record: dict) -> None:
  text = json.dumps(record, sort_keys=True)
  if "://" in str(path):
    path.write_text(text)  # An object write is atomic on GCS.
    return
  tmp = path.parent / f".{path.name}.{record['token']}.tmp"
  tmp.write_text(text)
  os.replace(tmp, path)


def _stamp(t: float) -> str:
  return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime(
      "%Y-%m-%d %H:%M:%S UTC")


def describe(record: dict, now: float) -> str:
  return (f"host {record.get('host')!r}, PID {record.get('pid')}, started "
          f"{_stamp(float(record.get('started', 0)))}, last heartbeat "
          f"{now - float(record.get('heartbeat', 0)):.0f}s ago (lease "
          f"{float(record.get('lease_secs', 0)):.0f}s)")


def is_stale(record: dict, now: float) -> bool:
  return now - float(record.get("heartbeat", 0)) > float(record.get("lease_secs", 0))


@dataclasses.dataclass
class WorkdirLock:
  """A held lock; `release()` when the run ends. `check()` raises if the lease was lost.

  Attributes:
    path: the lock file.
    record: what this run wrote (token, host, pid, started, heartbeat, lease_secs).
  """
  path: epath.Path
  record: dict
  clock: Callable[[], float] = time.time
  lost: str | None = None
  _stop: threading.Event = dataclasses.field(default_factory=threading.Event)
  _thread: threading.Thread | None = None

  def _beat(self) -> None:
    period = float(self.record["lease_secs"]) / 4
    while not self._stop.wait(period):
      try:
        current = _read(self.path)
        if current is None or current["token"] != self.record["token"]:
          now = self.clock()
          self.lost = ("the lock file is gone" if current is None
                       else f"taken over by {describe(current, now)}")
          logging.error("Lost the lock of %s: %s.", self.path.parent, self.lost)
          return
        self.record["heartbeat"] = self.clock()
        _write(self.path, self.record)
      except Exception as e:  # pylint: disable=broad-except
        # A failed heartbeat is retried at the next beat; the lease covers a few misses.
        logging.warning("Workdir lock heartbeat failed (retrying): %s", errors.one_line(e))

  def start(self) -> "WorkdirLock":
    self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat",
                                    daemon=True)
    self._thread.start()
    return self

  def check(self) -> None:
    if self.lost:
      raise WorkdirLocked(f"{self.path.parent}: this run lost its workdir lock ({self.lost}); "
                          "stopping so that two runs never write one workdir.")

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    try:
      current = _read(self.path)
      if current is not None and current["token"] == self.record["token"]:
        self.path.unlink()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("Could not remove the workdir lock %s: %s", self.path, e)


def acquire(workdir, lease_secs: float, *, settle_secs: float | None = None,
            clock: Callable[[], float] = time.time) -> WorkdirLock:
  """Takes `<workdir>/lock.json` for this process, or raises WorkdirLocked naming the holder.

  Args:
    workdir: the run directory (local or gs://); it must exist.
    lease_secs: how long a heartbeat stays valid (config.checkpoint.lock_lease_secs).
    settle_secs: wait between writing and verifying the lock (default: min(1, lease/10)).
    clock: seconds since the epoch (tests pass a fake one).
  """
  lease_secs = float(lease_secs)
  if lease_secs <= 0:
    raise errors.UserError(f"config.checkpoint.lock_lease_secs={lease_secs} must be > 0.")
  path = epath.Path(workdir) / LOCK_FILE
  now = clock()
  holder = _read(path)
  if holder is not None and not is_stale(holder, now):
    raise WorkdirLocked(f"{epath.Path(workdir)} is in use by another training run ({describe(holder, now)}); "
                        f"use another --workdir, or wait for that run to end (a dead run's "
                        f"lease expires {float(holder.get('lease_secs', 0)):.0f}s after its "
                        "last heartbeat).")
  if holder is not None:
    logging.warning("Taking over the expired workdir lock of a dead run (%s).",
                    describe(holder, now))
  record = {"token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
            "started": now, "heartbeat": now, "lease_secs": lease_secs}
  _write(path, record)
  time.sleep(min(1.0, lease_secs / 10) if settle_secs is None else settle_secs)
  back = _read(path)
  if back is None or back["token"] != record["token"]:
    raise WorkdirLocked(f"{epath.Path(workdir)}: another training run took the workdir lock at "
                        f"the same time ({'unknown' if back is None else describe(back, clock())}"
                        "); use another --workdir.")
  return WorkdirLock(path, record, clock).start()


@contextlib.contextmanager
def hold(workdir, lease_secs: float | None):
  """Holds the workdir lock for a training run: process 0 takes it, every process agrees.

  Yields the WorkdirLock on process 0 (None elsewhere, or when lease_secs is 0/None: no lock).
  On several processes, process 0's outcome is shared first, so that a refused run stops on
  every host instead of leaving the others waiting in a collective.
  """
  if not lease_secs:
    yield None
    return
  import jax  # pylint: disable=import-outside-toplevel
  lock, refusal = None, None
  if jax.process_index() == 0:
    try:
      lock = acquire(workdir, lease_secs)
    except WorkdirLocked as e:
      refusal = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    refused = multihost_utils.broadcast_one_to_all(np.int32(refusal is not None))
    if refusal is None and int(refused):
      refusal = WorkdirLocked(f"{workdir} is in use by another training run (see process 0).")
  if refusal is not None:
    raise refusal
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()
