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
import sys

import ml_collections
import numpy as np
from sklearn.neural_network import MLPClassifier

from dit_jax import input_pipeline
from dit_jax.evaluation import frechet


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
    raise ValueError(f"{len(samples)} samples but {len(sample_labels)} labels")
  clf = train_classifier(seed)
  heldout, heldout_labels = load_split("heldout")
  train, _ = load_split("train")
  pred = clf.predict(_pixels(samples))
  correct = pred == sample_labels
  per_class = [float(correct[sample_labels == c].mean()) if np.any(sample_labels == c)
               else float("nan") for c in range(10)]
  n = len(samples)
  if n > len(train):
    raise ValueError(f"{n} samples but only {len(train)} real training digits for the baseline")
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


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--samples", required=True, help="samples .npz (uint8 arr_0, labels arr_1)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  with np.load(args.samples) as z:
    if "arr_0" not in z.files or "arr_1" not in z.files:
      print(f"error: {args.samples} needs arr_0 (images) and arr_1 (labels); has {z.files}",
            file=sys.stderr)
      return 2
    samples, labels = z["arr_0"], z["arr_1"]
  report = evaluate(samples, labels, seed=args.seed)
  print(json.dumps(dataclasses.asdict(report), indent=1))
  print(f"accuracy {report.accuracy:.4f} (need >= 0.97); FD samples {report.fd_samples:.3f}, "
        f"FD real {report.fd_real:.3f}, ratio {report.fd_ratio:.3f} (need <= 1.3)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
