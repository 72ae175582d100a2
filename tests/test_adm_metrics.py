"""ADM's metric definitions (guided-diffusion evaluations/evaluator.py), each against the
formula written out independently here in numpy, on synthetic features."""
import numpy as np
import pytest
import scipy.linalg

from dit_jax.evaluation import adm_metrics


# ---- Inception Score ---------------------------------------------------------------------


def _softmax(logits):
  e = np.exp(logits - logits.max(1, keepdims=True))
  return (e / e.sum(1, keepdims=True)).astype(np.float32)


def _is_reference(p, split):
  """exp(E_x KL(p(y|x) || p(y))) per split, float64, averaged over the splits."""
  p = p.astype(np.float64)
  scores = []
  for i in range(0, len(p), split):
    part = p[i:i + split]
    marginal = part.mean(0)
    scores.append(np.exp(np.mean(np.sum(part * np.log(part / marginal), axis=1))))
  return float(np.mean(scores))


def test_inception_score_splits_of_5000():
  rng = np.random.default_rng(0)
  p = _softmax(rng.normal(scale=3.0, size=(12000, 50)))  # Splits 5000, 5000, 2000.
  got = adm_metrics.inception_score(p)
  assert got == pytest.approx(_is_reference(p, 5000), rel=1e-5)
  # Not the score of one split over everything, nor a mean over other split sizes.
  assert abs(got - _is_reference(p, 12000)) > 1e-3 * got
  assert got != pytest.approx(_is_reference(p, 4000), rel=1e-5)


def test_inception_score_closed_forms():
  # Identical predictions: every KL is 0, IS = 1. Confident, evenly spread: IS = classes.
  p = np.tile(_softmax(np.arange(10.0)[None]), (100, 1))
  assert adm_metrics.inception_score(p) == pytest.approx(1.0, abs=1e-6)
  confident = np.full((100, 10), 1e-30, np.float32)
  confident[np.arange(100), np.arange(100) % 10] = 1.0
  assert adm_metrics.inception_score(confident) == pytest.approx(10.0, rel=1e-5)


# ---- FID / sFID ----------------------------------------------------------------------------


def _fid_reference(mu1, s1, mu2, s2):
  """|mu1 - mu2|^2 + tr S1 + tr S2 - 2 sum sqrt(eig(S1^1/2 S2 S1^1/2)) (S1 S2 is similar to
  the symmetric S1^1/2 S2 S1^1/2, so their square roots have the same trace)."""
  w, v = np.linalg.eigh(s1)
  root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  inner = np.linalg.eigvalsh(root @ s2 @ root)
  d = mu1 - mu2
  return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None))))


def test_fid_matches_eigen_formula_incl_rank_deficient_covariance():
  rng = np.random.default_rng(1)
  d = 48
  a = rng.normal(size=(400, d)) @ rng.normal(size=(d, d)) * 0.3
  b = rng.normal(size=(30, d)) + 0.5  # 30 samples in 48 dimensions: singular covariance.
  mu1, s1 = adm_metrics.statistics(a.astype(np.float32))
  mu2, s2 = adm_metrics.statistics(b.astype(np.float32))
  assert mu1.dtype == np.float32 and s1.dtype == np.float64  # ADM's np.mean / np.cov.
  assert np.linalg.matrix_rank(s2) < d
  got = adm_metrics.fid_from_statistics(mu1, s1, mu2, s2)
  want = _fid_reference(mu1.astype(np.float64), s1, mu2.astype(np.float64), s2)
  assert got == pytest.approx(want, rel=1e-6)


def test_fid_of_a_set_against_itself_is_zero():
  x = np.random.default_rng(2).gamma(1.0, size=(1000, 64)).astype(np.float32)
  mu, s = adm_metrics.statistics(x)
  assert abs(adm_metrics.fid_from_statistics(mu, s, mu, s)) < 1e-8


def test_fid_singular_product_adds_eps_to_both_diagonals():
  # S1 S2 = [[0, 1e-20], [0, 0]] (a Jordan block: S2 is PSD to rounding, -1e-40 eigenvalue)
  # makes sqrtm infinite; ADM then uses sqrtm((S1 + eps I)(S2 + eps I)), eps = 1e-6, and
  # the traces of the unmodified covariances.
  s1 = np.diag([1.0, 0.0])
  s2 = np.array([[0.0, 1e-20], [1e-20, 1.0]])
  assert not np.isfinite(scipy.linalg.sqrtm(s1 @ s2)).all()
  rng = np.random.default_rng(3)
  m = rng.normal(size=(4, 4))
  big1, big2 = np.eye(6), np.eye(6)
  big1[:2, :2], big2[:2, :2] = s1, s2
  big1[2:, 2:], big2[2:, 2:] = m @ m.T, np.eye(4) * 2.0
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  got = adm_metrics.fid_from_statistics(mu1, big1, mu2, big2)
  eps = 1e-6 * np.eye(6)
  covmean = np.real(scipy.linalg.sqrtm((big1 + eps) @ (big2 + eps)))
  want = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(big1) + np.trace(big2)
               - 2 * np.trace(covmean))
  assert np.isfinite(got)
  assert got == pytest.approx(want, rel=1e-9)


# ---- precision / recall --------------------------------------------------------------------


def _distances16(u, v):
  """ADM's DistanceBlock in float16 (sums accumulated in float32, rounded to float16)."""
  with np.errstate(over="ignore", invalid="ignore"):  # Overflow is the point of a test.
    u, v = u.astype(np.float16), v.astype(np.float16)
    nu = np.sum(np.square(u).astype(np.float32), 1).astype(np.float16)
    nv = np.sum(np.square(v).astype(np.float32), 1).astype(np.float16)
    uv = (u.astype(np.float32) @ v.astype(np.float32).T).astype(np.float16)
    return np.maximum(nu[:, None] - np.float16(2) * uv + nv[None, :], np.float16(0))


def _distances(u, v):
  d = _distances16(u, v)
  if np.isfinite(d).all():
    return d.astype(np.float32)
  u, v = u.astype(np.float64), v.astype(np.float64)
  return np.maximum((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None], 0).astype(
      np.float32)


def _pr_reference(ref, sam, k=3):
  """Improved precision/recall on full distance matrices: radius = k-th neighbour (index k of
  the sorted row, the point itself at 0); a point is covered if within some radius."""
  r_ref = np.sort(_distances(ref, ref), axis=1)[:, k]
  r_sam = np.sort(_distances(sam, sam), axis=1)[:, k]
  d = _distances(ref, sam)
  precision = np.mean(np.any(d <= r_ref[:, None], axis=0))
  recall = np.mean(np.any(d <= r_sam[None, :], axis=1))
  return float(precision), float(recall), r_ref, r_sam


def test_distances_are_float16_with_float32_fallback_per_block():
  rng = np.random.default_rng(4)
  u = rng.gamma(1.0, 0.3, size=(40, 2048)).astype(np.float32)
  v = rng.gamma(1.0, 0.3, size=(30, 2048)).astype(np.float32)
  got = np.asarray(adm_metrics.pairwise_distances(u, v))
  want16 = _distances16(u, v).astype(np.float32)
  u64, v64 = u.astype(np.float64), v.astype(np.float64)
  exact = (u64 * u64).sum(1)[:, None] - 2 * u64 @ v64.T + (v64 * v64).sum(1)[None]
  ulp = np.spacing(want16.astype(np.float16)).astype(np.float32)
  assert np.all(np.abs(got - want16) <= ulp)  # float16 up to summation order...
  assert np.max(np.abs(exact - got) / ulp) > 0.25  # ...which is not float32.
  # Features too large for float16 (squared norms > 65504): the block is float32.
  big = u * 20.0
  got = np.asarray(adm_metrics.pairwise_distances(big, v))
  assert not np.isfinite(_distances16(big, v)).all()
  b64, v64 = big.astype(np.float64), v.astype(np.float64)
  want = (b64 * b64).sum(1)[:, None] - 2 * b64 @ v64.T + (v64 * v64).sum(1)[None]
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("scale", [1, 40])  # 40: squared norms overflow float16.
def test_precision_recall_matches_reference_in_blocks(scale):
  # Small integer features: every distance is an exact integer in float16/float32 whatever
  # the summation order, so the comparison is exact, ties included (they are many).
  rng = np.random.default_rng(5 + scale)
  ref = rng.integers(0, 4, size=(150, 16)).astype(np.float32) * scale
  sam = (rng.integers(1, 4, size=(110, 16)) + (rng.random((110, 16)) < 0.3)).astype(
      np.float32) * scale
  precision, recall, r_ref, _ = _pr_reference(ref, sam)
  assert 0.05 < precision < 0.95 and 0.05 < recall < 0.95
  # Row/column blocks of 32 and 48 (ADM: 10,000) give the same answer as whole matrices.
  np.testing.assert_array_equal(adm_metrics.manifold_radii(ref, 3, 32, 48), r_ref)
  got = adm_metrics.precision_recall(ref, sam, row_batch_size=32, col_batch_size=48)
  assert got == (precision, recall)
  assert adm_metrics.precision_recall(ref, sam) == (precision, recall)


def test_precision_recall_k_is_third_neighbour_not_counting_self():
  # Points on a line at 0, 1, 3, 6, 10: neighbours of 0 at 1, 3, 6 -> radius 6^2 = 36.
  x = np.array([0.0, 1.0, 3.0, 6.0, 10.0], np.float32)[:, None]
  np.testing.assert_array_equal(adm_metrics.manifold_radii(x), [36.0, 25.0, 9.0, 25.0, 81.0])
