"""Fold merging by CCC centering, as in the reference's test-set submission.

The reference (script/generate_test_result.py with the
`ConcordanceCorrelationCoefficient` class of base/logger.py in sucv/ABAW2)
merges the n fold models' predictions of one trial and one emotion,
`x[f, t]`, like this:

  1. CCC of every pair of folds (f, g): covariance over T (population),
     variances over T - 1, `ccc = 2 cov / (var_f + var_g + (mean_f -
     mean_g)^2 + 1e-100)`.
  2. Agreement of fold f: mean of its CCCs with the n - 1 other folds.
  3. `weight = sum_f(mean_f * agreement_f) / sum_f(agreement_f)`, where
     `mean_f` is the temporal mean of fold f.
  4. `centered_f = x_f - mean_f + weight`; merged = mean over folds.
  5. Late clip of the merged series to [-1, 1].
With a single fold the reference takes its predictions unchanged (then
clips). One deliberate deviation: when the agreements sum to exactly 0 (e.g.
all folds constant, so every pairwise CCC is 0) the reference's weight is
0/0 = NaN; we use the plain mean of the fold means instead.

Numerics: the 1e-100 stabiliser only matters when a denominator is exactly 0
(two constant, equal series), where it turns 0/0 into 0. 1e-100 is
representable in float64 but flushes to 0 in float32, so we use
`max(1e-100, finfo(dtype).tiny)`: exactly 1e-100 in float64 and the
smallest normal float32 (1.2e-38) in float32, which leaves every non-zero
denominator unchanged in both cases. The computation runs in the input's
dtype: pass float64 under `jax.enable_x64(True)` to match the reference to
~1e-12 (merge.py does), float32 otherwise. Unlike the reference we do not
transpose the input when T < n_folds; the layout is always `[n_folds, T]`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

REFERENCE_EPS = 1e-100


def _eps(dtype) -> float:
  return max(REFERENCE_EPS, float(jnp.finfo(dtype).tiny))


def pairwise_ccc(x: Array) -> Array:
  """Reference-style CCC between all pairs of rows.

  Args:
    x: `[n_folds, T]` float predictions.

  Returns:
    `[n_folds, n_folds]` symmetric matrix (the diagonal is each row's CCC
    with itself, (T - 1) / T for non-constant rows, and unused).
  """
  t = x.shape[1]
  mean = jnp.mean(x, axis=1)  # [F]
  dev = x - mean[:, None]
  cov = dev @ dev.T / t  # population
  var = jnp.sum(dev * dev, axis=1) / (t - 1)  # n - 1
  denom = (
    var[:, None]
    + var[None, :]
    + (mean[:, None] - mean[None, :]) ** 2
    + _eps(x.dtype)
  )
  return 2.0 * cov / denom


@jax.jit
def ccc_centering(predictions: Array) -> Array:
  """Merges fold predictions of one trial and one emotion by CCC centering.

  Args:
    predictions: `[n_folds, T]` float array (T >= 2), one row per fold.

  Returns:
    `[T]` merged series (not clipped), same dtype as the input.

  Raises:
    ValueError: if the input is not 2-D or T < 2.
  """
  predictions = jnp.asarray(predictions)
  if predictions.ndim != 2:
    raise ValueError(
      f"ccc_centering: expected [n_folds, T], got shape {predictions.shape}"
    )
  n, t = predictions.shape
  if n == 1:
    return predictions[0]
  if t < 2:
    raise ValueError(f"ccc_centering: need T >= 2 frames, got T={t}")
  ccc = pairwise_ccc(predictions)
  off_diag = 1.0 - jnp.eye(n, dtype=ccc.dtype)
  agreement = jnp.sum(ccc * off_diag, axis=1) / (n - 1)  # [F]
  mean = jnp.mean(predictions, axis=1)  # [F]
  total = jnp.sum(agreement)
  # All agreements 0 (e.g. constant folds) makes the reference's weight 0/0
  # = NaN; we fall back to the plain mean level there instead.
  weight = jnp.where(
    total != 0,
    jnp.sum(mean * agreement / jnp.where(total != 0, total, 1.0)),
    jnp.mean(mean),
  )
  centered = predictions - mean[:, None] + weight
  return jnp.mean(centered, axis=0)


@functools.partial(jax.jit, static_argnames=("clip_min", "clip_max"))
def merge_folds(
  predictions: Array, clip_min: float = -1.0, clip_max: float = 1.0
) -> Array:
  """CCC centering then the reference's late clip, for several emotions.

  Args:
    predictions: `[n_folds, T]` or `[n_folds, T, emotions]`.
    clip_min: lower clip bound (valence/arousal range -1).
    clip_max: upper clip bound (+1).

  Returns:
    `[T]` or `[T, emotions]` merged and clipped series.
  """
  predictions = jnp.asarray(predictions)
  if predictions.ndim == 3:
    merged = jax.vmap(ccc_centering, in_axes=2, out_axes=1)(predictions)
  else:
    merged = ccc_centering(predictions)
  return jnp.clip(merged, clip_min, clip_max)
