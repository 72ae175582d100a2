"""python -m dit_jax.prepare: the one-time data step, and process 0 preparing for the others.

The two-process run (exactly one process builds a tiny TFDS set while the other waits) is in
tests/test_preemption.py; here the command line and `source_for_training`'s order, in-process.
"""
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from dit_jax import prepare
from conftest import CONFIGS, load_config


def test_prepare_prints_one_line_per_split(tmp_path, capsys):
  for c in ("a", "b"):
    (tmp_path / c).mkdir()
    for i in range(2):
      Image.fromarray(np.full((9, 7, 3), 40 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
  spec = f"--config={CONFIGS / 'image_folder.py'}:data_dir={tmp_path},num_classes=2,image_size=4"
  assert prepare.main([spec]) == 0
  assert capsys.readouterr().out == ("image_folder split 'train': 4 examples, 2 classes, "
                                     "images (4, 4, 3)\n")
  assert prepare.main([spec, "--config.data.num_classes=3"]) == 2
  assert capsys.readouterr().err.strip() == (
      "python -m dit_jax.prepare: error: config.data.num_classes=3 but the image_folder data "
      "has 2 classes")


def test_prepare_bad_command_lines_are_one_line_exit_2():
  for args, message in [
      (["--config=configs/nope.py"], "--config=configs/nope.py: cannot load it"),
      (["--config=configs/testing.py", "--config.data.nme=x"],
       "an override names a field the config does not have: 'nme'; did you mean 'name'?")]:
    proc = subprocess.run([sys.executable, "-m", "dit_jax.prepare", *args],
                          cwd=CONFIGS.parent, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"python -m dit_jax.prepare: error: {message}")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_source_for_training_process_0_prepares_before_the_barrier():
  config = load_config("testing")
  with config.unlocked():
    config.data.prepare = True
  events = []
  original = prepare.input_pipeline.create_source

  def create_source(config_data, split):
    events.append(("create", bool(config_data.prepare)))
    return original(config_data, split=split)

  prepare.input_pipeline.create_source = create_source
  try:
    for index in (0, 1):
      source = prepare.source_for_training(config.data, "train", index, 2,
                                           barrier=lambda name: events.append(("barrier", name)))
      assert len(source) == 1258
    # Process 0: creates (preparing), then the barrier; the others: barrier, then open only.
    assert events == [("create", True), ("barrier", prepare.BARRIER),
                      ("barrier", prepare.BARRIER), ("create", False)]
    events.clear()
    prepare.source_for_training(config.data, "train", 0, 1)
    assert events == [("create", True)]  # One process: no barrier.
  finally:
    prepare.input_pipeline.create_source = original
  with pytest.raises(RuntimeError, match="jax.distributed"):
    prepare.wait_for_all_processes("x")
