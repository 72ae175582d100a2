"""Fréchet distance: closed forms, invariants, and an independent float64 computation (no
scipy sqrtm) on full non-commuting and near-singular covariances."""
import numpy as np
import pytest
import scipy.linalg

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


def _independent_fd(mu1, s1, mu2, s2):
  """FD in float64 without scipy.linalg.sqrtm: Tr (S1 S2)^(1/2) = sum_i sqrt(lambda_i) with
  lambda the eigenvalues of S1^(1/2) S2 S1^(1/2) (symmetric PSD, similar to S1 S2)."""
  ev, v = np.linalg.eigh(s1)
  r = (v * np.sqrt(np.clip(ev, 0, None))) @ v.T
  m = r @ s2 @ r
  tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
  diff = mu1 - mu2
  return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt


def _random_stats(rng, n, d, mix):
  x = rng.normal(size=(n, d)) @ mix + rng.normal(size=d)
  return x.mean(0), np.cov(x, rowvar=False), x


def test_full_noncommuting_covariances_match_an_independent_computation():
  rng = np.random.default_rng(1)
  d = 12
  mu1, s1, _ = _random_stats(rng, 200, d, rng.normal(size=(d, d)))
  mu2, s2, _ = _random_stats(rng, 200, d, rng.normal(size=(d, d)))
  assert np.abs(s1 @ s2 - s2 @ s1).max() > 0.3 * np.abs(s1 @ s2).max()  # far from commuting
  want = _independent_fd(mu1, s1, mu2, s2)
  got = frechet.frechet_distance(mu1, s1, mu2, s2)
  assert got == pytest.approx(want, rel=1e-10)
  # The test separates the right square root from sqrtm(S1) sqrtm(S2):
  wrong = np.trace(np.real(scipy.linalg.sqrtm(s1) @ scipy.linalg.sqrtm(s2)))
  right = (np.trace(s1) + np.trace(s2) + (mu1 - mu2) @ (mu1 - mu2) - want) / 2
  assert abs(wrong - right) > 1e-3 * right


def test_near_singular_covariance_matches_an_independent_computation():
  """Fewer samples than dimensions (rank 5 of 16): sqrtm of the product returns a complex
  matrix (imaginary parts ~1e-7 from rounding) that is dropped."""
  rng = np.random.default_rng(2)
  d = 16
  mu1, s1, _ = _random_stats(rng, 6, d, np.eye(d))
  mu2, s2, _ = _random_stats(rng, 100, d, rng.normal(size=(d, d)))
  assert np.linalg.matrix_rank(s1) == 5
  assert np.iscomplexobj(scipy.linalg.sqrtm(s1 @ s2))
  want = _independent_fd(mu1, s1, mu2, s2)
  assert frechet.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-7)
  assert frechet.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(want, rel=1e-7)


def test_feature_statistics_in_float64():
  """float32 features with a large offset: mean and covariance (N - 1) come out in float64."""
  rng = np.random.default_rng(3)
  x = (1e4 + rng.normal(size=(50, 3)) * [1.0, 2.0, 0.5]).astype(np.float32)
  mu, s = frechet.feature_statistics(x)
  x64 = x.astype(np.float64)
  c = x64 - x64.mean(0)
  np.testing.assert_allclose(mu, x64.mean(0), rtol=1e-15)
  np.testing.assert_allclose(s, c.T @ c / 49, rtol=1e-12)
  np.testing.assert_allclose(frechet.feature_statistics(x[:, :1])[1], s[0, 0], rtol=1e-15)  # D = 1
  two = x64[:2]  # N = 2, the fewest samples with a covariance
  np.testing.assert_allclose(frechet.feature_statistics(x[:2])[1],
                             np.outer(two[0] - two[1], two[0] - two[1]) / 2, rtol=1e-9)
  with pytest.raises(ValueError, match=r"\(N >= 2, D\)"):
    frechet.feature_statistics(x[:1])
  for mu2, s2 in ((np.zeros(2), np.eye(3)), (np.zeros(3), np.eye(2))):
    with pytest.raises(ValueError, match="shape"):
      frechet.frechet_distance(np.zeros(3), np.eye(3), mu2, s2)


def test_singular_product_is_regularised_and_large_imaginary_parts_rejected(monkeypatch):
  """ADM's path: when sqrtm(S1 S2) is not finite, sqrtm((S1 + eps I)(S2 + eps I)) is used; an
  imaginary diagonal above 1e-3 is an error, not silently dropped."""
  real_sqrtm = scipy.linalg.sqrtm
  calls = []

  def fake_sqrtm(m):
    calls.append(m)
    return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

  s1, s2 = np.diag([1.0, 0.0]), np.diag([0.0, 4.0])
  monkeypatch.setattr(frechet.scipy.linalg, "sqrtm", fake_sqrtm)
  with pytest.warns(UserWarning, match="adding 0.01 to the diagonal"):
    got = frechet.frechet_distance(np.zeros(2), s1, np.zeros(2), s2, eps=1e-2)
  np.testing.assert_allclose(calls[1], (s1 + 1e-2 * np.eye(2)) @ (s2 + 1e-2 * np.eye(2)))
  want = 5.0 - 2 * (np.sqrt(1.01 * 0.01) + np.sqrt(0.01 * 4.01))
  assert got == pytest.approx(want, rel=1e-12)
  calls.clear()
  with pytest.warns(UserWarning, match="adding 1e-06"):
    frechet.frechet_distance(np.zeros(2), s1, np.zeros(2), s2)
  np.testing.assert_allclose(calls[1], (s1 + 1e-6 * np.eye(2)) @ (s2 + 1e-6 * np.eye(2)))

  monkeypatch.setattr(frechet.scipy.linalg, "sqrtm", lambda m: real_sqrtm(m) + 2e-3j)
  with pytest.raises(ValueError, match="imaginary component"):
    frechet.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2))
  monkeypatch.setattr(frechet.scipy.linalg, "sqrtm", lambda m: real_sqrtm(m) + 5e-4j)
  assert frechet.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), 4 * np.eye(2)) == (
      pytest.approx(2.0, rel=1e-12))
