"""Preemption: a SIGTERM checkpoints the current step on every process and exits 0.

Runs `python -m dit_jax.main --config=configs/testing.py` in subprocesses. A small wrapper
(`main_cmd`) sends a real SIGTERM to its own process when training reaches a chosen step (from
inside Orbax's `CheckpointManager.should_save`, which the loop calls at every step boundary), so
the signal always lands mid-run, never during start-up.

  one process:   in tests/test_gcs.py, on a gs:// workdir (one chain of runs shared with the
                 gs:// tests): SIGTERM at step 4 -> the checkpoint of step 5 (the next
                 boundary, not a cadence step), exit 0; the same command then resumes at 5 and
                 trains to 6, and the final state is bit-identical to an uninterrupted run's.
  two processes: here (jax.distributed on 127.0.0.1, preparing a tiny TFDS set once: see the
                 test) SIGTERM to process 1 only: JAX's preemption sync point makes both
                 stop at the same step, save it together, exit 0.
"""
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

from test_resume import subprocess_env  # pylint: disable=g-bad-import-order

REPO = pathlib.Path(__file__).resolve().parents[1]
OVERRIDES = [
    "--config.checkpoint.save_every_steps=100",  # Only preemption and the end save.
    "--config.checkpoint.async_save=true",
    "--config.logging.sample_every_steps=0",
    "--config.sample.final_num_samples_per_class=0",
]

_SIGNALLER = textwrap.dedent("""
    # Runs dit_jax.main; sends SIGTERM to this process when training reaches step SIGNAL_STEP
    # (-1: never).
    import os, runpy, signal, sys
    import orbax.checkpoint as ocp

    signal_step = int(sys.argv[1])
    _should_save = ocp.CheckpointManager.should_save

    def should_save(self, step):
      if step == signal_step:
        print(f"SIGTERM at step {step}", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
      return _should_save(self, step)

    ocp.CheckpointManager.should_save = should_save
    sys.argv = ["dit_jax.main"] + sys.argv[2:]
    runpy.run_module("dit_jax.main", run_name="__main__", alter_sys=True)
""")


def main_cmd(signal_step, *flags, import_first="os"):
  """`python -m dit_jax.main *flags`, sending itself a SIGTERM at step `signal_step` (-1: never);
  `import_first` names a module imported before (e.g. one registering a TFDS builder)."""
  return [sys.executable, "-c", f"import {import_first}\n" + _SIGNALLER, str(signal_step),
          *flags]


def _cmd(workdir, signal_step, total_steps, *extra, import_first="os"):
  return main_cmd(signal_step, f"--config={REPO / 'configs' / 'testing.py'}",
                  f"--workdir={workdir}", f"--config.total_steps={total_steps}", *OVERRIDES,
                  *extra, import_first=import_first)


def _steps(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def stopped_at(stderr):
  """The step of the run's one "Stopped at step <s>" line."""
  lines = [l for l in stderr.splitlines() if "Stopped at step" in l]
  assert len(lines) == 1, stderr[-3000:]
  return int(lines[0].split("Stopped at step ")[1].split()[0])


def test_two_processes_prepare_once_and_stop_together_on_sigterm(tmp_path):
  """Two processes share one run: the data step and the preemption stop, both multi-process.

  The data is a tiny TFDS set (tests/tiny_tfds.py) in an empty data directory with
  `data.prepare=True`: exactly one process (0) builds it while the other waits. Then a SIGTERM
  to process 1 only: JAX's preemption sync point stops both at the same step, which both save.
  """
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{s.getsockname()[1]}"
  env = subprocess_env(tmp_path / "jax_cache")
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  env["DIT_JAX_TINY_TFDS_LOG"] = str(tmp_path / "prepared_by")
  env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env.get("PYTHONPATH", "")])
  data = ["--config.data.name=tfds:dit_jax_tiny_images", f"--config.data.data_dir={tmp_path / 'tfds'}",
          "--config.data.prepare=True", "--config.data.num_classes=3",
          "--config.model.in_channels=3", "--config.logging.grid_classes=(0,1,2)"]
  workdir = tmp_path / "run"
  procs, logs = [], []
  for i in range(2):
    logs.append(open(tmp_path / f"process_{i}.log", "w+"))
    procs.append(subprocess.Popen(
        _cmd(workdir, 3 if i == 1 else -1, 40, f"--coordinator_address={address}",
             "--num_processes=2", f"--process_id={i}", "--config.mesh.fsdp=4",
             "--config.mesh.data=1", *data, import_first="tiny_tfds"),
        cwd=REPO, env=env, stdout=logs[i], stderr=subprocess.STDOUT, text=True))
  try:
    codes = [p.wait(timeout=300) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  texts = []
  for log in logs:
    log.seek(0)
    texts.append(log.read())
    log.close()
  assert codes == [0, 0], [t[-3000:] for t in texts]
  # The data step: built once, by process 0.
  assert (tmp_path / "prepared_by").read_text().split() == [str(procs[0].pid)]
  assert "Process 0 prepares the data (if needed) while 1 others wait." in texts[0]
  # The stop: the same step on both, one checkpoint with both processes' shards.
  assert "SIGTERM at step 3" in texts[1] and "SIGTERM at step" not in texts[0]
  step_0, step_1 = stopped_at(texts[0]), stopped_at(texts[1])
  assert step_0 == step_1 and 3 <= step_1 < 40
  assert "(preemption notice)" in texts[0] and "(preemption notice)" in texts[1]
  assert _steps(workdir) == [step_1]
  assert {p.name for p in (workdir / "checkpoints" / str(step_1) / "state").glob(
      "ocdbt.process_*")} == {"ocdbt.process_0", "ocdbt.process_1"}
