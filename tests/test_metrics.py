"""Tests for affjax.metrics: hand-computed cases, masks, exact accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from affjax import metrics


def _col(x):
  return np.asarray(x, np.float32)[:, None]


def test_perfect_agreement_is_one():
  t = _col([0.1, -0.4, 0.3, 0.9, -0.2])
  np.testing.assert_allclose(metrics.ccc(t, t), [1.0], rtol=1e-6)
  np.testing.assert_allclose(metrics.pcc(t, t), [1.0], rtol=1e-6)
  np.testing.assert_allclose(metrics.rmse(t, t), [0.0], atol=1e-7)


def test_constant_shift_hand_computed():
  # t = 1..4: mean 2.5, population variance 1.25. pred = t + 1:
  # CCC = 2*1.25 / (1.25 + 1.25 + 1^2) = 2.5 / 3.5 = 5/7; PCC stays 1.
  t = _col([1, 2, 3, 4])
  p = t + 1.0
  np.testing.assert_allclose(metrics.ccc(p, t), [5 / 7], rtol=1e-6)
  np.testing.assert_allclose(metrics.pcc(p, t), [1.0], rtol=1e-6)
  np.testing.assert_allclose(metrics.rmse(p, t), [1.0], rtol=1e-6)


def test_constant_shift_general_formula():
  rng = np.random.default_rng(0)
  t = rng.normal(size=200)
  p = 0.7 * t + 0.2 * rng.normal(size=200)
  s = 0.35
  cov = np.mean((p - p.mean()) * (t - t.mean()))
  want = 2 * cov / (p.var() + t.var() + (p.mean() + s - t.mean()) ** 2)
  got = metrics.ccc(_col(p + s), _col(t))
  np.testing.assert_allclose(got, [want], rtol=1e-5)
  # And it is lower than without the shift by the known amount.
  base = 2 * cov / (p.var() + t.var() + (p.mean() - t.mean()) ** 2)
  assert want < base


def test_known_pcc_and_rmse():
  # x = 1,2,3 and y = 1,3,2: deviations (-1,0,1), (-1,1,0) -> r = 1/2.
  np.testing.assert_allclose(
    metrics.pcc(_col([1, 2, 3]), _col([1, 3, 2])), [0.5], rtol=1e-6
  )
  np.testing.assert_allclose(
    metrics.rmse(_col([0, 0]), _col([3, 4])), [np.sqrt(12.5)], rtol=1e-6
  )


def test_per_channel_and_against_numpy_float64():
  rng = np.random.default_rng(1)
  t = rng.uniform(-1, 1, (3, 30, 2))
  p = 0.5 * t + 0.3 * rng.normal(size=t.shape) - 0.1
  mask = rng.uniform(size=(3, 30)) > 0.3
  got = jax.jit(metrics.ccc)(p.astype(np.float32), t.astype(np.float32), mask)
  for c in range(2):
    pc, tc = p[..., c][mask], t[..., c][mask]
    cov = np.mean((pc - pc.mean()) * (tc - tc.mean()))
    want = 2 * cov / (pc.var() + tc.var() + (pc.mean() - tc.mean()) ** 2)
    np.testing.assert_allclose(got[c], want, rtol=1e-5)
    np.testing.assert_allclose(
      metrics.pcc(p, t, mask)[c], np.corrcoef(pc, tc)[0, 1], rtol=1e-5
    )
    np.testing.assert_allclose(
      metrics.rmse(p, t, mask)[c], np.sqrt(np.mean((pc - tc) ** 2)), rtol=1e-5
    )


def test_masked_values_do_not_matter():
  rng = np.random.default_rng(2)
  t = rng.normal(size=(2, 20, 1)).astype(np.float32)
  p = (t + 0.5 * rng.normal(size=t.shape)).astype(np.float32)
  mask = np.ones((2, 20), bool)
  mask[1, 12:] = False
  p2, t2 = p.copy(), t.copy()
  p2[~mask] = np.nan
  t2[~mask] = -5.0
  for fn in (metrics.ccc, metrics.pcc, metrics.rmse):
    np.testing.assert_allclose(fn(p, t, mask), fn(p2, t2, mask), rtol=1e-6)


def test_accumulated_moments_equal_concatenation():
  rng = np.random.default_rng(3)
  t = rng.uniform(-1, 1, (6, 25, 2))
  p = 0.8 * t + 0.2 * rng.normal(size=t.shape)
  mask = rng.uniform(size=(6, 25)) > 0.2
  total = None
  for i in range(0, 6, 2):
    m = metrics.moments_np(p[i : i + 2], t[i : i + 2], mask[i : i + 2])
    total = m if total is None else metrics.merge_moments(total, m)
  whole = metrics.all_metrics_np(p, t, mask)
  np.testing.assert_allclose(
    metrics.ccc_from_moments(total), whole["ccc"], rtol=1e-12
  )
  np.testing.assert_allclose(
    metrics.pcc_from_moments(total), whole["pcc"], rtol=1e-12
  )
  # Averaging per-batch CCCs is a different number (why moments exist).
  per_batch = np.mean(
    [
      metrics.all_metrics_np(p[i : i + 2], t[i : i + 2], mask[i : i + 2])["ccc"]
      for i in range(0, 6, 2)
    ],
    axis=0,
  )
  assert np.all(np.abs(per_batch - whole["ccc"]) > 1e-6)
  # jnp moments summed across "devices" agree too.
  jm = jax.vmap(metrics.moments)(
    jnp.asarray(p.reshape(3, 2, 25, 2), jnp.float32),
    jnp.asarray(t.reshape(3, 2, 25, 2), jnp.float32),
    jnp.asarray(mask.reshape(3, 2, 25)),
  )
  summed = jax.tree.map(lambda x: x.sum(0), jm)
  np.testing.assert_allclose(
    metrics.ccc_from_moments(summed), whole["ccc"], rtol=1e-5
  )


def test_reference_logger_variant():
  # The reference logger: population covariance, variances over n - 1.
  rng = np.random.default_rng(4)
  t = rng.normal(size=50)
  p = t + rng.normal(size=50)
  cov = np.mean((p - p.mean()) * (t - t.mean()))
  want = (
    2
    * cov
    / (
      np.sum((p - p.mean()) ** 2) / 49
      + np.sum((t - t.mean()) ** 2) / 49
      + (p.mean() - t.mean()) ** 2
    )
  )
  got = metrics.all_metrics_np(p[:, None], t[:, None], variance_ddof=1)["ccc"]
  np.testing.assert_allclose(got, [want], rtol=1e-12)
  np.testing.assert_allclose(
    metrics.ccc(_col(t), _col(t), variance_ddof=1), [49 / 50], rtol=1e-6
  )


def test_degenerate_cases():
  const = _col([0.5, 0.5, 0.5])
  np.testing.assert_array_equal(metrics.ccc(const, const), [0.0])
  np.testing.assert_array_equal(metrics.pcc(const, _col([1, 2, 3])), [0.0])
  empty = np.zeros((2, 3), bool)
  p = np.zeros((2, 3, 1), np.float32)
  for fn in (metrics.ccc, metrics.pcc, metrics.rmse):
    assert np.isnan(np.asarray(fn(p, p, empty))).all()


def test_shape_errors():
  with pytest.raises(ValueError, match=r"\(4, 2\).*\(4, 1\)"):
    metrics.ccc(np.zeros((4, 2)), np.zeros((4, 1)))
  with pytest.raises(ValueError, match="mask shape"):
    metrics.rmse(np.zeros((4, 2)), np.zeros((4, 2)), np.ones(3, bool))


@pytest.mark.parametrize("xp", [np, jnp])
def test_nan_predictions_give_nan_not_zero(xp):
  # A NaN must surface in the scores (model selection, the NaN guard), not
  # read as "no agreement".
  pred = xp.asarray([[0.1, 0.2], [xp.nan, 0.3], [0.5, 0.1]], xp.float32)
  target = xp.asarray([[0.2, 0.1], [0.3, 0.4], [0.4, 0.2]], xp.float32)
  for fn in (metrics.ccc, metrics.pcc, metrics.rmse):
    out = np.asarray(fn(pred, target))
    assert np.isnan(out[0]) and np.isfinite(out[1]), (fn.__name__, out)
  # Masking the NaN frame out makes the channel finite again.
  mask = xp.asarray([True, False, True])
  assert np.isfinite(np.asarray(metrics.ccc(pred, target, mask))).all()
