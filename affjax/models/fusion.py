"""Leader-follower attentive fusion (the reference's `my_2d1ddy` head).

Per frame, every stream (visual leader first, then the audio followers) is
encoded to `fusion_dim` keys, queries and values; attention runs across the
streams (scores = K Q^T / sqrt(d), softmax over the last axis), the result is
added to the values and layer-normalised over `[n_streams, d]` jointly, then
flattened, concatenated with the leader's own features and regressed.

Reference quirk kept for checkpoint parity: in the reference forward the
follower features are overwritten by their key encoding before the query and
value encoders run, so for followers Q = enc_q(K) and V = enc_v(K), while the
leader uses its TCN features for all three. `follower_qv_from_keys=False`
gives the textbook variant (all three encoders on the stream features).
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from affjax.models import tcn

Array = jax.Array
Streams = Sequence[Array] | Mapping[str, Array]

# PyTorch nn.Linear default weight init, U(+-1/sqrt(fan_in)).
torch_linear_kernel_init = nn.initializers.variance_scaling(
  1.0 / 3.0, "fan_in", "uniform"
)


def torch_dense(
  features: int, in_features: int, name: str, dtype: Any = jnp.float32
) -> nn.Dense:
  """A Dense layer initialised like PyTorch's nn.Linear (float32 params)."""
  return nn.Dense(
    features,
    dtype=dtype,
    kernel_init=torch_linear_kernel_init,
    bias_init=tcn.torch_default_bias_init(in_features),
    name=name,
  )


class LeaderFollowerFusion(nn.Module):
  """Cross-stream attention with the leader's features kept for regression.

  Attributes:
    num_outputs: regressed values per frame (1 emotion or 2).
    fusion_dim: width of keys, queries and values (32 in the reference).
    stream_names: order of the streams when a mapping is passed; the first
      name is the leader. Required for mappings because jit/pytree handling
      sorts dict keys.
    follower_qv_from_keys: reproduce the reference (see module docstring).
    layer_norm_epsilon: PyTorch nn.LayerNorm default.
    dtype: computation dtype (parameters stay float32; the softmax and the
      LayerNorm statistics are computed in float32).
  """

  num_outputs: int = 2
  fusion_dim: int = 32
  stream_names: Sequence[str] | None = None
  follower_qv_from_keys: bool = True
  layer_norm_epsilon: float = 1e-5
  dtype: Any = jnp.float32

  def _ordered(self, streams: Streams) -> list[Array]:
    if isinstance(streams, Mapping):
      if self.stream_names is None:
        raise ValueError(
          "LeaderFollowerFusion got a mapping of streams "
          f"{sorted(streams)} but no stream_names to order "
          "them."
        )
      missing = [n for n in self.stream_names if n not in streams]
      if missing:
        raise ValueError(
          f"Missing fusion streams {missing}; expected "
          f"{list(self.stream_names)}, found {sorted(streams)}."
        )
      return [streams[n] for n in self.stream_names]
    return list(streams)

  @nn.compact
  def __call__(self, streams: Streams) -> Array:
    """Fuses per-frame stream features.

    Args:
      streams: leader first; each `[batch, time, features_i]`.

    Returns:
      `[batch, time, num_outputs]`.
    """
    feats = self._ordered(streams)
    if len(feats) < 2:
      raise ValueError(
        f"Fusion needs a leader and >= 1 follower, got {len(feats)} stream(s)."
      )
    lead_shape = feats[0].shape[:-1]
    for i, f in enumerate(feats):
      if f.ndim != 3 or f.shape[:-1] != lead_shape:
        raise ValueError(
          f"Stream {i} has shape {f.shape}; expected "
          f"[batch, time, features] with [batch, time] = "
          f"{list(lead_shape)}."
        )
    keys, queries, values = [], [], []
    for i, f in enumerate(feats):
      width = f.shape[-1]
      k = torch_dense(self.fusion_dim, width, f"key_{i}", self.dtype)(f)
      src, src_width = f, width
      if i > 0 and self.follower_qv_from_keys:
        src, src_width = k, self.fusion_dim
      keys.append(k)
      queries.append(
        torch_dense(self.fusion_dim, src_width, f"query_{i}", self.dtype)(src)
      )
      values.append(
        torch_dense(self.fusion_dim, src_width, f"value_{i}", self.dtype)(src)
      )
    k = jnp.stack(keys, axis=-2)  # [B, T, n_streams, d]
    q = jnp.stack(queries, axis=-2)
    v = jnp.stack(values, axis=-2)
    scores = jnp.einsum("btid,btjd->btij", k, q) / math.sqrt(self.fusion_dim)
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
    attended = jnp.einsum("btij,btjd->btid", weights.astype(v.dtype), v)
    # One LayerNorm over the whole [n_streams, d] slab with a per-element
    # affine, as nn.LayerNorm([3, 32]) in the reference.
    normed = nn.LayerNorm(
      epsilon=self.layer_norm_epsilon,
      reduction_axes=(-2, -1),
      feature_axes=(-2, -1),
      use_fast_variance=False,
      dtype=self.dtype,
      name="layer_norm",
    )(attended + v)
    fused = normed.reshape(*normed.shape[:-2], -1)
    joint = jnp.concatenate([feats[0].astype(fused.dtype), fused], axis=-1)
    return torch_dense(
      self.num_outputs, joint.shape[-1], "regressor", self.dtype
    )(joint)
