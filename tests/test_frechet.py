"""Fréchet distance: closed forms and invariants."""
import numpy as np
import pytest

from dit_jax.evaluation import frechet


def test_identical_sets_have_zero_distance():
  x = np.random.default_rng(0).normal(size=(500, 6))
  assert abs(frechet.frechet_distance_of_features(x, x)) < 1e-8


def test_mean_shift_only():
  # Same covariance: FD = |mu1 - mu2|^2.
  s = np.diag([1.0, 2.0, 3.0])
  assert frechet.frechet_distance(np.zeros(3), s, np.array([1.0, 2.0, 0.0]), s) == pytest.approx(5.0)


def test_diagonal_covariances_closed_form():
  # Diagonal: FD = sum (sqrt(a) - sqrt(b))^2 over the diagonal.
  a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
  expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = frechet.frechet_distance(np.zeros(3), np.diag(a), np.zeros(3), np.diag(b))
  assert got == pytest.approx(expected, rel=1e-9)


def test_shape_mismatch_is_an_error():
  with pytest.raises(ValueError, match="shape"):
    frechet.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
  with pytest.raises(ValueError, match=r"\(N >= 2, D\)"):
    frechet.feature_statistics(np.zeros(5))
