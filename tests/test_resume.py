"""Resume is exact: SIGKILLed and resumed training matches uninterrupted training bit for bit.

Runs `python -m dit_jax.main --config=configs/testing.py` in subprocesses (8 simulated CPU
devices, inherited from conftest) on the testing config, with k = 4 and checkpoints every 2 steps:

  straight:  steps 0 -> 8 in one process.
  killed:    0 -> 8, SIGKILLed right after the step-4 checkpoint is finalized;
  resumed:   resumes at 4, SIGKILLed while the (async) step-6 save is being written, which leaves
             only a temporary directory for step 6;
  finished:  resumes at 4 again (step 6 never became a checkpoint) and trains to 8.

The final checkpoints (params, EMA params, optimizer state, step, data position) must be
bit-identical to the straight run's, and so must the step-4 checkpoints.

The kills come from a small wrapper that runs dit_jax.main with Orbax's CheckpointManager.save
wrapped to SIGKILL the process at a chosen step (a real SIGKILL: no exit handlers run). All
runs share a persistent compilation cache so that only the first one compiles the train step.
"""
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np

from dit_jax import checkpointing

REPO = pathlib.Path(__file__).resolve().parents[1]
TOTAL_STEPS = 8
KILL_AFTER_SAVE = 4
KILL_DURING_SAVE = 6

OVERRIDES = [
    f"--config.total_steps={TOTAL_STEPS}",
    "--config.checkpoint.save_every_steps=2",
    "--config.checkpoint.max_to_keep=10",
    "--config.checkpoint.async_save=true",
    "--config.logging.sample_every_steps=0",
    "--config.sample.final_num_samples_per_class=0",
    # A SIGKILLed run leaves its workdir lock behind; a 1 s lease has expired by the time the
    # next run (seconds of start-up later) checks it, as after a preemption.
    "--config.checkpoint.lock_lease_secs=1",
]

_KILLER = textwrap.dedent("""
    # Runs dit_jax.main and prints the step of every checkpoint save it starts; SIGKILLs this
    # process at checkpoint step KILL_STEP (-1: never), either once the save is finalized
    # ("after") or right after the save started ("during": async saves are then still writing
    # in a background thread).
    import os, runpy, signal, sys
    import orbax.checkpoint as ocp

    kill_step, when = int(sys.argv[1]), sys.argv[2]
    _save = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
      started = _save(self, step, *args, **kwargs)
      if started:
        print(f"SAVING step {step}", flush=True)
      if started and step == kill_step:
        if when == "after":
          self.wait_until_finished()
        print(f"KILLING at step {step} ({when} save)", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
      return started

    ocp.CheckpointManager.save = save
    sys.argv = ["dit_jax.main"] + sys.argv[3:]
    runpy.run_module("dit_jax.main", run_name="__main__", alter_sys=True)
""")


def subprocess_env(cache_dir) -> dict:
  """The test environment (8 CPU devices etc. from conftest) plus a shared compilation cache."""
  env = dict(os.environ)
  env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def run_main(workdir, env, *, kill_step=None, when=None, extra=(), timeout=300):
  args = [f"--config={REPO / 'configs' / 'testing.py'}", f"--workdir={workdir}",
          *OVERRIDES, *extra]
  cmd = [sys.executable, "-c", _KILLER, str(-1 if kill_step is None else kill_step),
         str(when), *args]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
  expected = 0 if kill_step is None else -signal.SIGKILL
  assert proc.returncode == expected, (
      f"{cmd} exited with {proc.returncode}, expected {expected}:\n{proc.stderr[-5000:]}")
  return [int(line.split()[-1]) for line in proc.stdout.splitlines()
          if line.startswith("SAVING step")]


def assert_checkpoints_equal(workdir_a, workdir_b, step):
  state_a, meta_a = checkpointing.load_on_host(str(workdir_a), step)
  state_b, meta_b = checkpointing.load_on_host(str(workdir_b), step)
  assert meta_a["step"] == meta_b["step"] == step
  assert meta_a["data_position"] == meta_b["data_position"]
  paths_a, leaves_a = zip(*jax.tree_util.tree_flatten_with_path(state_a)[0])
  paths_b, leaves_b = zip(*jax.tree_util.tree_flatten_with_path(state_b)[0])
  assert paths_a == paths_b
  assert {str(p[0].key) for p in paths_a} >= {"params", "ema_params", "opt_state", "step"}
  for path, a, b in zip(paths_a, leaves_a, leaves_b):
    assert a.dtype == b.dtype and a.shape == b.shape, jax.tree_util.keystr(path)
    assert np.array_equal(a, b), (
        f"step {step} {jax.tree_util.keystr(path)}: max |diff| {np.max(np.abs(a - b))}")


def test_killed_and_resumed_training_is_bit_identical(tmp_path):
  env = subprocess_env(tmp_path / "jax_cache")
  straight, killed = tmp_path / "straight", tmp_path / "killed"

  assert run_main(straight, env) == [2, 4, 6, 8]
  assert checkpointing.load_on_host(str(straight))[1]["step"] == TOTAL_STEPS

  # 1) Killed right after the step-4 checkpoint is finalized (nothing later was saved).
  assert run_main(killed, env, kill_step=KILL_AFTER_SAVE, when="after") == [2, 4]
  ckpt_dir = killed / "checkpoints"
  assert sorted(p.name for p in ckpt_dir.iterdir()) == ["2", "4"]

  # 2) Resumed at 4 (its first save is step 6), killed while the async step-6 save is being
  # written.
  assert run_main(killed, env, kill_step=KILL_DURING_SAVE, when="during") == [6]
  names = sorted(p.name for p in ckpt_dir.iterdir())
  assert str(KILL_DURING_SAVE) not in names, names
  assert any(n.startswith(f"{KILL_DURING_SAVE}.orbax-checkpoint-tmp") for n in names), names

  # 3) Resumed at 4 again (the unfinished step 6 is ignored and cleaned up), trains to 8.
  assert run_main(killed, env) == [6, 8]
  assert sorted(int(p.name) for p in ckpt_dir.iterdir()) == [2, 4, 6, 8]

  assert_checkpoints_equal(straight, killed, KILL_AFTER_SAVE)
  assert_checkpoints_equal(straight, killed, TOTAL_STEPS)
