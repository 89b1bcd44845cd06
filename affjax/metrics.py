"""Evaluation metrics for continuous emotion: CCC, PCC and RMSE.

All metrics treat every valid frame of the input as one long series per output
channel (the last axis): that is the reference's partition-level semantics,
where the stitched predictions of all trials are concatenated before scoring.
Masked frames are excluded entirely.

Every metric is also available through sufficient statistics (`Moments`:
counts and sums of first and second moments). Moments of disjoint parts add
up exactly, so a partition-level score can be accumulated over batches,
devices or processes (`merge_moments`, or a `psum`) and computed once at the
end; averaging per-batch CCCs would give a different, wrong number. Sums of
raw moments lose precision when accumulated in float32 over millions of
frames, so accumulate on the host in float64 for long partitions (the
functions are dtype-generic: numpy float64 in gives float64 out when
`jax_enable_x64` is on, and `moments_np` is a float64 numpy path).

Conventions (documented choices):
  * CCC uses population moments throughout by default, so perfect agreement
    gives exactly 1. The reference's logger mixes a population covariance
    with unbiased variances; pass `variance_ddof=1` to reproduce it.
  * Degenerate cases return 0 instead of NaN so that model selection does not
    break: CCC when its denominator is 0 (both series constant and equal),
    PCC when either series is constant. With no valid frame at all (or fewer
    than `variance_ddof + 1`), every metric is NaN.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class Moments(NamedTuple):
  """Sufficient statistics per output channel; every field is `[outputs]`.

  Attributes:
    count: number of valid frames.
    sum_p: sum of predictions.
    sum_t: sum of targets.
    sum_pp: sum of squared predictions.
    sum_tt: sum of squared targets.
    sum_pt: sum of prediction * target.
    sum_sq_err: sum of (prediction - target)^2, kept separately so RMSE does
      not suffer the cancellation of sum_pp - 2 sum_pt + sum_tt.
  """

  count: Array
  sum_p: Array
  sum_t: Array
  sum_pp: Array
  sum_tt: Array
  sum_pt: Array
  sum_sq_err: Array


def _flatten(pred, target, mask, xp):
  """Checks shapes and returns `[frames, outputs]` arrays and weights."""
  if pred.shape != target.shape:
    raise ValueError(
      f"pred and target shapes differ: pred {pred.shape}, target {target.shape}"
    )
  if pred.ndim < 1:
    raise ValueError(f"expected [..., outputs] arrays, got shape {pred.shape}")
  c = pred.shape[-1]
  if mask is None:
    w = xp.ones(pred.shape, pred.dtype)
  else:
    mask = xp.asarray(mask)
    if mask.shape == pred.shape[:-1]:
      mask = mask[..., None]
    elif mask.shape != pred.shape:
      raise ValueError(
        f"mask shape {mask.shape} must be {pred.shape[:-1]} or {pred.shape}"
      )
    w = xp.broadcast_to(mask, pred.shape).astype(pred.dtype)
  p = xp.where(w > 0, pred, 0).reshape(-1, c)
  t = xp.where(w > 0, target, 0).reshape(-1, c)
  return p, t, w.reshape(-1, c)


def _sums(p, t, w) -> Moments:
  """Weighted sums over axis 0 of flat predictions, targets and weights."""
  return Moments(
    count=w.sum(0),
    sum_p=(w * p).sum(0),
    sum_t=(w * t).sum(0),
    sum_pp=(w * p * p).sum(0),
    sum_tt=(w * t * t).sum(0),
    sum_pt=(w * p * t).sum(0),
    sum_sq_err=(w * (p - t) ** 2).sum(0),
  )


def moments(pred: Array, target: Array, mask: Array | None = None) -> Moments:
  """Sufficient statistics of the valid frames (jit-compatible).

  Args:
    pred: `[..., outputs]` predictions, e.g. `[batch, time, outputs]`.
    target: same shape as `pred`.
    mask: optional bool, `pred.shape[:-1]` (e.g. `[batch, time]`) or
      `pred.shape`; True where the frame counts.

  Returns:
    `Moments` with `[outputs]` fields in the dtype of `pred`.

  Raises:
    ValueError: on mismatched shapes.
  """
  pred = jnp.asarray(pred)
  target = jnp.asarray(target, pred.dtype)
  return _sums(*_flatten(pred, target, mask, jnp))


def moments_np(
  pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None
) -> Moments:
  """Float64 numpy version of `moments` for host-side accumulation."""
  pred = np.asarray(pred, np.float64)
  target = np.asarray(target, np.float64)
  return _sums(*_flatten(pred, target, mask, np))


def merge_moments(a: Moments, b: Moments) -> Moments:
  """Statistics of the union of two disjoint sets of frames."""
  return Moments(*(x + y for x, y in zip(a, b)))


def _centred(m: Moments, variance_ddof: int):
  """Means, (co)variances from raw sums; works for numpy and jax arrays."""
  xp = jnp if isinstance(m.count, jax.Array) else np
  n = m.count
  enough = n > variance_ddof
  n_safe = xp.where(n > 0, n, 1)
  mp, mt = m.sum_p / n_safe, m.sum_t / n_safe
  # Clamp the tiny negative values that cancellation can produce.
  ss_p = xp.maximum(m.sum_pp - n * mp * mp, 0)
  ss_t = xp.maximum(m.sum_tt - n * mt * mt, 0)
  cov = (m.sum_pt - n * mp * mt) / n_safe
  d = xp.where(enough, n - variance_ddof, 1)
  return xp, enough, mp, mt, ss_p / d, ss_t / d, cov, ss_p, ss_t


def ccc_from_moments(m: Moments, variance_ddof: int = 0) -> Array:
  """CCC per output channel from `Moments`; `[outputs]`.

  `2 cov / (var_p + var_t + (mean_p - mean_t)^2)`, covariance over n,
  variances over `n - variance_ddof` (1 reproduces the reference's logger).
  """
  xp, enough, mp, mt, vp, vt, cov, _, _ = _centred(m, variance_ddof)
  denom = vp + vt + (mp - mt) ** 2
  # `denom <= 0` (constant, equal series) scores 0; a NaN input stays NaN.
  flat = denom <= 0
  ccc = xp.where(flat, 0, 2 * cov / xp.where(flat, 1, denom))
  return xp.where(enough, ccc, xp.nan)


def pcc_from_moments(m: Moments) -> Array:
  """Pearson correlation per output channel from `Moments`; `[outputs]`."""
  xp, enough, _, _, _, _, cov, ss_p, ss_t = _centred(m, 0)
  denom = xp.sqrt(ss_p * ss_t)
  flat = denom <= 0
  pcc = xp.where(flat, 0, cov * m.count / xp.where(flat, 1, denom))
  return xp.where(enough, xp.clip(pcc, -1, 1), xp.nan)


def rmse_from_moments(m: Moments) -> Array:
  """Root mean squared error per output channel from `Moments`."""
  xp = jnp if isinstance(m.count, jax.Array) else np
  n = m.count
  return xp.where(n > 0, xp.sqrt(m.sum_sq_err / xp.where(n > 0, n, 1)), xp.nan)


def ccc(
  pred: Array,
  target: Array,
  mask: Array | None = None,
  *,
  variance_ddof: int = 0,
) -> Array:
  """CCC over all valid frames, per output channel.

  Args:
    pred: `[..., outputs]` predictions.
    target: same shape.
    mask: optional bool `pred.shape[:-1]` or `pred.shape`.
    variance_ddof: 0 (Lin's CCC) or 1 (the reference logger's variances).

  Returns:
    `[outputs]` CCC values.
  """
  return ccc_from_moments(moments(pred, target, mask), variance_ddof)


def pcc(pred: Array, target: Array, mask: Array | None = None) -> Array:
  """Pearson correlation over all valid frames; `[outputs]`."""
  return pcc_from_moments(moments(pred, target, mask))


def rmse(pred: Array, target: Array, mask: Array | None = None) -> Array:
  """Root mean squared error over all valid frames; `[outputs]`."""
  return rmse_from_moments(moments(pred, target, mask))


def all_metrics_np(
  pred: np.ndarray,
  target: np.ndarray,
  mask: np.ndarray | None = None,
  variance_ddof: int = 0,
) -> dict[str, np.ndarray]:
  """Float64 host-side `{"ccc", "pcc", "rmse"}`, each `[outputs]`."""
  m = moments_np(pred, target, mask)
  return {
    "ccc": ccc_from_moments(m, variance_ddof),
    "pcc": pcc_from_moments(m),
    "rmse": rmse_from_moments(m),
  }
