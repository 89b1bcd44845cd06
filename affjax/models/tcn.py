"""Dilated causal temporal convolutional network (TCN).

Mirrors the reference's TemporalConvNet (model/temporal_convolutional_model.py
in sucv/ABAW2): level i is a residual block of two weight-normalised causal
convolutions with dilation 2**i, each followed by LeakyReLU(0.01) and channel
dropout; the residual is the input or a plain 1x1 convolution when the widths
differ, and the block output is LeakyReLU(net + residual).

Layout is `[batch, time, channels]` throughout (the reference is channels
first). Weight-normalised kernels are stored as `v` with layout
`[kernel, in, out]` and `g` with shape `[out]`, so PyTorch's `weight_v`
(`[out, in, kernel]`) and `weight_g` (`[out, 1, 1]`) convert exactly.
"""

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Initializer = nn.initializers.Initializer

# Reference init: xavier-uniform with gain sqrt(2) on the full conv weight.
# variance_scaling(gain**2, fan_avg, uniform) with the kernel axis as the
# receptive field is exactly that bound: sqrt(2) * sqrt(6 / (fan_in + fan_out)).
xavier_uniform_gain_sqrt2 = nn.initializers.variance_scaling(
  2.0, "fan_avg", "uniform", in_axis=-2, out_axis=-1
)

LEAKY_SLOPE = 0.01  # PyTorch nn.LeakyReLU default, used by the reference.


def torch_default_bias_init(fan_in: int) -> Initializer:
  """PyTorch's default conv/linear bias init: U(-1/sqrt(fan_in), +...)."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _weight_norm_init(unused_key: Array, v: Array) -> Array:
  # PyTorch's weight_norm initialises g to ||v|| so that w == v at start.
  return jnp.sqrt(jnp.sum(jnp.square(v), axis=(0, 1)))


def causal_conv(x: Array, kernel: Array, dilation: int) -> Array:
  """Causal 1-D convolution, `[B, T, Cin] x [K, Cin, Cout] -> [B, T, Cout]`.

  Left padding by (K - 1) * dilation equals the reference's symmetric padding
  followed by chopping the trailing (K - 1) * dilation outputs.
  """
  pad = (kernel.shape[0] - 1) * dilation
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    window_strides=(1,),
    padding=[(pad, 0)],
    rhs_dilation=(dilation,),
    dimension_numbers=("NWC", "WIO", "NWC"),
  )


class WeightNormCausalConv(nn.Module):
  """Weight-normalised causal conv: w = g * v / ||v|| (norm over kernel, in).

  Attributes:
    features: output channels.
    kernel_size: taps along time.
    dilation: spacing between taps, in frames.
    dtype: computation dtype; parameters and the weight norm stay float32.
  """

  features: int
  kernel_size: int
  dilation: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """`[B, T, Cin] -> [B, T, features]`."""
    in_features = x.shape[-1]
    v = self.param(
      "v",
      xavier_uniform_gain_sqrt2,
      (self.kernel_size, in_features, self.features),
    )
    g = self.param("g", _weight_norm_init, v)
    bias = self.param(
      "bias",
      torch_default_bias_init(in_features * self.kernel_size),
      (self.features,),
    )
    norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=(0, 1)))
    kernel = v * (g / norm)
    x = x.astype(self.dtype)
    return causal_conv(
      x, kernel.astype(self.dtype), self.dilation
    ) + bias.astype(self.dtype)


class TemporalBlock(nn.Module):
  """One TCN level: two weight-normalised causal convs plus a residual.

  Attributes:
    features: output channels.
    kernel_size: taps per conv.
    dilation: 2**level in the reference.
    dropout: channel-dropout rate after each conv.
    dtype: computation dtype (parameters stay float32).
  """

  features: int
  kernel_size: int
  dilation: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    """`[B, T, Cin] -> [B, T, features]`."""
    # The reference applies nn.Dropout2d to [B, C, T] tensors: whole channels
    # of a sequence are dropped together, i.e. one mask per (batch, channel)
    # broadcast over time.
    h = x
    for name in ("conv1", "conv2"):
      h = WeightNormCausalConv(
        self.features,
        self.kernel_size,
        self.dilation,
        dtype=self.dtype,
        name=name,
      )(h)
      h = nn.leaky_relu(h, LEAKY_SLOPE)
      h = nn.Dropout(self.dropout, broadcast_dims=(1,))(
        h, deterministic=not train
      )
    if x.shape[-1] != self.features:
      in_features = x.shape[-1]
      x = nn.Conv(
        self.features,
        (1,),
        kernel_init=xavier_uniform_gain_sqrt2,
        bias_init=torch_default_bias_init(in_features),
        dtype=self.dtype,
        name="downsample",
      )(x)
    return nn.leaky_relu(h + x, LEAKY_SLOPE)


class TemporalConvNet(nn.Module):
  """Stack of TemporalBlocks with dilations 1, 2, 4, ...

  The receptive field is 1 + 2 * (kernel_size - 1) * (2**levels - 1) frames
  (121 for kernel 5 and 4 levels); the output at frame t depends only on
  frames <= t.

  Attributes:
    channels: output width of each level; the last one is the output width.
    kernel_size: taps per convolution.
    dropout: channel-dropout rate inside every block.
    dtype: computation dtype of the activations ('float32' or 'bfloat16');
      parameters stay float32.
  """

  channels: Sequence[int]
  kernel_size: int = 5
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    """Runs the TCN.

    Args:
      x: `[batch, time, in_features]`.
      train: enables dropout (needs a 'dropout' rng).

    Returns:
      `[batch, time, channels[-1]]`.
    """
    x = x.astype(self.dtype)
    for level, features in enumerate(self.channels):
      x = TemporalBlock(
        features,
        self.kernel_size,
        2**level,
        self.dropout,
        dtype=self.dtype,
        name=f"block{level}",
      )(x, train=train)
    return x


def receptive_field(kernel_size: int, num_levels: int) -> int:
  """Frames seen by one output of a TCN (two convs per level)."""
  return 1 + 2 * (kernel_size - 1) * (2**num_levels - 1)
