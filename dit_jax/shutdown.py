"""How a training process reports a failed checkpoint save: one line, then a quiet exit.

When one write of a save fails (a full disk, a storage error), Orbax's and tensorstore's
background threads do not stop together, and without care each of them prints:

  * Orbax logs the same exception, with its traceback, from every thread of the save
    (`_SignalingThread`, the commit thread, the finalize thread);
  * Orbax awaits the array writes with `asyncio.gather` in a fresh event loop that it closes as
    soon as the first write fails; every tensorstore write still in flight then completes on a
    closed loop, and tensorstore reports each one through `sys.unraisablehook`
    ("RuntimeError: Event loop is closed", 6 lines each; 92 of them in one run here); a failed
    restore likewise abandons Orbax's read coroutines, each reported with a tensorstore spec
    (~60 lines);
  * interpreter shutdown with those threads still alive adds more ("ImportError: sys.meta_path
    is None").

How many of these appear depends on timing (none to hundreds of lines). `install` makes it
deterministic: library error records are folded onto one line and printed once per cause
(`cause_key`), the closed-loop reports of abandoned writes are dropped (`--verbosity=1` logs
them), and `exit_now` ends the process with `os._exit` after flushing, so that the run's own
one-line error is the last line of stderr. The failed step is never finalized (Orbax renames a
step into place only after every write succeeded), so earlier checkpoints are intact. `--debug`
(`install(debug=True)`) keeps everything as the libraries print it.
"""
from __future__ import annotations

import logging as std_logging
import os
import re
import sys
import threading
from typing import Callable

from absl import logging

from dit_jax import errors

# Leading status of an error message: tensorstore/absl codes ("RESOURCE_EXHAUSTED: ...") or an
# OSError's errno ("[Errno 28] ..."); the rest names the file or array, which differs by thread.
_STATUS = re.compile(r"(\[Errno \d+\]|[A-Z][A-Z_]{2,}(?=:))")


def cause_key(exc: BaseException) -> str:
  """What makes two library errors the same cause: the type and the status, not the file."""
  text = errors.one_line(exc)
  status = _STATUS.match(text)
  return f"{type(exc).__name__}: {status.group(1) if status else text}"


def _is_library(record: std_logging.LogRecord) -> bool:
  return "/orbax/" in record.pathname or record.name == "asyncio"


class LibraryLogFilter(std_logging.Filter):
  """Drops INFO records of Orbax (it logs every stage of every save) unless `info`, and prints
  each library error that carries a traceback as one line, once per `cause_key` (a failed save
  logs the same exception from each of its threads; the run's own error names the cause)."""

  def __init__(self, info: bool = False):
    super().__init__()
    self._info = info
    self._seen: set[str] = set()
    self._lock = threading.Lock()  # Filters run outside the handler's lock, in many threads.

  def filter(self, record):
    if not _is_library(record):
      return True
    if record.levelno >= std_logging.ERROR and record.exc_info and record.exc_info[1]:
      key = cause_key(record.exc_info[1])
      with self._lock:
        if key in self._seen:
          return False
        self._seen.add(key)
      record.msg = f"{record.getMessage()}: {errors.one_line(record.exc_info[1])}"
      record.args, record.exc_info, record.exc_text = (), None, None
    return self._info or record.levelno >= std_logging.WARNING


def is_abandoned_io(unraisable) -> bool:
  """An asynchronous read or write abandoned when a sibling failed first: a tensorstore write
  that completed after its event loop was closed, or an Orbax coroutine finalised mid-await."""
  code = getattr(unraisable.object, "cr_code", None)
  if code is not None and "/orbax/" in code.co_filename:
    return True
  if not (isinstance(unraisable.exc_value, RuntimeError)
          and str(unraisable.exc_value) == "Event loop is closed"):
    return False
  tb = unraisable.exc_traceback
  while tb is not None:
    if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
      return True
    tb = tb.tb_next
  return False


def route_unraisable(previous: Callable) -> Callable:
  """A `sys.unraisablehook` that drops abandoned writes' reports and passes on the rest."""

  def hook(unraisable):
    if is_abandoned_io(unraisable):
      logging.vlog(1, "Abandoned asynchronous I/O: %s", errors.one_line(unraisable.exc_value))
      return
    previous(unraisable)

  return hook


def install(info: bool = False, debug: bool = False) -> None:
  """Routes library logs and background-thread reports as above (a no-op with `debug`)."""
  if debug:
    return
  logging.get_absl_handler().addFilter(LibraryLogFilter(info))
  sys.unraisablehook = route_unraisable(sys.unraisablehook)


def exit_now(code: int, line: str) -> None:
  """Prints `line` last on stderr and ends the process at once (no interpreter shutdown, whose
  clean-up of live background threads prints pages of errors)."""
  sys.stdout.flush()
  for handler in std_logging.getLogger().handlers + [logging.get_absl_handler()]:
    handler.flush()
  sys.stderr.write(line + "\n")
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access
