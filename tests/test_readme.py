"""The README's commands are the ones CI runs (a new user and CI do the same thing)."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _ci_commands():
  lines = (ROOT / ".ci/run").read_text().splitlines()
  out = {}
  for i, line in enumerate(lines):
    m = re.match(r"# README: (\w+)", line)
    if m:
      out[m.group(1)] = lines[i + 1].strip()
  return out


def test_ci_runs_the_readme_install_and_test_commands():
  readme = (ROOT / "README.md").read_text()
  commands = _ci_commands()
  assert set(commands) == {"install", "test"}, commands
  for what, command in commands.items():
    assert f"\n{command}\n" in readme, f"the README lacks CI's {what} command {command!r}"


def test_readme_demo_command_uses_an_existing_config():
  readme = (ROOT / "README.md").read_text()
  configs = re.findall(r"--config=(configs/\w+\.py)", readme)
  assert "configs/digits.py" in configs
  for c in configs:
    assert (ROOT / c).exists(), c
