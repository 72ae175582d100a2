"""Multi-host works: two local processes train the testing config like one process does.

Two processes, each with 2 simulated CPU devices, join one JAX cluster through
`jax.distributed.initialize` on 127.0.0.1 (`python -m dit_jax.main --coordinator_address=...
--num_processes=2 --process_id=i`; CPU collectives go through gloo, JAX's default CPU
implementation, so nothing needs configuring). Each process reads its own half of every global
batch; parameters and optimizer state are FSDP-sharded 4 ways over a (data 1, fsdp 4) mesh that
spans both processes, so each process writes its own shards of every checkpoint into the shared
workdir. The reference is one process with 4 simulated devices, the same global batch and the
same mesh shape.

Checks: both runs save the same steps; the multi-process checkpoints of steps 2 and 4 (read
here, in one process with 8 devices, i.e. restored on another topology) match the
single-process ones to float32 rounding: params, EMA params and optimizer state; step and data
position exactly; and every parameter tensor moved from step 2 to step 4 by far more than that
tolerance, so the runs trained.
"""
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from dit_jax import checkpointing

REPO = pathlib.Path(__file__).resolve().parents[1]
TOTAL_STEPS = 4
OVERRIDES = [
    f"--config.total_steps={TOTAL_STEPS}",
    "--config.mesh.data=1",
    "--config.mesh.fsdp=4",
    "--config.checkpoint.save_every_steps=2",
    "--config.checkpoint.max_to_keep=10",
    "--config.logging.sample_every_steps=0",
    "--config.sample.final_num_samples_per_class=0",
]
TIMEOUT = 300
RTOL, ATOL = 1e-6, 1e-7  # Observed (2026-12-04): |diff| <= 0.01 (1e-5 |ref| + 1e-6).


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(num_devices: int) -> dict:
  env = dict(os.environ)  # JAX_PLATFORMS etc. from conftest.
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  return env


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "dit_jax.main", f"--config={REPO / 'configs' / 'testing.py'}",
          f"--workdir={workdir}", *OVERRIDES, *extra]


def _wait_all(procs: dict) -> None:
  """Waits for all processes; if one fails (or time runs out) kills the rest and reports it."""
  deadline = time.monotonic() + TIMEOUT
  failed = None
  while failed is None and any(p.poll() is None for p in procs.values()):
    failed = next((n for n, p in procs.items() if p.poll() not in (None, 0)), None)
    if time.monotonic() > deadline:
      failed = "timeout"
    time.sleep(0.2)
  failed = failed or next((n for n, p in procs.items() if p.returncode != 0), None)
  if failed is not None:
    for p in procs.values():
      if p.poll() is None:
        p.kill()
    report = {n: (p.wait(), pathlib.Path(p.log).read_text()[-4000:])
              for n, p in procs.items()}
    raise AssertionError(f"{failed} failed; exit codes and stderr tails: {report}")


def test_two_processes_match_one(tmp_path):
  single, multi = tmp_path / "single", tmp_path / "multi"
  address = f"127.0.0.1:{_free_port()}"

  def start(name, cmd, num_devices):
    log = open(tmp_path / f"{name}.log", "w")  # Files, not pipes: the logs are long.
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(num_devices), stdout=subprocess.DEVNULL,
                            stderr=log, text=True)
    proc.log = log.name
    return proc

  workers = [start(f"process_{i}", _cmd(multi, f"--coordinator_address={address}",
                                         "--num_processes=2", f"--process_id={i}"), 2)
             for i in range(2)]
  reference = start("single", _cmd(single), 4)
  _wait_all({"process 0": workers[0], "process 1": workers[1], "single process": reference})

  steps = lambda w: sorted(int(p.name) for p in (w / "checkpoints").iterdir())
  assert steps(multi) == steps(single) == [2, 4]
  # Each process wrote its own shards of the FSDP-sharded state.
  assert {p.name for p in (multi / "checkpoints" / "4" / "state").glob("ocdbt.process_*")} == {
      "ocdbt.process_0", "ocdbt.process_1"}

  worst = 0.0
  for step in (2, TOTAL_STEPS):
    state_m, meta_m = checkpointing.load_on_host(str(multi), step)
    state_s, meta_s = checkpointing.load_on_host(str(single), step)
    assert meta_m["step"] == meta_s["step"] == step
    assert meta_m["data_position"] == meta_s["data_position"]
    flat_m = jax.tree_util.tree_flatten_with_path(state_m)[0]
    flat_s = jax.tree_util.tree_flatten_with_path(state_s)[0]
    assert [p for p, _ in flat_m] == [p for p, _ in flat_s]
    for (path, m), (_, s) in zip(flat_m, flat_s):
      name = f"step {step} {jax.tree_util.keystr(path)}"
      assert m.dtype == s.dtype and m.shape == s.shape, name
      if np.issubdtype(m.dtype, np.floating):
        np.testing.assert_allclose(m, s, rtol=RTOL, atol=ATOL, err_msg=name)
        worst = max(worst, float(np.max(np.abs(m - s) / (ATOL + RTOL * np.abs(s)), initial=0)))
      else:
        np.testing.assert_array_equal(m, s, err_msg=name)
  print(f"\nmulti vs single process: worst |diff| / (atol + rtol |ref|) = {worst:.3g}")
  # The runs trained: from step 2 to step 4 every parameter tensor moved by far more than the
  # tolerance above (so the equality is not that of two untouched initialisations).
  before = jax.tree.leaves(checkpointing.load_on_host(str(multi), 2)[0]["params"])
  after = jax.tree.leaves(state_m["params"])
  assert len(after) > 10
  for a, b in zip(before, after):
    assert np.max(np.abs(b - a)) > 100 * (ATOL + RTOL * np.max(np.abs(a)))
