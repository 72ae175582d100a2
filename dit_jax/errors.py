"""One way to report a user's mistake (STYLE.md habit 12).

Code that validates input raises `UserError` with one line naming the field, file or value
and what was expected. Every command line runs its body through `run_cli`, which prints that
line as `<prog>: error: <message>` on stderr and returns exit code 2, without a traceback.
`--debug` on the command line (or `debug=True`) shows the traceback instead. Anything else
(a genuine bug) still raises with its traceback.

  def main(argv=None) -> int:
    return errors.run_cli("python -m dit_jax.sample", _main, argv)
"""
from __future__ import annotations

import re
import sys
import traceback
from typing import Callable, Sequence

EXIT_USER_ERROR = 2


class UserError(ValueError):
  """A problem with the command line, the config or the files: printed as one line.

  A ValueError, so that callers and tests written against the library's earlier ValueErrors
  for bad config values keep working.
  """


class MissingExtra(UserError, ImportError):
  """An optional dependency (an install extra) that this input needs is not installed.

  Also an ImportError, for callers that test for one; printed as one line like any UserError.
  """


def one_line(message: str) -> str:
  """`message` folded onto one line (a user error is always one line)."""
  return " ".join(str(message).split())


def run_cli(prog: str, body: Callable[[list[str]], int | None],
            argv: Sequence[str] | None = None, *, debug: bool | None = None) -> int:
  """Runs `body(argv)`; a `UserError` becomes one line on stderr and exit code 2.

  argv: the arguments without the program name (default `sys.argv[1:]`); a `--debug` among
  them is removed before `body` sees it and shows the traceback of a user error.
  Returns body's return value (None counts as 0).
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  if debug is None:
    debug = "--debug" in argv
  argv = [a for a in argv if a != "--debug"]
  try:
    code = body(argv)
  except UserError as e:
    if debug:
      traceback.print_exc()
    print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
    return EXIT_USER_ERROR
  return 0 if code is None else int(code)


def config_override_error(argv: Sequence[str], e: BaseException) -> str:
  """One line for ml_collections' error on an override naming no config field.

  config_flags raises AttributeError/KeyError('...Did you mean "x"...') without the override's
  path; this finds it in `argv` (e.g. `--config.optimizer.learning_rat: the config has no field
  'learning_rat'; did you mean 'learning_rate'?`).
  """
  text = str(e)
  key = re.search(r"'([A-Za-z_]\w*)", text)
  key = key.group(1) if key else text
  names = [a.split("=", 1)[0] for a in argv if a.lstrip("-").startswith("config.")]
  culprit = next((n for n in names if key in n.split(".")), "an override")
  hint = re.search(r'Did you mean "([^"]+)"', text)
  return (f"{culprit}: the config has no field {key!r}"
          + (f"; did you mean {hint.group(1)!r}?" if hint else "."))
