"""Tests for affjax.losses.ccc_loss against a float64 numpy transcription."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from affjax import losses


def _reference_loss_np(pred, target, weights=None):
  """Float64 numpy transcription of the reference CCCLoss (no mask); the
  weights multiply the elementwise loss before its mean, as the reference's
  trainer passes them."""
  pred = np.asarray(pred, np.float64)
  gold = np.asarray(target, np.float64)
  gold_mean = gold.mean(1, keepdims=True)
  pred_mean = pred.mean(1, keepdims=True)
  covariance = (gold - gold_mean) * (pred - pred_mean)  # elementwise
  gold_var = gold.var(1, ddof=1, keepdims=True)
  pred_var = pred.var(1, ddof=1, keepdims=True)
  ccc = (
    2.0
    * covariance
    / (gold_var + pred_var + (gold_mean - pred_mean) ** 2 + 1e-8)
  )
  loss = 1.0 - ccc
  if weights is not None:
    loss = loss * np.asarray(weights, np.float64)
  return np.mean(loss)


def _masked_loss_loop(pred, target, mask):
  """Loop version of the documented masked semantics (float64)."""
  total, count = 0.0, 0
  for b in range(pred.shape[0]):
    keep = mask[b].astype(bool)
    if keep.sum() < 2:
      continue
    for c in range(pred.shape[2]):
      p = pred[b, keep, c].astype(np.float64)
      t = target[b, keep, c].astype(np.float64)
      cov = np.mean((p - p.mean()) * (t - t.mean()))
      ccc = (
        2
        * cov
        / (p.var(ddof=1) + t.var(ddof=1) + (p.mean() - t.mean()) ** 2 + 1e-8)
      )
      total += 1 - ccc
      count += 1
  return total / max(count, 1)


def _data(seed=0, b=3, t=50, c=2):
  rng = np.random.default_rng(seed)
  target = rng.uniform(-1, 1, (b, t, c)).astype(np.float32)
  pred = (0.6 * target + 0.3 * rng.normal(size=(b, t, c)) + 0.1).astype(
    np.float32
  )
  return pred, target


def test_matches_reference_transcription_unmasked():
  pred, target = _data()
  got = jax.jit(losses.ccc_loss)(pred, target)
  want = _reference_loss_np(pred, target)
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)


def test_perfect_prediction_gives_reference_value():
  # Population covariance over unbiased variances: CCC = (T-1)/T.
  target = np.linspace(-1, 1, 10, dtype=np.float32).reshape(1, 10, 1)
  got = float(losses.ccc_loss(target, target))
  np.testing.assert_allclose(got, 1 - 9 / 10, rtol=1e-5)


def test_masked_matches_loop_and_all_true_mask_equals_unmasked():
  pred, target = _data(seed=1, b=4, t=40)
  mask = np.ones((4, 40), bool)
  mask[0, 25:] = False  # padding tail
  mask[1, ::3] = False  # scattered invalid labels
  mask[2, 1:] = False  # one valid frame: contributes nothing
  got = float(jax.jit(losses.ccc_loss)(pred, target, mask))
  np.testing.assert_allclose(
    got, _masked_loss_loop(pred, target, mask), rtol=1e-5, atol=1e-6
  )
  full = np.ones((4, 40), bool)
  np.testing.assert_allclose(
    float(losses.ccc_loss(pred, target, full)),
    float(losses.ccc_loss(pred, target)),
    rtol=1e-6,
  )


def test_masked_frames_have_no_influence():
  pred, target = _data(seed=2)
  mask = np.ones(pred.shape[:2], bool)
  mask[:, 30:] = False
  mask[1, 5] = False
  loss_fn = jax.jit(jax.value_and_grad(losses.ccc_loss))
  v1, g1 = loss_fn(pred, target, mask)
  pred2, target2 = pred.copy(), target.copy()
  pred2[~mask] = 123.0
  target2[~mask] = -5.0
  pred2[0, 40, 0] = np.nan
  v2, g2 = loss_fn(pred2, target2, mask)
  assert float(v1) == pytest.approx(float(v2), rel=1e-6)
  g1, g2 = np.asarray(g1), np.asarray(g2)
  assert np.all(g1[~mask] == 0) and np.all(g2[~mask] == 0)
  np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-7)
  assert np.abs(g1[mask]).sum() > 0


def test_gradient_matches_finite_difference_of_numpy():
  pred, target = _data(seed=3, b=2, t=12, c=1)
  grad = np.asarray(jax.grad(losses.ccc_loss)(pred, target))
  eps = 1e-4
  p64 = pred.astype(np.float64)
  for idx in [(0, 0, 0), (1, 7, 0), (0, 11, 0)]:
    up, dn = p64.copy(), p64.copy()
    up[idx] += eps
    dn[idx] -= eps
    fd = (_reference_loss_np(up, target) - _reference_loss_np(dn, target)) / (
      2 * eps
    )
    np.testing.assert_allclose(grad[idx], fd, rtol=1e-3, atol=1e-5)


def test_fully_masked_batch_gives_zero_loss_and_zero_grad():
  pred, target = _data(seed=4)
  mask = np.zeros(pred.shape[:2], bool)
  v, g = jax.value_and_grad(losses.ccc_loss)(pred, target, mask)
  assert float(v) == 0.0
  assert np.all(np.asarray(g) == 0)


def test_shape_mismatch_raises_with_both_shapes():
  with pytest.raises(ValueError, match=r"\(2, 5, 1\).*\(2, 5, 2\)"):
    losses.ccc_loss(jnp.zeros((2, 5, 1)), jnp.zeros((2, 5, 2)))
  with pytest.raises(ValueError, match="mask shape"):
    losses.ccc_loss(
      jnp.zeros((2, 5, 1)), jnp.zeros((2, 5, 1)), jnp.ones((2, 4), bool)
    )


def test_output_weights_match_the_reference_weighted_loss():
  """Two heads weighted 10:1 (valence leads): the weighted terms are
  averaged over sequences and outputs, not divided by the weights' sum."""
  rng = np.random.default_rng(3)
  pred = rng.normal(size=(4, 30, 2)).astype(np.float32)
  target = rng.normal(size=(4, 30, 2)).astype(np.float32)
  got = losses.ccc_loss(pred, target, weights=(10.0, 1.0))
  want = _reference_loss_np(pred, target, weights=(10.0, 1.0))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # By hand from the per-sequence CCCs.
  ccc, _ = losses.sequence_ccc(pred, target)
  by_hand = np.mean(10 * (1 - ccc[:, 0]) + (1 - ccc[:, 1])) / 2
  np.testing.assert_allclose(got, by_hand, rtol=1e-6)
  with pytest.raises(ValueError, match="3 weights for 2 outputs"):
    losses.ccc_loss(pred, target, weights=(1.0, 1.0, 1.0))


def test_training_mask_counts_padding_of_real_rows_only():
  batch = {
    "mask": np.array([[True, False, False], [False, False, False]]),
    "frame_index": np.array([[0, 1, -1], [-1, -1, -1]]),
    "trial": np.array([0, -1]),
  }
  np.testing.assert_array_equal(
    losses.training_mask(batch, False), batch["mask"]
  )
  # Frame 1 is an unlabelled real frame: still out; frame 2 is padding.
  np.testing.assert_array_equal(
    losses.training_mask(batch, True),
    [[True, False, True], [False, False, False]],
  )
