r"""The one-time data step: build a config's data set once, before training reads it.

  python -m dit_jax.prepare --config=configs/imagenet256.py \
      --config.data.manual_dir=gs://b/imagenet-tars --config.data.data_dir=gs://b/tfds

Run it on ONE machine (launch/tpu_train.sh runs it on worker 0, launch/gpu_slurm.sh as one
task) before the training processes start: a TFDS source is built into `config.data.data_dir`
from the archives in `config.data.manual_dir` (ImageNet: hours; a no-op when already
prepared), so that every training process only reads it. Other sources are checked and
summarised (digits are built in; an image folder is listed). Prints one summary line per
split and touches no accelerator.

Training with `config.data.prepare=True` on several processes never prepares concurrently
either: `source_for_training` lets process 0 create (and, if needed, prepare) the source while
the others wait at a barrier, then opens it everywhere with preparation off.
"""
from __future__ import annotations

import re
import sys

from absl import flags
from absl import logging
from ml_collections import config_flags

from dit_jax import errors
from dit_jax import input_pipeline

PROG = "python -m dit_jax.prepare"
BARRIER = "dit_jax_prepare_data"
# How long the other processes wait for process 0 to prepare (ImageNet takes hours).
BARRIER_TIMEOUT_MS = 24 * 3600 * 1000


def _with_prepare(config_data, prepare: bool):
  """A copy of `config_data` (a ConfigDict or mapping) with its `prepare` field set."""
  if hasattr(config_data, "copy_and_resolve_references"):
    copy = config_data.copy_and_resolve_references()
    with copy.unlocked():
      copy.prepare = prepare
    return copy
  return {**dict(config_data), "prepare": prepare}


def source_for_training(config_data, split: str, process_index: int, process_count: int,
                        barrier=None) -> input_pipeline.Source:
  """The training source, prepared by process 0 alone when several processes train.

  With `config_data.prepare` true and several processes, process 0 creates the source first
  (preparing it if it is missing) while the others wait at `barrier(name)`; then they open
  it with preparation off, so a data directory that is not shared (or a failed preparation)
  gives a clear error instead of a second, concurrent build.

  barrier: called with a name by every process (default: the JAX distributed client's
    `wait_at_barrier`, with a 24 h timeout).
  """
  prepare = bool(input_pipeline._get(config_data, "prepare", False))  # pylint: disable=protected-access
  if process_count == 1 or not prepare:
    return input_pipeline.create_source(config_data, split=split)
  barrier = barrier or wait_for_all_processes
  source = None
  if process_index == 0:
    logging.info("Process 0 prepares the data (if needed) while %d others wait.",
                 process_count - 1)
    source = input_pipeline.create_source(config_data, split=split)
  barrier(BARRIER)
  if source is None:
    source = input_pipeline.create_source(_with_prepare(config_data, False), split=split)
  return source


def wait_for_all_processes(name: str, timeout_ms: int = BARRIER_TIMEOUT_MS) -> None:
  """A barrier of the jax.distributed coordination service (no device collective)."""
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = distributed.global_state.client
  if client is None:
    raise RuntimeError("several JAX processes but no jax.distributed client: call "
                       "jax.distributed.initialize() first.")
  client.wait_at_barrier(name, timeout_ms)


def prepare(config_data, splits=None) -> list[str]:
  """Builds (if needed) and opens each split of `config_data`; returns one line per split."""
  splits = splits or [input_pipeline._get(config_data, "split", "train")]  # pylint: disable=protected-access
  config_data = _with_prepare(config_data, True)
  lines = []
  for split in splits:
    source = input_pipeline.create_source(config_data, split=split)
    lines.append(f"{config_data.name} split {split!r}: {len(source)} examples, "
                 f"{source.num_classes} classes, images {source.image_shape}")
  return lines


_FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/*.py[:arg]); its data section is read.",
    flag_values=_FLAGS, lock_config=True)
_SPLITS = flags.DEFINE_list("splits", None, "Splits to prepare; default config.data.split.",
                            flag_values=_FLAGS)


def _cli(argv: list[str]) -> int:
  if {"--help", "-h", "--helpfull"} & set(argv):
    print(f"{__doc__}\n{_FLAGS.get_help()}")
    return 0
  saved, sys.argv = sys.argv, [PROG, *argv]  # config_flags reads overrides from sys.argv.
  try:
    try:
      rest = _FLAGS([PROG, *argv])
    except flags.Error as e:
      raise errors.UserError(str(e)) from e
    except (AttributeError, KeyError) as e:  # config_flags: an override naming no field.
      text = str(e)
      key = re.search(r"'([A-Za-z_]\w*)", text)
      hint = re.search(r'Did you mean "([^"]+)"', text)
      raise errors.UserError(
          f"an override names a field the config does not have: "
          f"{key.group(1) if key else errors.one_line(text)!r}"
          + (f"; did you mean {hint.group(1)!r}?" if hint else ".")) from e
    if len(rest) > 1:
      raise errors.UserError(f"unexpected arguments: {rest[1:]}")
    if _CONFIG.value is None:
      raise errors.UserError("--config is required (e.g. --config=configs/imagenet256.py).")
    try:
      config_data = _CONFIG.value.data
    except (OSError, AttributeError) as e:  # config_flags defers a load failure to here.
      spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
      raise errors.UserError(f"--config={spec}: cannot load it "
                             f"({errors.one_line(str(e).splitlines()[-1])}).") from e
    for line in prepare(config_data, _SPLITS.value):
      print(line, flush=True)
  finally:
    sys.argv = saved
    _FLAGS.unparse_flags()
  return 0


def main(argv=None) -> int:
  """`python -m dit_jax.prepare`: argv without the program name (default sys.argv[1:])."""
  return errors.run_cli(PROG, _cli, argv)


if __name__ == "__main__":
  sys.exit(main())
