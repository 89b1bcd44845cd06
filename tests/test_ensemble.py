"""Tests for affjax.ensemble against a float64 loop version of the reference."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from affjax import ensemble


def _pair_ccc(x, y):
  cov = np.mean((x - x.mean()) * (y - y.mean()))
  vx = np.sum((x - x.mean()) ** 2) / (len(x) - 1)
  vy = np.sum((y - y.mean()) ** 2) / (len(y) - 1)
  return 2 * cov / (vx + vy + (x.mean() - y.mean()) ** 2 + 1e-100)


def _centering_loop(data):
  """Float64 loop transcription of the reference's CCC centering."""
  data = np.asarray(data, np.float64)
  n = data.shape[0]
  ccc = {}
  for i, j in itertools.combinations(range(n), 2):
    ccc[i, j] = ccc[j, i] = _pair_ccc(data[i], data[j])
  agreement = np.array(
    [np.mean([ccc[i, j] for j in range(n) if j != i]) for i in range(n)]
  )
  means = np.array([np.mean(row) for row in data])
  weight = np.sum(means * agreement / np.sum(agreement))
  centered = np.stack([data[i] - means[i] + weight for i in range(n)])
  return centered.mean(0)


def _folds(n=6, t=120, seed=0):
  rng = np.random.default_rng(seed)
  truth = np.sin(np.linspace(0, 6, t))
  offsets = rng.uniform(-0.3, 0.3, (n, 1))
  scales = rng.uniform(0.5, 1.2, (n, 1))
  return scales * truth + offsets + 0.2 * rng.normal(size=(n, t))


@pytest.mark.parametrize("n", [2, 3, 6])
def test_matches_loop_float64(n):
  data = _folds(n=n, seed=n)
  with jax.enable_x64(True):
    got = np.asarray(ensemble.ccc_centering(jnp.asarray(data)))
    assert got.dtype == np.float64
  np.testing.assert_allclose(got, _centering_loop(data), rtol=0, atol=1e-9)


def test_float32_close_to_float64():
  data = _folds(seed=7)
  got = np.asarray(ensemble.ccc_centering(data.astype(np.float32)))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, _centering_loop(data), atol=1e-5)


def test_hand_case_equal_agreement_is_plain_mean():
  # Identical folds: the result is the series itself.
  base = np.linspace(-0.5, 0.5, 11)
  data = np.stack([base, base, base])
  np.testing.assert_allclose(ensemble.ccc_centering(data), base, atol=1e-6)
  # Two folds: agreement is the same for both, so the weight is the mean of
  # the two temporal means and the result is the plain average.
  data = np.stack([base + 0.2, 2 * base - 0.1])
  np.testing.assert_allclose(
    ensemble.ccc_centering(data), data.mean(0), atol=1e-6
  )


def test_agreement_weights_the_offset():
  # Fold 2 agrees less (offset level, flatter shape); the merged mean level
  # must move towards the agreeing folds' levels compared with the plain mean.
  t = np.linspace(0, 4, 80)
  good = np.sin(t)
  data = np.stack([good + 0.3, good + 0.32, 0.3 * good - 0.6])
  merged = np.asarray(ensemble.ccc_centering(data))
  want = _centering_loop(data)
  np.testing.assert_allclose(merged, want, atol=1e-5)
  # The merged level is the agreement-weighted mean of the fold means.
  agreeing_level = good.mean() + 0.31
  assert abs(merged.mean() - agreeing_level) < 0.5 * abs(
    data.mean() - agreeing_level
  )


def test_single_fold_passthrough_and_clip():
  x = np.array([[1.5, -0.2, -3.0, 0.4]], np.float32)
  np.testing.assert_array_equal(ensemble.ccc_centering(x), x[0])
  np.testing.assert_allclose(
    ensemble.merge_folds(x), [1.0, -0.2, -1.0, 0.4], rtol=1e-7
  )


def test_merge_folds_multi_emotion_and_clip():
  data = np.stack([_folds(n=4, seed=1), 3 * _folds(n=4, seed=2)], axis=-1)
  with jax.enable_x64(True):
    merged = np.asarray(ensemble.merge_folds(jnp.asarray(data)))
  assert merged.shape == (120, 2)
  for c in range(2):
    np.testing.assert_allclose(
      merged[:, c], np.clip(_centering_loop(data[..., c]), -1, 1), atol=1e-9
    )
  assert merged.max() <= 1 and merged.min() >= -1
  assert np.any(np.abs(_centering_loop(data[..., 1])) > 1)


def test_constant_folds_do_not_give_nan():
  # Every pairwise CCC is 0 here (the reference's 1e-100 turns 0/0 into 0,
  # which must not vanish in float32), so all agreements are 0 and the
  # reference's weight would be 0/0; we fall back to the plain mean level.
  data = np.full((3, 10), 0.25, np.float32)
  np.testing.assert_allclose(ensemble.ccc_centering(data), data[0], rtol=1e-6)
  data = np.stack([np.full(10, 0.1), np.full(10, 0.3)]).astype(np.float32)
  np.testing.assert_allclose(
    ensemble.ccc_centering(data), np.full(10, 0.2), rtol=1e-6
  )


def test_bad_shape():
  with pytest.raises(ValueError, match="n_folds, T"):
    ensemble.ccc_centering(np.zeros(5))
