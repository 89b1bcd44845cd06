"""Tests for the clu 0.0.12 Std shim and the moments-based CCC metric."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

from affjax import clu_compat, metrics


@flax.struct.dataclass
class _Metrics(clu_metrics.Collection):
  loss_std: clu_compat.Std.from_output("loss")
  loss: clu_metrics.Average.from_output("loss")
  ccc: clu_compat.ConcordanceMoments


def test_std_and_ccc_inside_jitted_collection():
  rng = np.random.default_rng(0)
  losses = rng.normal(size=(3, 4)).astype(np.float32)
  preds = rng.normal(size=(3, 2, 6, 2)).astype(np.float32)
  labels = (preds + 0.5 * rng.normal(size=preds.shape)).astype(np.float32)
  mask = rng.uniform(size=(3, 2, 6)) > 0.2

  @jax.jit
  def step(loss, pred, label, m):
    return _Metrics.single_from_model_output(
      loss=loss, predictions=pred, labels=label, mask=m
    )

  total = None
  for i in range(3):
    update = step(losses[i], preds[i], labels[i], mask[i])
    total = update if total is None else total.merge(update)
  out = total.compute()
  np.testing.assert_allclose(out["loss_std"], losses.std(), rtol=1e-5)
  np.testing.assert_allclose(out["loss"], losses.mean(), rtol=1e-5)
  np.testing.assert_allclose(
    out["ccc"], metrics.ccc(preds, labels, mask), rtol=1e-5
  )


def test_std_never_negative_variance():
  std = clu_compat.Std(
    total=jnp.array(3.0), sum_of_squares=jnp.array(2.9999), count=jnp.array(3)
  )
  assert float(std.compute()) == 0.0
