"""A damaged checkpoint is set aside and the previous one resumed; one run per workdir; a full
disk ends the run with the real error.

In-process (toy state, fast): each damage (truncated array file, deleted `_METADATA`, truncated
meta JSON, flipped bytes, one flipped bit) makes `restore_or_init` fall back to the previous
step bit for bit and keep the damaged step in `<workdir>/corrupt/`; with fallback off it is one
UserError and nothing moves; a transient read error is retried, a bug is raised; the checksums
themselves; the workdir lock's lease (fake clock); the resume check; the non-finite guard's
message.

End to end (`python -m dit_jax.main` on configs/testing.py, subprocesses): a straight run 0 -> 6
(checkpoints 2, 4, 6) is the reference.
  * damaged: steps 6 (one flipped bit) and 4 (no `_METADATA`) damaged -> resumes at 2, trains to
    6, bit-identical to the straight run; with fallback off: exit code 2, one line.
  * two processes (jax.distributed, FSDP over both): a damage that only process 1 sees (its
    reads fail, simulated) makes both processes fall back together.
  * lock: a second run exits at once naming the first (host, PID); after kill -9 of the first
    and its lease (3 s), a new run takes over and ends bit-identical to the straight run.
  * disk full (a 1.2 MB tmpfs; skipped where mounting is not permitted): the async save of step 4
    fails; the last line of stderr is the real error, the only lines beyond the run's log are
    one per cause; step 2 is intact. The noise it used to print is reproduced in-process
    (tensorstore writes abandoned on a closed event loop, one error logged by several threads).
"""
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax import checkpointing
from dit_jax import integrity
from dit_jax import shutdown
from dit_jax import workdir_lock
from dit_jax.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]
TOTAL_STEPS = 6
OVERRIDES = [
    f"--config.total_steps={TOTAL_STEPS}",
    "--config.checkpoint.save_every_steps=2",
    "--config.checkpoint.max_to_keep=10",
    "--config.logging.sample_every_steps=0",
    "--config.sample.final_num_samples_per_class=0",
]


# ---------------------------------------------------------------------------- damage helpers


def _largest_array_file(step_dir: pathlib.Path, process: int = 0) -> pathlib.Path:
  files = list((step_dir / "state" / f"ocdbt.process_{process}" / "d").iterdir())
  return max(files, key=lambda p: p.stat().st_size)


def _truncate(step_dir):
  f = _largest_array_file(step_dir)
  f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])


def _delete_metadata(step_dir):
  (step_dir / "state" / "_METADATA").unlink()


def _truncate_meta(step_dir):
  f = step_dir / "meta" / "metadata"
  f.write_text(f.read_text()[:40])


def _flip_bytes(step_dir):
  f = _largest_array_file(step_dir)
  data = bytearray(f.read_bytes())
  for i in range(len(data) // 2, len(data) // 2 + 16):
    data[i] ^= 0xFF
  f.write_bytes(bytes(data))


def _flip_bit(step_dir):
  f = _largest_array_file(step_dir)
  data = bytearray(f.read_bytes())
  data[len(data) // 2] ^= 0x10
  f.write_bytes(bytes(data))


DAMAGES = {"truncated array file": _truncate, "deleted _METADATA": _delete_metadata,
           "truncated meta JSON": _truncate_meta, "flipped bytes": _flip_bytes,
           "one flipped bit": _flip_bit}


# ------------------------------------------------------------------------------- in-process


def _toy(step):
  rng = np.random.default_rng(step)
  # Large enough that the array data lands in its own (compressed) file.
  return {"w": jnp.asarray(rng.standard_normal((128, 96)), jnp.float32),
          "b": jnp.asarray(rng.standard_normal((96,)), jnp.bfloat16),
          "step": jnp.asarray(step, jnp.int32)}


def _section(**kw):
  return dict(save_every_steps=1, max_to_keep=5, keep_every_steps=0, async_save=False, **kw)


class _Config(dict):
  """A minimal config: the checkpoint section (fallback) and nothing to compare."""

  def __init__(self, fallback=True):
    super().__init__(checkpoint=_section(fallback=fallback))
    self.checkpoint = self["checkpoint"]


@pytest.fixture(scope="module")
def toy_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("toy")
  manager = checkpointing.create_manager(str(workdir), _section())
  for step in (1, 2):
    assert checkpointing.save(manager, step, _toy(step),
                              {"step": step, "data_position": step, "config": "{}"})
  checkpointing.wait(manager)
  manager.close()
  return workdir


def _restore(workdir, fallback=True):
  manager = checkpointing.create_manager(str(workdir), _section())
  abstract = jax.eval_shape(lambda: _toy(0))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return manager, checkpointing.restore_or_init(
      manager, abstract, jax.tree.map(lambda _: device, abstract),
      lambda: pytest.fail("initialised instead of falling back"), _Config(fallback))


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_latest_step_falls_back_to_the_previous(tmp_path, toy_workdir, damage):
  workdir = tmp_path / "w"
  shutil.copytree(toy_workdir, workdir)
  DAMAGES[damage](workdir / "checkpoints" / "2")

  with pytest.raises(UserError, match=r"checkpoint step 2 .* is damaged: .*fallback=False"):
    _restore(workdir, fallback=False)
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2"]

  manager, (state, meta) = _restore(workdir)
  assert meta["step"] == 1
  for key, value in _toy(1).items():
    assert state[key].dtype == value.dtype
    np.testing.assert_array_equal(np.asarray(state[key]), np.asarray(value))
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1"]
  assert (workdir / "corrupt" / "2" / "state").is_dir()  # Kept aside, never deleted.
  assert checkpointing.latest_step(manager) == 1


def test_transient_errors_are_retried_and_bugs_raised(tmp_path, toy_workdir, monkeypatch):
  workdir = tmp_path / "w"
  shutil.copytree(toy_workdir, workdir)
  read_state = checkpointing._read_state  # pylint: disable=protected-access
  calls = []

  def flaky(*args):
    calls.append(1)
    if len(calls) == 1:
      raise ValueError("UNAVAILABLE: simulated storage timeout")
    return read_state(*args)

  monkeypatch.setattr(checkpointing, "_read_state", flaky)
  monkeypatch.setattr(checkpointing.time, "sleep", lambda s: None)
  _, (state, meta) = _restore(workdir)
  assert meta["step"] == 2 and len(calls) == 2
  assert not (workdir / "corrupt").exists()

  def bug(*args):
    raise TypeError("a genuine bug")

  monkeypatch.setattr(checkpointing, "_read_state", bug)
  with pytest.raises(TypeError, match="genuine bug"):
    _restore(workdir)
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2"]


def test_checksums_are_mesh_independent_and_see_one_bit():
  x = np.random.default_rng(0).standard_normal((64, 24)).astype(np.float32)
  tree = {"a": jnp.asarray(x), "b": jnp.asarray(x, jnp.bfloat16), "n": jnp.int32(7),
          "k": jax.random.key(3), "m": jnp.asarray(x > 0), "u": jnp.asarray(x * 9, jnp.int8)}
  mesh = jax.make_mesh((2, 4), ("x", "y"))
  P = jax.sharding.PartitionSpec
  specs = {"a": P(("x", "y")), "b": P(None, "y"), "n": P(), "k": P(), "m": P("y"),
           "u": P("x", "y")}  # b, m: replicated over x; n, k: over every device.
  sharded = jax.device_put(tree, {k: jax.sharding.NamedSharding(mesh, v)
                                  for k, v in specs.items()})
  summary = integrity.summarize(tree)
  for where in ("device", "host"):  # XLA's reduction, or numpy's over each host's shards.
    assert integrity.summarize(tree, where) == summary
    assert integrity.summarize(sharded, where) == summary
  assert summary["leaves"][0] == ["['a']", int(x.view(np.uint32).astype(np.uint64).sum() % 2**32)]
  assert summary["leaves"][3] == ["['m']", int((x > 0).sum())]
  flipped = x.copy()
  flipped.view(np.uint32)[5, 3] ^= 1 << 31
  assert integrity.mismatches(summary, integrity.summarize(dict(tree, a=jnp.asarray(flipped)))) \
      == ["['a']"]
  assert integrity.summarize(dict(tree, a=tree["a"].at[0, 0].set(jnp.inf)))["nonfinite"] == [
      "['a']"]


def test_lock_lease(tmp_path):
  now = [1000.0]
  clock = lambda: now[0]  # noqa: E731
  first = workdir_lock.acquire(tmp_path, 10.0, settle_secs=0, clock=clock)
  try:
    with pytest.raises(workdir_lock.WorkdirLocked,
                       match=rf"in use by another training run \(host '.*', PID {os.getpid()}, "
                             r"started .* UTC, last heartbeat 0s ago \(lease 10s\)\)"):
      workdir_lock.acquire(tmp_path, 10.0, settle_secs=0, clock=clock)
  finally:
    first._stop.set()  # A dead run: no more heartbeats.  pylint: disable=protected-access
  now[0] += 11.0
  second = workdir_lock.acquire(tmp_path, 10.0, settle_secs=0, clock=clock)
  first.check()  # The first run only notices at its next heartbeat...
  first.lost = "taken over"
  with pytest.raises(workdir_lock.WorkdirLocked, match="lost its workdir lock"):
    first.check()
  first.release()  # ...and never removes a lock it no longer holds.
  assert workdir_lock._read(tmp_path / workdir_lock.LOCK_FILE)["token"] == \
      second.record["token"]  # pylint: disable=protected-access
  second.release()
  assert not (tmp_path / workdir_lock.LOCK_FILE).exists()


def test_resume_check_resolves_the_variant_and_checks_the_seed():
  saved = {"seed": 0, "model": {"variant": "XL/2", "mlp_ratio": None, "depth": None},
           "diffusion": {}}
  same = {"seed": 0, "model": {"variant": "DiT-XL/2", "mlp_ratio": 4.0, "depth": 28},
          "diffusion": {}}
  assert checkpointing.config_mismatches(saved, same) == []
  changed = dict(same, seed=1, model=dict(same["model"], mlp_ratio=2.0))
  diffs = checkpointing.config_mismatches(saved, changed)
  assert diffs[0] == "model.mlp_ratio: checkpoint 4.0 != config 2.0"
  assert diffs[1].startswith("seed: checkpoint 0 != config 1")
  allowed = dict(changed, model=same["model"], checkpoint={"allow_seed_change": True})
  assert checkpointing.config_mismatches(saved, allowed) == []


# ------------------------------------------------------------------------------ end to end

_WRAPPER = textwrap.dedent("""
    # Runs dit_jax.main; with HOLD_AFTER=<step>, after that step's save is on disk prints
    # HOLDING and sleeps (a live run holding the workdir, to be killed with SIGKILL).
    # FAIL_READ_STEP: see below.
    import os, runpy, sys, time
    import orbax.checkpoint as ocp
    hold = int(os.environ.get("HOLD_AFTER", "-1"))
    _save = ocp.CheckpointManager.save
    def save(self, step, *args, **kwargs):
      started = _save(self, step, *args, **kwargs)
      if started and step == hold:
        self.wait_until_finished()
        print("HOLDING", flush=True)
        time.sleep(600)
      return started
    ocp.CheckpointManager.save = save
    # With FAIL_READ_STEP=<step>, this process (only) finds that step's arrays damaged.
    fail = int(os.environ.get("FAIL_READ_STEP", "-1"))
    from dit_jax import checkpointing
    _read_state = checkpointing._read_state
    def read_state(manager, step, target):
      if step == fail:
        raise ValueError(f"DATA_LOSS: simulated damage of step {step} seen by this process")
      return _read_state(manager, step, target)
    checkpointing._read_state = read_state
    sys.argv = ["dit_jax.main"] + sys.argv[1:]
    runpy.run_module("dit_jax.main", run_name="__main__", alter_sys=True)
""")


def _cmd(workdir, *extra):
  return [sys.executable, "-c", _WRAPPER, f"--config={REPO / 'configs' / 'testing.py'}",
          f"--workdir={workdir}", *OVERRIDES, *extra]


def _run(workdir, *extra, expect=0, env=None):
  proc = subprocess.run(_cmd(workdir, *extra), cwd=REPO, env=env or dict(os.environ),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == expect, proc.stderr[-5000:]
  return proc


def _last_line(stderr: str) -> str:
  return stderr.strip().splitlines()[-1]


def _assert_same_checkpoint(workdir_a, workdir_b, step):
  state_a, meta_a = checkpointing.load_on_host(str(workdir_a), step)
  state_b, meta_b = checkpointing.load_on_host(str(workdir_b), step)
  assert meta_a["data_position"] == meta_b["data_position"]
  assert meta_a[checkpointing.INTEGRITY] == meta_b[checkpointing.INTEGRITY]
  for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
    assert a.dtype == b.dtype and np.array_equal(a, b)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight") / "run"
  _run(workdir)
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [2, 4, 6]
  return workdir


def test_damaged_checkpoints_resume_bit_identically(tmp_path, straight):
  workdir = tmp_path / "run"
  shutil.copytree(straight, workdir)
  ckpts = workdir / "checkpoints"
  _flip_bit(ckpts / "6")  # Loads silently without checksums.
  _delete_metadata(ckpts / "4")

  off = _run(workdir, "--config.checkpoint.fallback=False", expect=2)
  assert _last_line(off.stderr).startswith(
      f"python -m dit_jax.main: error: checkpoint step 6 ({ckpts / '6'}) is damaged: ")
  assert "checksum mismatch" in _last_line(off.stderr) and "Traceback" not in off.stderr
  assert not (workdir / "corrupt").exists()

  proc = _run(workdir)
  assert "Checkpoint step 6 is damaged (checkpoint step 6" in proc.stderr
  assert "Checkpoint step 4 is damaged (array metadata" in proc.stderr
  assert "Resuming from checkpoint step 2" in proc.stderr
  assert sorted(p.name for p in (workdir / "corrupt").iterdir()) == ["4", "6"]
  _assert_same_checkpoint(straight, workdir, TOTAL_STEPS)


def test_second_run_refused_and_dead_run_taken_over(tmp_path, straight):
  workdir = tmp_path / "run"
  lease = "--config.checkpoint.lock_lease_secs=3"
  env = dict(os.environ, HOLD_AFTER="2")
  first = subprocess.Popen(_cmd(workdir, lease), cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
  try:
    assert first.stdout.readline().strip() == "HOLDING"
    second = _run(workdir, lease, expect=2)
    last = _last_line(second.stderr)
    assert "is in use by another training run" in last and f"PID {first.pid}," in last, last
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  time.sleep(3.5)  # The dead run's lease expires.
  third = _run(workdir, lease)
  assert "Taking over the expired workdir lock of a dead run" in third.stderr
  assert "Resumed at step 2" in third.stderr
  assert not (workdir / workdir_lock.LOCK_FILE).exists()
  _assert_same_checkpoint(straight, workdir, TOTAL_STEPS)


@pytest.fixture
def small_tmpfs(tmp_path):
  mount = tmp_path / "tmpfs"
  mount.mkdir()
  ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mount)],
                      capture_output=True).returncode == 0
  if not ok:
    pytest.skip("mounting a tmpfs is not permitted here")
  try:
    yield mount
  finally:
    subprocess.run(["umount", str(mount)], check=False)


def test_disk_full_ends_with_the_real_error(small_tmpfs, straight):
  workdir = small_tmpfs / "run"
  proc = _run(workdir, "--config.checkpoint.async_save=True", expect=1)
  last = _last_line(proc.stderr)
  assert last.startswith(f"python -m dit_jax.main: error: saving checkpoint step 4 to "
                         f"{workdir / 'checkpoints' / '4'} failed; earlier checkpoints are "
                         "intact."), last
  assert "No space left on device" in last or "RESOURCE_EXHAUSTED" in last, last
  # Short: beyond the run's INFO/WARNING log, at most one line per cause (a full disk shows
  # as an errno and as a tensorstore status) and the last line; no tracebacks, no closed
  # event loops (without shutdown.install, 0 to 400+ lines depending on timing).
  extra = [line for line in proc.stderr.strip().splitlines()
           if not re.match(r"[IW]\d{4} \d\d:\d\d:\d\d\.\d+ ", line)]
  assert len(extra) <= 3 and extra[-1] == last, "\n".join(extra)
  assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr
  _assert_same_checkpoint(straight, workdir, 2)


def test_abandoned_writes_and_repeated_library_errors_are_one_line_per_cause(monkeypatch):
  """The noise of a failed save, reproduced deterministically in-process: Orbax's gather of
  tensorstore writes whose first write fails (a closed loop for the others), and the same
  exception logged by several Orbax threads."""
  import asyncio  # pylint: disable=import-outside-toplevel
  import logging as std_logging  # pylint: disable=import-outside-toplevel
  import tensorstore as tensorstore_lib  # pylint: disable=import-outside-toplevel

  def failed_save():
    futures = []

    async def writes():
      store = await tensorstore_lib.open(
          {"driver": "zarr", "kvstore": {"driver": "memory"}}, create=True,
          dtype=tensorstore_lib.float32, shape=[4000, 4000])
      futures.extend(store[i * 400:(i + 1) * 400].write(np.ones((400, 4000), np.float32))
                     for i in range(10))

      async def first_write_fails():
        raise OSError(28, "No space left on device")

      await asyncio.gather(first_write_fails(), *[_await(f) for f in futures])

    async def _await(future):
      await future

    loop = asyncio.new_event_loop()
    with pytest.raises(OSError):
      loop.run_until_complete(writes())
    loop.close()
    for future in futures:  # The other writes complete, on the closed loop.
      future.result()
    time.sleep(0.5)  # Their callbacks follow (within this test, not a later one).

  raw = []
  monkeypatch.setattr(sys, "unraisablehook", raw.append)
  failed_save()
  assert raw and all(shutdown.is_abandoned_io(u) for u in raw), raw
  passed = []
  monkeypatch.setattr(sys, "unraisablehook", shutdown.route_unraisable(passed.append))
  failed_save()
  try:
    raise RuntimeError("Event loop is closed")  # Not from an abandoned write: passed on.
  except RuntimeError as e:
    other = type(raw[0])((type(e), e, e.__traceback__, None, None))
  sys.unraisablehook(other)
  assert passed == [other]
  # A failed restore: Orbax's read coroutines, abandoned mid-await, are finalised later.
  namespace = {}
  exec(compile("async def read(): pass", "/venv/site-packages/orbax/checkpoint/_src/s.py",
               "exec"), namespace)
  coroutine = namespace["read"]()
  try:
    assert shutdown.is_abandoned_io(type(raw[0])((Exception, Exception("reading"), None,
                                                      None, coroutine)))
  finally:
    coroutine.close()

  log_filter = shutdown.LibraryLogFilter()

  def record(path, level, exc=None, name="absl"):
    return std_logging.LogRecord(name, level, path, 1, "thread %s failed", ("t",),
                                 (type(exc), exc, None) if exc else None)

  orbax = "/venv/site-packages/orbax/checkpoint/_src/futures/future.py"
  full = lambda where: ValueError(f"RESOURCE_EXHAUSTED: Error writing {where}")  # noqa: E731
  first = record(orbax, std_logging.ERROR, full("a/0"))
  assert log_filter.filter(first) and first.exc_info is None
  assert first.getMessage() == "thread t failed: RESOURCE_EXHAUSTED: Error writing a/0"
  assert not log_filter.filter(record(orbax, std_logging.ERROR, full("b/0")))  # Same cause.
  assert log_filter.filter(record(orbax, std_logging.ERROR, OSError(28, "No space left")))
  assert not log_filter.filter(record(orbax, std_logging.INFO))
  assert log_filter.filter(record(orbax, std_logging.WARNING))
  assert not log_filter.filter(record("/x/asyncio/base_events.py", std_logging.ERROR,
                                      OSError(28, "No space left"), name="asyncio"))
  ours = record("/repo/dit_jax/train.py", std_logging.ERROR, full("a/0"))
  assert log_filter.filter(ours) and ours.exc_info is not None  # Our own records: untouched.


def test_two_processes_fall_back_together(tmp_path):
  import test_multihost as mh  # pylint: disable=import-outside-toplevel  (its set-up)
  workdir = tmp_path / "multi"
  extra = ["--config.total_steps=4", "--config.mesh.data=1", "--config.mesh.fsdp=4"]

  def run_both(name, fail_on_process_1=None):
    address = f"127.0.0.1:{mh._free_port()}"  # pylint: disable=protected-access
    procs = {}
    for i in range(2):
      env = mh._env(2)  # pylint: disable=protected-access
      if i == 1 and fail_on_process_1 is not None:
        env["FAIL_READ_STEP"] = str(fail_on_process_1)
      log = open(tmp_path / f"{name}_{i}.log", "w")
      procs[f"process {i}"] = p = subprocess.Popen(
          _cmd(workdir, *extra, f"--coordinator_address={address}", "--num_processes=2",
               f"--process_id={i}"),
          cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
      p.log = log.name
    mh._wait_all(procs)  # pylint: disable=protected-access
    return [pathlib.Path(p.log).read_text() for p in procs.values()]

  run_both("first")
  before, _ = checkpointing.load_on_host(str(workdir), 4)
  # Step 4 is intact, but process 1 reads it as damaged (as a torn read of its own shards
  # would be): both processes must still decide together.
  logs = run_both("second", fail_on_process_1=4)
  assert "Checkpoint step 4 is damaged (ValueError: DATA_LOSS: simulated damage" in logs[1]
  assert "Checkpoint step 4 is damaged (damaged as read by another process)" in logs[0]
  for log in logs:
    assert "Resumed at step 2" in log
  assert sorted(p.name for p in (workdir / "corrupt").iterdir()) == ["4"]
  after, _ = checkpointing.load_on_host(str(workdir), 4)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    assert np.array_equal(a, b)


def test_non_finite_guard_names_the_checkpoint_and_advises_only_what_applies(tmp_path,
                                                                             toy_workdir):
  from dit_jax import train  # pylint: disable=import-outside-toplevel
  manager = checkpointing.create_manager(str(toy_workdir), _section())
  metrics = {"train/loss": float("nan"), "train/grad_norm": 1.0}
  with pytest.raises(FloatingPointError) as err:
    train._check_finite(3, metrics, toy_workdir, manager,  # pylint: disable=protected-access
                        dict(warmup_steps=0, grad_clip_norm=0.0))
  assert str(err.value) == (
      "Non-finite training metrics at step 3: {'train/loss': nan}. Stopping without saving; a "
      f"rerun resumes from the latest checkpoint, step 2 ({toy_workdir / 'checkpoints' / '2'}), "
      "finite when saved. If it recurs after resuming: lower config.optimizer.learning_rate, "
      "set config.optimizer.warmup_steps, set config.optimizer.grad_clip_norm.")
  with pytest.raises(FloatingPointError, match=r"resuming: lower config\.optimizer\."
                                               r"learning_rate\.$"):
    train._check_finite(3, metrics, toy_workdir, manager,  # pylint: disable=protected-access
                        dict(warmup_steps=10, grad_clip_norm=1.0))
  empty = checkpointing.create_manager(str(tmp_path), _section())
  with pytest.raises(FloatingPointError, match="no checkpoint was saved yet"):
    train._check_finite(3, metrics, tmp_path, empty)  # pylint: disable=protected-access


@pytest.mark.parametrize("command, argv, message", [
    ("dit_jax.bench", ["--config=configs/nope.py"],
     "--config=configs/nope.py: cannot load it ([Errno 2] No such file"),
    ("dit_jax.convert", ["import", "--variant", "DiT-Q/3", "a.pt", "b.msgpack"],
     "cannot build the model from {'variant': 'DiT-Q/3'}: unknown DiT variant 'DiT-Q/3'"),
])
def test_bad_inputs_that_printed_tracebacks_are_one_line(command, argv, message, capsys,
                                                          monkeypatch):
  import importlib  # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(REPO)
  main = importlib.import_module(command if command != "dit_jax.convert" else
                                 "dit_jax.convert.__main__").main
  assert main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"python -m {command}: error: {message}"), err


@pytest.mark.parametrize("command, flag", [("dit_jax.bench", "--steps"),
                                           ("dit_jax.prepare", "--splits")])
def test_help_prints_the_flags(command, flag, capsys):
  import importlib  # pylint: disable=import-outside-toplevel
  assert importlib.import_module(command).main(["--help"]) == 0  # Was "Unknown flag 'help'".
  out = capsys.readouterr().out
  assert out.startswith(f"{importlib.import_module(command).__doc__.splitlines()[0]}") and flag in out
