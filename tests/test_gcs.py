"""gs:// end to end: training reads an image folder from and writes its run to a GCS bucket.

A local GCS emulator (tests/gcs_emulator.py; 127.0.0.1 only) serves one bucket. The test
writes a 3-class image folder into it, then `python -m dit_jax.main` trains
configs/image_folder.py (shrunk to a 2-block model on 8x8 crops) with
`--workdir=gs://.../run` for 2 steps: TensorBoard events (tensorboardX through
google-cloud-storage), the sample grid, the final samples and their grid (etils.epath through
gcsfs) and the Orbax checkpoint (tensorstore's own GCS driver) all land in the bucket. The same
command with 4 steps resumes from the bucket's step-2 checkpoint.
Also: a gs:// path without the `gcs` extra is refused in one line naming the extra, and grid
classes outside the model's classes are refused in one line.
"""
import io
import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from dit_jax import errors
from dit_jax import gcs
from dit_jax import sampling

import gcs_emulator  # pylint: disable=g-bad-import-order

REPO = pathlib.Path(__file__).resolve().parents[1]
BUCKET = "dit-jax-test"
TINY = [
    "--config.model.hidden_size=32", "--config.model.depth=2", "--config.model.num_heads=2",
    "--config.global_batch_size=16", "--config.data.num_workers=2", "--config.ema.decay=0.9",
    "--config.checkpoint.save_every_steps=2", "--config.checkpoint.async_save=false",
    "--config.logging.log_every_steps=2", "--config.logging.sample_every_steps=2",
    "--config.logging.grid_samples_per_class=1", "--config.logging.progress_bar=false",
    "--config.sample.num_sampling_steps=2", "--config.sample.final_num_samples_per_class=1",
    "--config.sample.batch_size=3", "--config.model.attention_impl=xla",
]


def _write_image_folder(env, prefix):
  """3 classes x 4 random RGB PNGs of 10x12 pixels, written to the emulator's bucket."""
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  saved = dict(os.environ)
  os.environ.update(env)
  try:
    bucket = storage.Client(project=env["GOOGLE_CLOUD_PROJECT"]).bucket(BUCKET)
    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "owl"):
      for i in range(4):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(buf, "PNG")
        bucket.blob(f"{prefix}/{c}/{i}.png").upload_from_string(buf.getvalue())
  finally:
    os.environ.clear()
    os.environ.update(saved)


def _read_blob(env, name):
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  saved = dict(os.environ)
  os.environ.update(env)
  try:
    return storage.Client(project=env["GOOGLE_CLOUD_PROJECT"]).bucket(BUCKET).blob(
        name).download_as_bytes()
  finally:
    os.environ.clear()
    os.environ.update(saved)


def test_image_folder_config_trains_and_resumes_on_gs(tmp_path):
  with gcs_emulator.running(BUCKET) as emulator_env:
    _write_image_folder(emulator_env, "images")
    env = {**os.environ, **emulator_env}

    def train(steps):
      proc = subprocess.run(
          [sys.executable, "-m", "dit_jax.main",
           "--config=configs/image_folder.py:data_dir=gs://dit-jax-test/images,num_classes=3,"
           "image_size=8", f"--workdir=gs://{BUCKET}/run", f"--config.total_steps={steps}",
           *TINY],
          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
      assert proc.returncode == 0, proc.stderr[-5000:]
      return proc

    train(2)
    names = gcs_emulator.blob_names(emulator_env, BUCKET)
    run = [n[len("run/"):] for n in names if n.startswith("run/")]
    assert any(n.startswith("events.out.tfevents.") for n in run), run
    assert {"grid_0000002.png", "samples.npz", "samples_grid.png",
            "checkpoints/2/commit_success.txt"} <= set(run), run
    proc = train(4)
    assert "Resumed at step 2" in proc.stderr
    names = set(gcs_emulator.blob_names(emulator_env, BUCKET))
    assert {"run/grid_0000004.png", "run/checkpoints/4/commit_success.txt"} <= names
    with np.load(io.BytesIO(_read_blob(emulator_env, "run/samples.npz"))) as z:
      assert z["arr_0"].shape == (3, 8, 8, 3) and z["arr_0"].dtype == np.uint8
      np.testing.assert_array_equal(z["arr_1"], [0, 1, 2])


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
