"""Measures the digits demo: are the samples the requested digits, and do they look real?

Protocol (the numbers in the README and the closing notes of the demo come from here):
1. The bundled scikit-learn digits are split into "train" and "heldout" (stratified, fixed
   seed; the demo's DiT is trained on "train" only).
2. A classifier, a scikit-learn MLP on the 64 pixels (one hidden layer of 128 ReLU units),
   is trained on the real "train" part only.
3. Accuracy: the fraction of generated samples that the classifier labels with the class the
   sample was generated for.
4. Fréchet distance between the classifier's hidden-layer features of the samples and of the
   held-out digits, next to the same distance for an equally sized random subset of real
   *training* digits against the same held-out set: the ratio says how far the samples are
   from "as good as real data" (1.0).

  python -m dit_jax.evaluation.digits --samples runs/digits/samples.npz
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import ml_collections
import numpy as np
from sklearn.neural_network import MLPClassifier

from dit_jax import input_pipeline
from dit_jax.errors import UserError, run_cli
from dit_jax.evaluation import frechet


PROG = "python -m dit_jax.evaluation.digits"


@dataclasses.dataclass(frozen=True)
class DigitsReport:
  """Attributes:
    num_samples: generated samples evaluated.
    accuracy: fraction of samples labelled with their requested class.
    per_class_accuracy: the same per class (10 entries).
    classifier_heldout_accuracy: the classifier's accuracy on real held-out digits.
    fd_samples: Fréchet distance, samples vs held-out digits (hidden features).
    fd_real: the same for an equally sized set of real training digits.
    fd_ratio: fd_samples / fd_real.
  """
  num_samples: int
  accuracy: float
  per_class_accuracy: list
  classifier_heldout_accuracy: float
  fd_samples: float
  fd_real: float
  fd_ratio: float


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
  """The digits split as (uint8 (N, 8, 8, 1), int labels (N,))."""
  cfg = ml_collections.ConfigDict(dict(name="digits", image_size=8, split=split))
  source = input_pipeline.create_source(cfg, split=split)
  images, labels = zip(*(source[i] for i in range(len(source))))
  return np.stack(images), np.asarray(labels)


def _pixels(images_uint8: np.ndarray) -> np.ndarray:
  if images_uint8.dtype != np.uint8 or images_uint8.ndim != 4 or images_uint8.shape[1:] != (8, 8, 1):
    raise ValueError(f"expected uint8 images (N, 8, 8, 1), got {images_uint8.dtype} "
                     f"{images_uint8.shape}")
  return images_uint8.reshape(len(images_uint8), 64).astype(np.float64) / 255.0


def train_classifier(seed: int = 0) -> MLPClassifier:
  images, labels = load_split("train")
  clf = MLPClassifier(hidden_layer_sizes=(128,), alpha=1e-3, max_iter=1000, random_state=seed)
  clf.fit(_pixels(images), labels)
  return clf


def hidden_features(clf: MLPClassifier, images_uint8: np.ndarray) -> np.ndarray:
  """The classifier's hidden layer: relu(x W1 + b1)."""
  h = _pixels(images_uint8) @ clf.coefs_[0] + clf.intercepts_[0]
  return np.maximum(h, 0.0)


def evaluate(samples: np.ndarray, sample_labels: np.ndarray, seed: int = 0) -> DigitsReport:
  sample_labels = np.asarray(sample_labels).astype(np.int64)
  if len(samples) != len(sample_labels):
    raise UserError(f"{len(samples)} samples but {len(sample_labels)} labels")
  _pixels(samples)  # Checks dtype and shape before the classifier trains.
  train, _ = load_split("train")
  if len(samples) > len(train):
    raise UserError(f"{len(samples)} samples but only {len(train)} real training digits for "
                    "the baseline")
  clf = train_classifier(seed)
  heldout, heldout_labels = load_split("heldout")
  pred = clf.predict(_pixels(samples))
  correct = pred == sample_labels
  per_class = [float(correct[sample_labels == c].mean()) if np.any(sample_labels == c)
               else float("nan") for c in range(10)]
  n = len(samples)
  subset = np.random.default_rng(seed).choice(len(train), size=n, replace=False)
  f_heldout = hidden_features(clf, heldout)
  fd_samples = frechet.frechet_distance_of_features(hidden_features(clf, samples), f_heldout)
  fd_real = frechet.frechet_distance_of_features(hidden_features(clf, train[subset]), f_heldout)
  return DigitsReport(
      num_samples=n,
      accuracy=float(correct.mean()),
      per_class_accuracy=per_class,
      classifier_heldout_accuracy=float(np.mean(clf.predict(_pixels(heldout)) == heldout_labels)),
      fd_samples=fd_samples,
      fd_real=fd_real,
      fd_ratio=fd_samples / fd_real,
  )


def load_samples(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 (N, 8, 8, 1) images, int labels (N,)) of a samples .npz, checked before any work."""
  if not os.path.isfile(path):
    raise UserError(f"--samples {path}: no such file.")
  try:
    z = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise UserError(f"--samples {path}: not a .npz file of numeric arrays.") from e
  with z:
    if "arr_0" not in z.files or "arr_1" not in z.files:
      raise UserError(f"--samples {path}: needs arr_0 (images) and arr_1 (labels); has "
                      f"{z.files}.")
    try:
      samples, labels = z["arr_0"], z["arr_1"]
    except ValueError as e:  # Object arrays need pickle: refused.
      raise UserError(f"--samples {path}: refused: {e}.") from e
  if samples.dtype != np.uint8 or samples.ndim != 4 or samples.shape[1:] != (8, 8, 1):
    raise UserError(f"--samples {path}: arr_0 must be uint8 digits of shape (N, 8, 8, 1); got "
                    f"{samples.dtype} {samples.shape}.")
  if (labels.ndim != 1 or len(labels) != len(samples)
      or not np.issubdtype(labels.dtype, np.integer)):
    raise UserError(f"--samples {path}: arr_1 must hold one integer label per image "
                    f"({len(samples)}); got {labels.dtype} {labels.shape}.")
  if len(labels) and (labels.min() < 0 or labels.max() > 9):
    raise UserError(f"--samples {path}: labels must be digits 0..9; got {labels.min()}.."
                    f"{labels.max()}.")
  if not len(samples):
    raise UserError(f"--samples {path}: holds no samples.")
  return samples, labels


def _main(argv) -> int:
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
  parser.add_argument("--samples", required=True, help="samples .npz (uint8 arr_0, labels arr_1)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  samples, labels = load_samples(args.samples)
  report = evaluate(samples, labels, seed=args.seed)
  print(json.dumps(dataclasses.asdict(report), indent=1))
  print(f"accuracy {report.accuracy:.4f} (need >= 0.97); FD samples {report.fd_samples:.3f}, "
        f"FD real {report.fd_real:.3f}, ratio {report.fd_ratio:.3f} (need <= 1.3)")
  return 0


def main(argv=None) -> int:
  return run_cli(PROG, _main, argv)


if __name__ == "__main__":
  sys.exit(main())
