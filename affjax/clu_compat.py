"""clu 0.0.12 compatibility on jax >= 0.10, plus a CCC metric for clu.

* `Std`: clu 0.0.12's `metrics.Std.compute` calls `jnp.clip(a_min=...)`, a
  keyword jax 0.10 removed (fixed on clu's main branch, not released). This
  subclass only replaces `compute`; use it wherever `clu.metrics.Std` would be
  used, e.g. `Std.from_output("loss")` in a `Collection`.
* `ConcordanceMoments`: a clu `Metric` holding `affjax.metrics.Moments`, so a
  `Collection` can report a CCC over every frame seen (merging adds sums; it
  never averages per-batch CCCs). It reads the model outputs `predictions`
  `[batch, time, outputs]`, `labels` (same shape) and optional `mask`
  `[batch, time]`, and computes `[outputs]` CCCs.

No `from __future__ import annotations` here: clu reads the dataclass field
annotations of metrics at runtime.
"""

import flax
import jax
import jax.numpy as jnp
from clu import metrics as clu_metrics

from affjax import metrics as affjax_metrics


@flax.struct.dataclass
class Std(clu_metrics.Std):
  """`clu.metrics.Std` with a jax-0.10-compatible `compute`."""

  def compute(self) -> jax.Array:
    mean = self.total / self.count
    variance = self.sum_of_squares / self.count - mean**2
    # Rounding can push the variance slightly below zero.
    return jnp.maximum(variance, 0.0) ** 0.5


@flax.struct.dataclass
class ConcordanceMoments(clu_metrics.Metric):
  """Partition-level CCC per output channel, accumulated as moments."""

  moments: affjax_metrics.Moments

  @classmethod
  def from_model_output(
    cls,
    predictions: jax.Array,
    labels: jax.Array,
    mask: jax.Array | None = None,
    **_,
  ) -> "ConcordanceMoments":
    return cls(moments=affjax_metrics.moments(predictions, labels, mask))

  def merge(self, other: "ConcordanceMoments") -> "ConcordanceMoments":
    return type(self)(
      moments=affjax_metrics.merge_moments(self.moments, other.moments)
    )

  def reduce(self) -> "ConcordanceMoments":
    # After `gather_from_model_output` each field has a leading device axis.
    return type(self)(moments=jax.tree.map(lambda x: x.sum(0), self.moments))

  def compute(self) -> jax.Array:
    return affjax_metrics.ccc_from_moments(self.moments)
