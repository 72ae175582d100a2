"""End-to-end: `python -m dit_jax.main` on configs/testing.py in a temporary workdir."""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from dit_jax import main
from dit_jax import metrics as metrics_lib
from dit_jax import sample_files
from dit_jax.errors import UserError

REPO = pathlib.Path(__file__).resolve().parent.parent


def event_tags(workdir) -> set[str]:
  """The summary tags in `workdir`'s event files, read back without TensorFlow."""
  from tensorboardX.proto import event_pb2
  tags = set()
  for path in pathlib.Path(workdir).glob("events.out.tfevents.*"):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      length = int.from_bytes(data[pos:pos + 8], "little")
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      tags.update(v.tag for v in event.summary.value)
  return tags


def test_a_failed_run_keeps_its_metrics(tmp_path, monkeypatch):
  """The writer training uses is closed when the run fails (its events flush every 30 s
  otherwise, and a failed save ends the process with os._exit), and an error while closing
  never replaces the error that ended the run."""
  with pytest.raises(RuntimeError, match="save failed"):
    with metrics_lib.MetricWriter(tmp_path / "a") as writer:
      writer.write_scalars(3, {"train/loss": 0.5})
      raise RuntimeError("save failed")
  assert event_tags(tmp_path / "a") == {"train/loss"}

  warnings = []
  monkeypatch.setattr(metrics_lib.logging, "warning", lambda *a: warnings.append(a[0] % a[1:]))
  with pytest.raises(RuntimeError, match="save failed"):
    with metrics_lib.MetricWriter(tmp_path / "b") as writer:
      monkeypatch.setattr(writer._writer, "close", lambda: (_ for _ in ()).throw(
          OSError(28, "No space left on device")))
      raise RuntimeError("save failed")
  assert warnings == ["Closing the TensorBoard writer failed: OSError: "
                      "[Errno 28] No space left on device"]


def run_main(*args, timeout=600):
  # The environment (8 simulated CPU devices, JAX_PLATFORMS=cpu) comes from conftest.
  return subprocess.run([sys.executable, "-m", "dit_jax.main", *args], cwd=REPO,
                        env=dict(os.environ), capture_output=True, text=True, timeout=timeout)


def test_main_smoke_run_writes_events_grid_samples_and_checkpoints(tmp_path):
  workdir = tmp_path / "run"
  # Also exercises the options that are off by default: a tuple override (guidance interval),
  # Min-SNR loss weighting, stratified power-law timesteps, the LayerNorm gradient barrier,
  # and a CPU split into 4 devices (instead of the environment's 8).
  proc = run_main("--config=configs/testing.py", f"--workdir={workdir}",
                  "--config.mesh.num_cpu_devices=4",
                  "--config.sample.final_num_samples_per_class=2",
                  "--config.sample.guidance_interval=(0,600)",
                  "--config.diffusion.min_snr_gamma=5", "--config.model.ln_grad_barrier=True",
                  "--config.diffusion.timestep_sampling=stratified",
                  "--config.diffusion.timestep_power=0.5")
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert "Mesh {'data': 4, 'fsdp': 1}" in proc.stderr
  assert list(workdir.glob("events.out.tfevents.*"))
  assert (workdir / "grid_0000004.png").exists()
  assert (workdir / "samples_grid.png").exists()
  with np.load(workdir / "samples.npz") as z:
    images, labels = z["arr_0"], z["arr_1"]
  assert images.shape == (20, 8, 8, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 2))
  meta = sample_files.read_meta(workdir / "samples.npz")
  assert (meta["step"], meta["num_samples"], meta["guidance_interval"]) == (4, 20, [0, 600])
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]

  tags = event_tags(workdir)
  assert {"train/loss", "train/mse", "train/vb", "train/grad_norm", "train/lr",
          "train/steps_per_sec", "train/images_per_sec", "samples/ema_grid"} <= tags


@pytest.mark.parametrize("case,args,message", [
    ("typo", ["--config=configs/testing.py", "--config.optimizer.learning_rat=0.1"],
     "--config.optimizer.learning_rat: the config has no field 'learning_rat'; did you mean "
     "'learning_rate'?"),
    ("no config file", ["--config=configs/nope.py"],
     "--config=configs/nope.py: no such file 'configs/nope.py'."),
    ("negative batch", ["--config=configs/testing.py", "--config.global_batch_size=-1"],
     "config.global_batch_size=-1 must be > 0."),
    ("integer dtype", ["--config=configs/testing.py", "--config.model.dtype=int8"],
     "config.model: dtype='int8' must be a floating dtype (e.g. 'float32', 'bfloat16')"),
])
def test_main_user_errors_are_one_line_and_exit_2(tmp_path, capsys, case, args, message):
  workdir = tmp_path / "run"
  # In-process (a subprocess per case costs a JAX import); the --debug test runs the real CLI.
  assert main.main([*args, f"--workdir={workdir}"]) == 2, case
  err = capsys.readouterr().err
  assert err.strip().splitlines()[-1] == f"python -m dit_jax.main: error: {message}"
  assert "Traceback" not in err
  assert not workdir.exists()  # Checked before the workdir is created.


def test_main_workdir_that_is_a_file_and_debug_shows_the_traceback(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("x")
  proc = run_main("--config=configs/testing.py", f"--workdir={afile}", "--debug", timeout=120)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      f"python -m dit_jax.main: error: --workdir={afile} is a file, not a directory.")
  assert "Traceback" in proc.stderr  # --debug


def test_distributed_flags():
  assert main.distributed_kwargs(None, None, None, None) is None
  assert main.distributed_kwargs("off", None, None, None) is None
  assert main.distributed_kwargs("auto", None, None, None) == {}
  assert main.distributed_kwargs(None, "127.0.0.1:1234", 2, 1) == {
      "coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1}
  with pytest.raises(UserError, match="contradicts"):
    main.distributed_kwargs("off", "127.0.0.1:1234", None, None)


def test_detected_cluster_from_the_launch_environments():
  assert main.detected_cluster({}) is None
  assert main.detected_cluster({"SLURM_NTASKS": "1"}) is None
  assert main.detected_cluster({"SLURM_NTASKS": "4"}) == "slurm"
  assert main.detected_cluster({"OMPI_COMM_WORLD_SIZE": "2"}) == "openmpi"
  assert main.detected_cluster({"TPU_WORKER_HOSTNAMES": "10.0.0.2"}) is None
  assert main.detected_cluster({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}) == "tpu"
  assert main.detected_cluster({"JAX_COORDINATOR_ADDRESS": "h:1234"}) == "JAX_COORDINATOR_ADDRESS"
  assert main.detected_cluster({"TPU_PROCESS_ADDRESSES": "a:1,b:1"}) == "tpu"
  assert main.detected_cluster({"MEGASCALE_NUM_SLICES": "2"}) == "tpu-multislice"
  assert main.detected_cluster({"MEGASCALE_NUM_SLICES": "1"}) is None
  # Off a TPU VM JAX's Cloud TPU detection queries nothing and finds no pod.
  assert main.cloud_tpu_pod() is None


def test_digits_demo_smoke_run_and_its_measurement(tmp_path, capsys):
  """The README's demo command, shortened to 3 steps; then the demo's measurement on it."""
  workdir = tmp_path / "digits"
  # A relative --workdir, as in the README (Orbax itself needs absolute paths).
  proc = run_main("--config=configs/digits.py", f"--workdir={os.path.relpath(workdir, REPO)}",
                  "--config.total_steps=3", "--config.optimizer.warmup_steps=1",
                  "--config.optimizer.cosine_decay_steps=3", "--config.logging.sample_every_steps=3",
                  "--config.sample.num_sampling_steps=2", "--config.sample.batch_size=10",
                  "--config.sample.final_num_samples_per_class=1",
                  "--config.logging.grid_samples_per_class=1",
                  "--config.checkpoint.save_every_steps=2",
                  "--config.sample.autoguidance_step=2")  # The guide: step 2's EMA.
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert "autoguided (scale 1.3) by those of step 2" in proc.stderr
  with np.load(workdir / "samples.npz") as z:
    assert z["arr_0"].shape == (10, 8, 8, 1) and z["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(z["arr_1"], np.arange(10))
  from dit_jax.evaluation import digits
  assert digits.main(["--samples", str(workdir / "samples.npz")]) == 0
  out = capsys.readouterr().out
  assert '"num_samples": 10' in out and "ratio" in out
