"""gs:// end to end against a local GCS emulator: training, preemption, fallback, lock, data.

One emulator (tests/gcs_emulator.py; 127.0.0.1 only) serves one bucket for the whole module;
its environment variables point every client of this process and of the training subprocesses
at it: google-cloud-storage (tensorboardX's events), gcsfs (etils.epath: grids, samples,
configs, Orbax's directories, the workdir lock) and tensorstore (Orbax's arrays).

One shared chain of runs of configs/testing.py to 6 steps with `--workdir=gs://dit-jax-test/run`
(the `chain` fixture; checkpoints every 2 steps, async, the last 3 kept) feeds several tests:

  A: 0 -> 6 uninterrupted, a sample grid every 4 steps and the final samples: events,
     grid_0000004.png, samples.npz, samples_grid.png, checkpoints 2, 4 and 6; the workdir lock
     is gone at the end. Its steps 4 and 6 are copied to gs://.../reference (the uninterrupted
     run's states), then damaged in the run: 6 has bytes flipped in its largest array file, 4
     a truncated meta JSON.
  B: `python -m dit_jax.main`, a SIGTERM at step 4 (sent from inside the run, so it always lands
     mid-run): steps 6 and 4 are found damaged and moved to gs://.../run/corrupt/, step 2
     resumed; the run stops at the next step boundary (5), saves step 5 (not a cadence step)
     and exits 0.
  C: resumes at 5 and trains to 6.
B's step 4 and C's step 6 are bit-identical to A's: resuming from a fallback step and from the
SIGTERM's step is exact. A and C run in this process (train_and_evaluate), B as a command; all
share one persistent compilation cache, so only A compiles. B and C draw no samples (sampling
never touches the training state).

In-process, on the same emulator: the workdir lock (a second run refused naming the holder, a
dead run's short lease taken over, the heartbeat rewriting the lease) and configs/image_folder.py
training from an image folder in the bucket. Also: a gs:// path without the `gcs` extra is
refused in one line naming the extra, and grid classes outside the model's classes in one line.
"""
import gc
import io
import logging
import os
import pathlib
import subprocess
import time
import warnings

import jax
import numpy as np
from PIL import Image
import pytest

from dit_jax import checkpointing
from dit_jax import errors
from dit_jax import gcs
from dit_jax import sampling
from dit_jax import train
from dit_jax import workdir_lock

from conftest import load_config  # pylint: disable=g-bad-import-order
import gcs_emulator  # pylint: disable=g-bad-import-order
from test_preemption import main_cmd, stopped_at  # pylint: disable=g-bad-import-order
from test_resume import assert_checkpoints_equal, subprocess_env  # pylint: disable=g-bad-import-order

REPO = pathlib.Path(__file__).resolve().parents[1]
BUCKET = "dit-jax-test"
RUN = f"gs://{BUCKET}/run"
CHAIN = ["--config.checkpoint.async_save=true",  # Else configs/testing.py's defaults.
         "--config.checkpoint.max_to_keep=3"]
NO_SAMPLES = ["--config.logging.sample_every_steps=0",
              "--config.sample.final_num_samples_per_class=0"]


def _clear_gcsfs_instances():
  import gcsfs  # pylint: disable=g-import-not-at-top
  gcsfs.GCSFileSystem.clear_instance_cache()  # Clients built for another endpoint.


@pytest.fixture(scope="module")
def emulator():
  """The emulator's environment, set in this process for the module's duration."""
  with gcs_emulator.running(BUCKET) as env, pytest.MonkeyPatch.context() as patch:
    for name, value in env.items():
      patch.setenv(name, value)
    _clear_gcsfs_instances()
    yield env
    _clear_gcsfs_instances()
  # The in-process runs' tensorboardX gs:// event writers, closed, stay referenced by their
  # atexit hook and upload their file once more when collected at exit, with the emulator gone
  # (each retrying for 120 s): they have written everything.
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings():  # isinstance on some objects warns (torch deprecations).
    warnings.simplefilter("ignore")
    for obj in gc.get_objects():
      if isinstance(obj, record_writer.GCSRecordWriter):
        obj.flush = lambda: None


def _bucket():
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  return storage.Client(project=os.environ["GOOGLE_CLOUD_PROJECT"]).bucket(BUCKET)


def _names(prefix):
  """Object names under `prefix/`, relative to it (google-cloud-storage: no listing cache)."""
  return {b.name[len(prefix) + 1:] for b in _bucket().list_blobs(prefix=prefix + "/")}


def _flip_bytes_of_largest_array_file(step_prefix):
  blobs = list(_bucket().list_blobs(prefix=f"{step_prefix}/state/ocdbt.process_0/d/"))
  blob = max(blobs, key=lambda b: b.size)
  data = bytearray(blob.download_as_bytes())
  for i in range(len(data) // 2, len(data) // 2 + 16):
    data[i] ^= 0xFF
  blob.upload_from_string(bytes(data))


def _truncate_meta(step_prefix):
  blob = _bucket().blob(f"{step_prefix}/meta/metadata")
  blob.upload_from_string(blob.download_as_bytes()[:40])


def _copy(prefix, new_prefix):
  bucket = _bucket()
  for blob in bucket.list_blobs(prefix=prefix + "/"):
    bucket.copy_blob(blob, bucket, new_prefix + blob.name[len(prefix):])


def _chain_config(samples):
  """configs/testing.py as B's command line sets it (CHAIN, to 6 steps); `samples`: the
  config's grid every 4 steps and final samples, else none (NO_SAMPLES)."""
  config = load_config("testing")
  config.total_steps = 6
  config.checkpoint.async_save = True
  config.checkpoint.max_to_keep = 3
  if not samples:
    config.logging.sample_every_steps = 0
    config.sample.final_num_samples_per_class = 0
  return config


class _LogLines(logging.Handler):
  """The messages absl logs in this process (an in-process run's log) while installed."""

  def __init__(self):
    super().__init__(logging.INFO)
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())

  def __enter__(self):
    self._logger = logging.getLogger("absl")
    self._level = self._logger.level
    self._logger.setLevel(logging.INFO)
    self._logger.addHandler(self)
    return self

  def __exit__(self, *exc):
    self._logger.removeHandler(self)
    self._logger.setLevel(self._level)


@pytest.fixture(scope="module")
def chain(emulator):
  """Runs A, B and C (see the module docstring); returns what each left behind.

  A and C run in this process, B (the SIGTERM) as `python -m dit_jax.main`; all three share
  this process's persistent compilation cache, so only A compiles.
  """
  del emulator
  cache_dir = jax.config.jax_compilation_cache_dir
  assert cache_dir, "conftest sets a persistent compilation cache"
  min_secs = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # Cache every compile.
  try:
    with _LogLines() as log:
      train.train_and_evaluate(_chain_config(samples=True), RUN)
    a = {"log": log.lines, "names": _names("run")}
    for step in (4, 6):
      _copy(f"run/checkpoints/{step}", f"reference/checkpoints/{step}")
    _flip_bytes_of_largest_array_file("run/checkpoints/6")
    _truncate_meta("run/checkpoints/4")
    proc = subprocess.run(
        main_cmd(4, f"--config={REPO / 'configs' / 'testing.py'}", f"--workdir={RUN}",
                 "--config.total_steps=6", *CHAIN, *NO_SAMPLES),
        cwd=REPO, env=subprocess_env(cache_dir), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    b = {"stdout": proc.stdout, "stderr": proc.stderr, "names": _names("run")}
    with _LogLines() as log:
      train.train_and_evaluate(_chain_config(samples=False), RUN)
    c = {"log": log.lines, "names": _names("run")}
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_secs)
  return {"A": a, "B": b, "C": c}


def _steps(names):
  """The finalized checkpoint steps among a run's object names."""
  return {int(n.split("/")[1]) for n in names
          if n.startswith("checkpoints/") and n.endswith("/commit_success.txt")}


def test_testing_config_trains_on_gs_with_events_grids_samples_and_checkpoints(chain):
  names = chain["A"]["names"]
  assert any(n.startswith("events.out.tfevents.") for n in names), names
  assert {"grid_0000004.png", "samples.npz", "samples_grid.png"} <= names, names
  assert _steps(names) == {2, 4, 6}
  assert workdir_lock.LOCK_FILE not in names  # Released at the end.
  with np.load(io.BytesIO(_bucket().blob("run/samples.npz").download_as_bytes())) as z:
    assert z["arr_0"].shape == (10, 8, 8, 1) and z["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(z["arr_1"], np.arange(10))


def test_damaged_steps_on_gs_are_moved_aside_and_the_previous_resumed(chain):
  stderr, names = chain["B"]["stderr"], chain["B"]["names"]
  assert "Checkpoint step 6 is damaged" in stderr, stderr[-3000:]
  assert "Checkpoint step 4 is damaged (meta file gs://dit-jax-test/run/checkpoints/4/meta/metadata is not valid JSON" in stderr, stderr[-3000:]
  assert "Resumed at step 2" in stderr
  corrupt = {n for n in names if n.startswith("corrupt/")}
  for step in (4, 6):  # Moved whole, never deleted.
    assert {f"corrupt/{step}/state/_METADATA", f"corrupt/{step}/meta/metadata"} <= corrupt, corrupt
    assert any(n.startswith(f"corrupt/{step}/state/ocdbt.process_0/d/") for n in corrupt)
  assert not any(n.startswith(("checkpoints/6/", "checkpoints/6.")) for n in names)
  assert_checkpoints_equal(f"gs://{BUCKET}/reference", RUN, 4)  # Re-trained exactly from 2.


def test_sigterm_on_gs_saves_the_current_step_and_exits_0(chain):
  b = chain["B"]
  assert "SIGTERM at step 4" in b["stdout"]
  assert stopped_at(b["stderr"]) == 5 and "(SIGTERM)" in b["stderr"]  # The next boundary.
  assert _steps(b["names"]) == {2, 4, 5}  # 5: not a cadence step (every 2).
  assert workdir_lock.LOCK_FILE not in b["names"]


def test_resumed_run_on_gs_is_bit_identical_to_an_uninterrupted_one(chain):
  c = chain["C"]
  assert "Resumed at step 5; 49992 parameters." in c["log"], c["log"]
  assert _steps(c["names"]) == {4, 5, 6}
  assert_checkpoints_equal(f"gs://{BUCKET}/reference", RUN, 6)


def test_workdir_lock_on_gs(emulator):
  """The workdir lock (dit_jax/workdir_lock.py) through gcsfs: write-then-verify, refusal,
  takeover of a dead run's lease, heartbeats. Lease expiry runs on a fake clock (a real short
  lease would expire on a loaded machine between two calls)."""
  del emulator
  live = workdir_lock.acquire(f"gs://{BUCKET}/live", 0.4, settle_secs=0.05)
  try:
    started, deadline = live.record["heartbeat"], time.time() + 30
    # (None: read while being rewritten; the emulator, unlike GCS, can serve a partial object.)
    while (workdir_lock._read(live.path) or {"heartbeat": started})["heartbeat"] == started:  # pylint: disable=protected-access
      assert time.time() < deadline, "no heartbeat written to gs:// in 30 s"
      time.sleep(0.05)  # Rewritten every lease / 4 = 0.1 s.
    assert live.lost is None
  finally:
    live.release()
  assert workdir_lock.LOCK_FILE not in _names("live")

  workdir, now = f"gs://{BUCKET}/locked", [time.time()]
  clock = lambda: now[0]  # noqa: E731
  first = workdir_lock.acquire(workdir, 30.0, settle_secs=0.05, clock=clock)
  first._stop.set()  # pylint: disable=protected-access
  first._thread.join()  # A dead run: no more heartbeats.  pylint: disable=protected-access
  with pytest.raises(workdir_lock.WorkdirLocked,
                     match=rf"^{workdir} is in use by another training run \(host '.*', PID "
                           rf"{os.getpid()}, started .* UTC, last heartbeat 0s ago \(lease 30s\)"):
    workdir_lock.acquire(workdir, 30.0, settle_secs=0.05, clock=clock)
  now[0] += 31  # The dead run's lease expires...
  second = workdir_lock.acquire(workdir, 30.0, settle_secs=0.05, clock=clock)  # ...taken over.
  first.release()  # Never removes a lock it no longer holds.
  assert workdir_lock._read(second.path)["token"] == second.record["token"]  # pylint: disable=protected-access
  second._stop.set()  # pylint: disable=protected-access
  second.release()
  assert workdir_lock.LOCK_FILE not in _names("locked")


def _write_image_folder(prefix):
  """3 classes x 4 random RGB PNGs of 10x12 pixels, written to the emulator's bucket."""
  bucket = _bucket()
  rng = np.random.default_rng(0)
  for c in ("cat", "dog", "owl"):
    for i in range(4):
      buf = io.BytesIO()
      Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(buf, "PNG")
      bucket.blob(f"{prefix}/{c}/{i}.png").upload_from_string(buf.getvalue())


def test_image_folder_config_trains_from_a_folder_in_the_bucket(emulator, tmp_path):
  """configs/image_folder.py as its docstring runs it, shrunk (a 2-block model, 2 steps, no
  sampling), reading 3 classes of 10x12 RGB images from gs:// into 8x8 crops."""
  del emulator
  _write_image_folder("images")
  config = load_config("image_folder", arg=f"data_dir=gs://{BUCKET}/images,num_classes=3,"
                                           "image_size=8")
  assert (config.model.input_size, config.model.in_channels, config.model.num_classes,
          config.logging.grid_classes) == (8, 3, 3, (0, 1, 2))
  with config.unlocked():
    config.total_steps = 2
    config.global_batch_size = 16
    config.model.update(hidden_size=32, depth=2, num_heads=2, attention_impl="xla")
    config.data.num_workers = 2
    config.checkpoint.update(save_every_steps=2, async_save=False)
    config.logging.update(log_every_steps=1, sample_every_steps=0, progress_bar=False)
    config.sample.final_num_samples_per_class = 0
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 2
  tree, meta = checkpointing.load_on_host(str(tmp_path))
  assert meta["step"] == 2 and meta["data_position"] == 32
  assert tree["params"]["x_embedder"]["proj"]["kernel"].shape[2] == 3  # RGB patches.


def test_gs_path_without_the_gcs_extra_is_one_line(monkeypatch):
  gcs.check_paths({"--workdir": "/local/run", "config.data.data_dir": None})  # Nothing remote.
  monkeypatch.setattr(gcs, "GCS_MODULES", {"gcsfs": "gcsfs",
                                           "dit_jax_no_such_module.storage": "google-cloud-x"})
  with pytest.raises(errors.UserError) as e:
    gcs.check_paths({"--workdir": "/local/run", "config.data.data_dir": "gs://b/data"})
  assert str(e.value) == (
      "config.data.data_dir=gs://b/data: gs:// paths need the `gcs` extra, which is not "
      "installed (missing google-cloud-x): pip install -e '.[gcs]'")


def test_grid_classes_must_be_classes_of_the_model():
  np.testing.assert_array_equal(sampling.grid_labels((0, 2), 2, num_classes=3), [0, 0, 2, 2])
  with pytest.raises(errors.UserError, match=r"grid_classes has \[3, 4, 5, 6, 7, 8, 9\], not classes of "
                     r"config.model.num_classes=3 \(0..2\)"):
    sampling.grid_labels(tuple(range(10)), 1, num_classes=3)
