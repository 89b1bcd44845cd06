"""Training loss: 1 - concordance correlation coefficient (CCC) per sequence.

Mirrors the reference's `CCCLoss` (base/loss_function.py of sucv/ABAW2): for
every sequence of the batch and every output channel, the CCC is taken along
time and the loss is `1 - CCC`, averaged over batch and outputs. The reference
forms the covariance as a mean over time of the centred product (population
covariance, divide by T) while the variances are unbiased (divide by T - 1),
and adds 1e-8 to the denominator. We keep exactly that mixture, so a perfect
prediction of a length-T sequence scores CCC = (T - 1) / T, not 1.

The reference does not mask anything. Here an optional mask turns frames into
weights: masked frames (invalid labels, window padding) are excluded from
every mean, variance and covariance, with counts taken over the valid frames
only (population covariance divides by n, unbiased variances by n - 1).
Sequences with fewer than two valid frames have no defined unbiased variance
and contribute nothing: the loss is the mean over the (sequence, output)
pairs that have at least two valid frames, and 0 (with zero gradients) when
there are none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array

# The reference's stabiliser in the CCC denominator.
CCC_LOSS_EPS = 1e-8


def _check_shapes(pred: Array, target: Array, mask: Array | None) -> Array:
  """Validates shapes; returns a float mask broadcast to `pred.shape`."""
  if pred.shape != target.shape:
    raise ValueError(
      f"ccc_loss: pred and target shapes differ: pred {pred.shape}, "
      f"target {target.shape}"
    )
  if pred.ndim != 3:
    raise ValueError(
      f"ccc_loss: expected [batch, time, outputs] arrays, got shape "
      f"{pred.shape}"
    )
  if mask is None:
    return jnp.ones(pred.shape, pred.dtype)
  mask = jnp.asarray(mask)
  if mask.shape == pred.shape[:2]:
    mask = mask[..., None]
  elif mask.shape != pred.shape:
    raise ValueError(
      f"ccc_loss: mask shape {mask.shape} must be [batch, time] "
      f"{pred.shape[:2]} or equal to pred shape {pred.shape}"
    )
  return jnp.broadcast_to(mask, pred.shape).astype(pred.dtype)


def sequence_ccc(
  pred: Array, target: Array, mask: Array | None = None
) -> tuple[Array, Array]:
  """Reference-style CCC of every sequence and output channel.

  Args:
    pred: `[batch, time, outputs]` predictions.
    target: `[batch, time, outputs]` labels.
    mask: optional bool `[batch, time]` or `[batch, time, outputs]`; True
      where the frame counts.

  Returns:
    `(ccc, valid)`, both `[batch, outputs]`: the CCC (population covariance,
    unbiased variances, +1e-8 in the denominator) and a bool telling whether
    the sequence had at least two valid frames (ccc is 0 where it did not).

  Raises:
    ValueError: on mismatched or non-3-D shapes.
  """
  pred = jnp.asarray(pred)
  target = jnp.asarray(target)
  w = _check_shapes(pred, target, mask)
  # Zero masked values before any arithmetic so that whatever they hold
  # (NaN, -5 sentinels) cannot leak into values or gradients.
  p = jnp.where(w > 0, pred, 0)
  t = jnp.where(w > 0, target, 0)
  n = jnp.sum(w, axis=1)  # [B, C]
  valid = n >= 2
  n_safe = jnp.where(valid, n, 2)
  p_mean = jnp.sum(w * p, axis=1) / n_safe
  t_mean = jnp.sum(w * t, axis=1) / n_safe
  dp = w * (p - p_mean[:, None])
  dt = w * (t - t_mean[:, None])
  cov = jnp.sum(dp * dt, axis=1) / n_safe  # population
  p_var = jnp.sum(dp * dp, axis=1) / (n_safe - 1)  # unbiased
  t_var = jnp.sum(dt * dt, axis=1) / (n_safe - 1)
  denom = p_var + t_var + (p_mean - t_mean) ** 2 + CCC_LOSS_EPS
  ccc = jnp.where(valid, 2.0 * cov / denom, 0.0)
  return ccc, valid


def ccc_loss(
  pred: Array,
  target: Array,
  mask: Array | None = None,
  weights: Sequence[float] | None = None,
) -> Array:
  """Mean over sequences and outputs of `w * (1 - CCC)` along time.

  Args:
    pred: `[batch, time, outputs]` predictions (label units, e.g. valence).
    target: `[batch, time, outputs]` labels, same shape.
    mask: optional bool `[batch, time]` (or `[batch, time, outputs]`); True
      where the label is valid and the frame is real. Masked frames have no
      influence on the value or the gradient.
    weights: optional per-output weights `[outputs]` (default all 1). Like
      the reference's loss weights (`base/trainer.py`), the weighted terms
      are averaged over sequences and outputs, not divided by the weights'
      sum: weights (10, 1) give `(10 (1 - CCC_0) + (1 - CCC_1)) / 2`.

  Returns:
    Scalar loss. Without a mask this equals the reference's `CCCLoss`.
    Sequences with < 2 valid frames are left out of the mean; if none is
    left, the loss is 0.

  Raises:
    ValueError: if `pred` and `target` (or `mask`) shapes do not match.
  """
  ccc, valid = sequence_ccc(pred, target, mask)
  valid = valid.astype(ccc.dtype)
  count = jnp.sum(valid)
  terms = 1.0 - ccc
  if weights is not None:
    if len(weights) != ccc.shape[1]:
      raise ValueError(
        f"ccc_loss: {len(weights)} weights for {ccc.shape[1]} outputs"
      )
    terms = terms * jnp.asarray(weights, ccc.dtype)
  return jnp.sum(valid * terms) / jnp.maximum(count, 1.0)


def training_mask(batch: Mapping[str, Array], padding_in_loss: bool) -> Array:
  """Frames of a training batch that count in the loss: bool `[B, T]`.

  Args:
    batch: with `mask` (label valid and frame real), `frame_index` (-1 on
      padding) and `trial` (-1 for rows padding the last batch).
    padding_in_loss: the zero-padded frames of short trials count too, with
      label 0 (the reference's loss, `base/dataset.py`); rows of
      `trial = -1` never count.
  """
  mask = batch["mask"]
  if padding_in_loss:
    padded = batch["frame_index"] < 0
    mask = (mask | padded) & (batch["trial"] >= 0)[:, None]
  return mask
