"""FID during training: every `config.eval.fid_every_steps`, the EMA model draws
`config.eval.fid_num_samples` images with the run's sampler (`sampling.Sampler`: the sampling
config's steps, cfg scale and noise design, decoded to uint8), and their Inception pool
statistics are compared with the reference's (ADM's FID, `adm_metrics`), logged as
`eval/fid`.

Config (`config.eval`, off by default):
  fid_every_steps    0 = off
  fid_num_samples    samples per evaluation (ADM's tables use 50,000; a few thousand track
                     progress, biased upwards at small N)
  fid_ref            reference .npz: ADM's VIRTUAL_imagenet*_labeled.npz (stored mu/sigma
                     used) or any uint8 image npz (statistics computed once and cached beside it)
  inception_weights  the FID Inception .pth / .npz (None: inception_weights.DEFAULT_DIR)
  fid_seed           labels (uniform over the classes, as the official sample_ddp.py) and
                     noise; the same at every evaluation, so the curve tracks the model only

The Inception parameters are loaded once, replicated over the mesh, and passed to the jitted
feature function as an argument. Every process runs the sampler and the features (both are
collectives); all get the same number.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from dit_jax.evaluation import adm_eval, adm_metrics, features, inception, inception_weights


class TrainingFID:
  """Attributes:
    every_steps: evaluation period in steps.
    num_samples: samples per evaluation.
    seed: label and noise seed.
  """

  def __init__(self, config_eval, mesh, num_classes: int, log: Callable[[str], None] = print,
               model: inception.InceptionV3 | None = None, per_device_batch: int = 64):
    self.every_steps = int(config_eval.fid_every_steps)
    self.num_samples = int(config_eval.fid_num_samples)
    self.seed = int(config_eval.get("fid_seed", 0))
    if self.num_samples < 2:
      raise ValueError(f"config.eval.fid_num_samples={self.num_samples}: need at least 2")
    if not config_eval.fid_ref:
      raise ValueError("config.eval.fid_every_steps > 0 needs config.eval.fid_ref (a reference "
                       ".npz, e.g. VIRTUAL_imagenet256_labeled.npz)")
    self.extractor = features.FeatureExtractor(mesh, model or inception.InceptionV3(),
                                               per_device_batch)
    params = inception_weights.load(config_eval.inception_weights)
    self.params = self.extractor.replicate(params)
    ref = adm_eval.read_batch(config_eval.fid_ref, self.extractor, self.params, reference=True,
                              cache_path=adm_eval.default_cache_path(config_eval.fid_ref),
                              log=log)
    self.ref_mu, self.ref_sigma = ref.stats["mu"], ref.stats["sigma"]
    self.labels = np.random.default_rng(self.seed).integers(0, num_classes, self.num_samples,
                                                            dtype=np.int32)

  def due(self, step: int) -> bool:
    return self.every_steps > 0 and step % self.every_steps == 0

  def fid_of_images(self, images: np.ndarray) -> float:
    """FID of uint8 NHWC RGB images (the same array on every process) vs the reference."""
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"FID needs RGB images, the sampler gives shape {images.shape}")
    pool = self.extractor(self.params, images, outputs=("pool",))["pool"]
    mu, sigma = adm_metrics.statistics(pool)
    return float(adm_metrics.fid_from_statistics(mu, sigma, self.ref_mu, self.ref_sigma))

  def __call__(self, draw: Callable[[np.ndarray, int], np.ndarray]) -> float:
    """draw(labels, seed) -> uint8 images: the run's sampler bound to the EMA parameters."""
    return self.fid_of_images(draw(self.labels, self.seed))


def create(config, mesh, num_classes: int, log: Callable[[str], None] = print,
           **kwargs) -> TrainingFID | None:
  """The FID hook of `config.eval`, or None when `fid_every_steps` is 0 (the default).
  kwargs: `model`, `per_device_batch` of `TrainingFID` (tests use a small Inception input)."""
  section = config.get("eval") if hasattr(config, "get") else None
  if not section or not int(section.get("fid_every_steps", 0) or 0):
    return None
  return TrainingFID(section, mesh, num_classes, log, **kwargs)
