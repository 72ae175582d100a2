"""Training metrics: TensorBoard event files, a console progress bar, and FLOP accounting.

Owns what is written where (process 0 only; every other process gets no-op writers), the
analytic DiT FLOP count and the peak-FLOPs table used for model FLOP utilisation:

  forward MACs per image (T tokens, width D, depth L, MLP ratio r, patch p, C in / C' out):
    patch embed  T p^2 C D
    per block    (4 + 2r) T D^2      qkv, out projection, MLP
                 2 T^2 D             Q K^T and A V
                 6 D^2               adaLN modulation (once per image)
    final layer  T D p^2 C' + 2 D^2
    embeddings   256 D + D^2         timestep MLP
  train FLOPs per step = 3 (forward + backward) x 2 (FLOPs per MAC) x MACs x global batch
  mfu = train FLOPs per step x steps/s / (peak FLOPs per device x devices)

Event files are written with tensorboardX (no TensorFlow needed). Scalars are prefixed
`train/`; images are uint8 HWC.
"""
from __future__ import annotations

import os
import time
from typing import Mapping

from absl import logging
import numpy as np

# Dense bf16 peak FLOP/s per device (chip for TPU, GPU for NVIDIA), from vendor data sheets.
# Matched as substrings of `jax.Device.device_kind`, first match wins.
PEAK_FLOPS = (
    ("TPU v6", 918e12),     # Trillium / v6e ("TPU v6 lite").
    ("TPU v5 lite", 197e12),  # v5e.
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),     # v5p reports "TPU v5".
    ("TPU v4", 275e12),
    ("H200", 989e12),
    ("H100", 989e12),       # SXM; the PCIe card is lower (756e12): override in the config.
    ("A100", 312e12),
)


def peak_flops(device_kind: str) -> float | None:
  """Peak bf16 FLOP/s of one device of this kind, or None if unknown (e.g. CPU)."""
  for key, flops in PEAK_FLOPS:
    if key.lower() in device_kind.lower():
      return flops
  return None


def dit_train_flops(model, global_batch_size: int) -> float:
  """Analytic training FLOPs of one step (see the module docstring)."""
  p, c = model.patch_size, model.in_channels
  d, depth, r = model.hidden_size, model.depth, model.mlp_ratio
  tokens = (model.input_size // p) ** 2
  c_out = 2 * c if model.learn_sigma else c
  if model.block_type == "in-context":
    tokens_in_blocks = tokens + 2
  else:
    tokens_in_blocks = tokens
  t = tokens_in_blocks
  block = (4 + 2 * r) * t * d * d + 2 * t * t * d + 6 * d * d
  macs = tokens * p * p * c * d + depth * block + tokens * d * p * p * c_out + 2 * d * d
  macs += 256 * d + d * d
  return 3.0 * 2.0 * macs * global_batch_size


class MetricWriter:
  """TensorBoard writer on process 0; a no-op elsewhere.

  As a context manager it is closed (its buffered events written) however the block ends, so
  a run that fails keeps the metrics it logged; a failure to close while another error is
  ending the run is logged, never raised over that error.
  """

  def __init__(self, logdir: str, enabled: bool = True):
    self._writer = None
    if enabled:
      from tensorboardX import SummaryWriter  # Import late: it is slow and unused elsewhere.
      self._writer = SummaryWriter(logdir=os.fspath(logdir), flush_secs=30)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if self._writer is None:
      return
    for name, value in scalars.items():
      if value is not None:
        self._writer.add_scalar(name, float(value), global_step=int(step))

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """Writes uint8 (H, W, C) images (C = 1 or 3)."""
    if self._writer is None:
      return
    for name, image in images.items():
      image = np.asarray(image)
      if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
      self._writer.add_image(name, image, global_step=int(step), dataformats="HWC")

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      writer, self._writer = self._writer, None
      writer.close()

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc is None:
      self.close()
      return
    try:
      self.close()
    except Exception as close_error:  # pylint: disable=broad-except
      logging.warning("Closing the TensorBoard writer failed: %s: %s",
                      type(close_error).__name__, close_error)


class ProgressBar:
  """tqdm progress bar with ETA on process 0 (and when enabled); otherwise silent."""

  def __init__(self, total: int, initial: int = 0, enabled: bool = True, unit: str = "step"):
    self._bar = None
    if enabled:
      import tqdm
      self._bar = tqdm.tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True,
                            smoothing=0.1)

  def update(self, n: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(n)

  def set_postfix(self, **kwargs) -> None:
    if self._bar is not None:
      self._bar.set_postfix(**kwargs, refresh=False)

  def write(self, message: str) -> None:
    if self._bar is not None:
      self._bar.write(message)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None


class Throughput:
  """steps/s, images/s and mfu between two logging steps (excluding what `pause` brackets)."""

  def __init__(self, step: int, global_batch_size: int, flops_per_step: float | None,
               peak_flops_total: float | None):
    self._batch = global_batch_size
    self._flops = flops_per_step
    self._peak = peak_flops_total
    self._t0, self._s0, self._paused = time.perf_counter(), step, 0.0

  def pause(self):
    """Context manager: time spent inside (sampling, checkpoints) is not counted."""
    outer = self

    class _Pause:
      def __enter__(self):
        self.t = time.perf_counter()

      def __exit__(self, *exc):
        outer._paused += time.perf_counter() - self.t
    return _Pause()

  def measure(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    elapsed = now - self._t0 - self._paused
    steps = step - self._s0
    self._t0, self._s0, self._paused = now, step, 0.0
    if steps <= 0 or elapsed <= 0:
      return {}
    out = {"train/steps_per_sec": steps / elapsed,
           "train/images_per_sec": steps * self._batch / elapsed}
    if self._flops and self._peak:
      out["train/mfu"] = self._flops * steps / elapsed / self._peak
    return out


def log_scalars(step: int, scalars: Mapping[str, float]) -> None:
  logging.info("step %d: %s", step, ", ".join(f"{k}={v:.5g}" for k, v in scalars.items()))
