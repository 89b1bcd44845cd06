"""IR-50 / IR-SE-50 face backbone (ArcFace-style improved residual network).

Mirrors the reference's `Backbone` (model/arcface_model.py in sucv/ABAW2) with
the 40x40 output layer that its `my_res50` installs: a 3x3 stem, four stages
of pre-activation "bottleneck_IR" units (optionally with squeeze-excitation),
then BatchNorm2d -> Dropout -> flatten -> Linear -> BatchNorm1d, and finally an
L2 normalisation of the 512-d embedding.

Layout is NHWC (`[batch, height, width, channels]`). Parameter names follow
the reference's module tree so that conversion stays a table lookup:
`input_conv`, `input_bn`, `input_prelu`, `body_<i>/{res_bn1, res_conv1,
res_prelu, res_conv2, res_bn2, se/fc1, se/fc2, shortcut_conv, shortcut_bn}`,
`output_bn2d`, `output_dense`, `output_bn1d`. BatchNorm statistics live in the
`batch_stats` collection.

Known train-mode difference: PyTorch updates BatchNorm running variances with
the unbiased batch variance, flax.linen.BatchNorm with the biased one. Eval
outputs are identical given the same statistics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import functools
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Variables = dict[str, dict[str, Any]]

# PyTorch BatchNorm defaults used by the reference: eps 1e-5 and momentum 0.1
# (weight of the new batch), i.e. flax momentum 0.9 (weight of the old value).
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9
PRELU_INIT = 0.25  # torch.nn.PReLU default slope.

# PyTorch's default Conv2d / Linear init (kaiming-uniform with a=sqrt(5)) is a
# uniform distribution with variance 1 / (3 * fan_in).
torch_default_kernel_init = nn.initializers.variance_scaling(
    1.0 / 3.0, 'fan_in', 'uniform')


def _torch_default_bias_init(key, shape, dtype=jnp.float32, *, fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class PReLU(nn.Module):
  """PReLU with one learned slope per channel (last axis), as torch.nn.PReLU."""
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    slope = self.param('negative_slope', nn.initializers.constant(PRELU_INIT),
                       (x.shape[-1],), self.param_dtype)
    return jnp.where(x >= 0, x, slope.astype(x.dtype) * x)


class SqueezeExcite(nn.Module):
  """Squeeze-excitation gate: global average pool, bottleneck MLP, sigmoid.

  The reference uses 1x1 convolutions without bias on the pooled map; on a
  `[batch, 1, 1, channels]` tensor those are bias-free dense layers.
  """
  reduction: int = 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    channels = x.shape[-1]
    dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype,
                              kernel_init=torch_default_kernel_init)
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.relu(dense(channels // self.reduction, name='fc1')(s))
    s = nn.sigmoid(dense(channels, name='fc2')(s))
    return x * s


class IRUnit(nn.Module):
  """One bottleneck_IR(_SE) unit: pre-activation residual branch + shortcut.

  Residual: BN -> conv3x3 (stride 1) -> PReLU -> conv3x3 (stride) -> BN
  [-> SE]. Shortcut: the input subsampled by `stride` (the reference's 1x1
  max-pool) when the width is unchanged, else conv1x1 (stride) -> BN.
  """
  features: int
  stride: int = 1
  se_reduction: int = 0  # 0 disables the SE gate (IR); 16 in IR-SE.
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    norm = functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON, dtype=self.dtype)
    conv = functools.partial(
        nn.Conv, self.features, use_bias=False, dtype=self.dtype,
        kernel_init=torch_default_kernel_init)
    s = self.stride
    if x.shape[-1] == self.features:
      shortcut = x[:, ::s, ::s, :]
    else:
      shortcut = conv((1, 1), strides=(s, s), padding='VALID',
                      name='shortcut_conv')(x)
      shortcut = norm(name='shortcut_bn')(shortcut)

    # Explicit symmetric padding: 'SAME' would pad (0, 1) at stride 2 on even
    # sizes, which differs from PyTorch's padding=1.
    y = norm(name='res_bn1')(x)
    y = conv((3, 3), padding=((1, 1), (1, 1)), name='res_conv1')(y)
    y = PReLU(name='res_prelu')(y)
    y = conv((3, 3), strides=(s, s), padding=((1, 1), (1, 1)),
             name='res_conv2')(y)
    y = norm(name='res_bn2')(y)
    if self.se_reduction:
      y = SqueezeExcite(self.se_reduction, dtype=self.dtype, name='se')(y)
    return y + shortcut


class IResNet(nn.Module):
  """ArcFace-style IResNet producing L2-normalised face embeddings.

  The input layer has `stage_channels[0]` channels (64 in IR-50), and the
  first unit of every stage applies that stage's stride.

  Attributes:
    stage_channels: output channels of the four stages.
    stage_units: number of units per stage ((3, 4, 14, 3) for 50 layers).
    stage_strides: stride of each stage's first unit.
    se_reduction: squeeze-excitation reduction; 0 = plain IR units.
    embedding_dim: size of the output embedding (512).
    dropout_rate: dropout before the output dense layer (0.4).
    dtype: computation dtype (parameters stay float32; the embedding is
      normalised and returned in float32).
  """
  stage_channels: Sequence[int] = (64, 128, 256, 512)
  stage_units: Sequence[int] = (3, 4, 14, 3)
  stage_strides: Sequence[int] = (1, 2, 2, 2)
  se_reduction: int = 0
  embedding_dim: int = 512
  dropout_rate: float = 0.4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    """Embeds face crops.

    Args:
      x: `[batch, height, width, 3]` float images in [-1, 1] (40x40 in the
        reference: pixel / 255 normalised with mean 0.5 and std 0.5).
      train: BatchNorm uses batch statistics (and updates `batch_stats`) and
        dropout is active; needs a 'dropout' rng when the rate is non-zero.

    Returns:
      `[batch, embedding_dim]` float32 embeddings of unit L2 norm.
    """
    if x.ndim != 4:
      raise ValueError(f'IResNet expects [batch, height, width, channels] '
                       f'images, found shape {x.shape}')
    norm = functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON, dtype=self.dtype)
    x = x.astype(self.dtype)
    x = nn.Conv(self.stage_channels[0], (3, 3), padding=((1, 1), (1, 1)),
                use_bias=False, dtype=self.dtype,
                kernel_init=torch_default_kernel_init, name='input_conv')(x)
    x = norm(name='input_bn')(x)
    x = PReLU(name='input_prelu')(x)

    index = 0
    for features, units, stride in zip(self.stage_channels, self.stage_units,
                                        self.stage_strides):
      for u in range(units):
        x = IRUnit(features, stride if u == 0 else 1, self.se_reduction,
                   dtype=self.dtype, name=f'body_{index}')(x, train=train)
        index += 1

    x = norm(name='output_bn2d')(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    # The reference flattens NCHW (channel-major); flattening in the same
    # order keeps the dense kernel identical to the PyTorch weight transposed.
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    x = nn.Dense(
        self.embedding_dim, dtype=self.dtype,
        kernel_init=torch_default_kernel_init,
        bias_init=functools.partial(_torch_default_bias_init,
                                    fan_in=x.shape[-1]),
        name='output_dense')(x)
    x = norm(name='output_bn1d')(x)
    x = x.astype(jnp.float32)
    # The reference divides by the norm unguarded; the floor only avoids NaN
    # for an exactly-zero vector and changes nothing otherwise.
    l2 = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.maximum(l2, 1e-12)


IR50 = functools.partial(IResNet)
IRSE50 = functools.partial(IResNet, se_reduction=16)
# CPU-friendly stand-in for tests and the demo config: one unit per stage at a
# quarter of the width, same 40x40 input and 512-d output. The first unit keeps
# its width (max-pool shortcut), the others change it (conv shortcut).
IRTiny = functools.partial(IResNet, stage_channels=(16, 32, 64, 128),
                           stage_units=(1, 1, 1, 1))
IRSETiny = functools.partial(IRTiny, se_reduction=4)

# Backbone names as used in config.model.backbone.name.
BACKBONES = {
    'ir50': IR50,
    'ir_se50': IRSE50,
    'tiny': IRTiny,
    'tiny_se': IRSETiny,
}

# Gradual-release groups per backbone name, in release order: regexes over
# '/'-joined backbone-relative parameter paths, unanchored (for `re.search`,
# so a caller may prepend the backbone's prefix in the full model). They are
# the reference's index ranges into `model.parameters()` (base/
# parameter_control.py), whose first parameters are the backbone's in the
# order input_layer, output_layer, body:
#   ir:    (4, 10) = output layer; (163, 187) = body.21-23 (stage 4);
#          (142, 163) = body.18-20 (last three units of stage 3).
#   ir_se: (4, 10) = output layer; (205, 235) = body.21-23;
#          (187, 205) = body.19-20.
# The tiny variants follow the IR-50 pattern: output layer, last stage, the
# unit before it.
_OUTPUT_LAYER = r'output_(bn2d|dense|bn1d)/'
RELEASE_GROUPS: dict[str, list[list[str]]] = {
    'ir50': [[_OUTPUT_LAYER], [r'body_(21|22|23)/'], [r'body_(18|19|20)/']],
    'ir_se50': [[_OUTPUT_LAYER], [r'body_(21|22|23)/'], [r'body_(19|20)/']],
    'tiny': [[_OUTPUT_LAYER], [r'body_3/'], [r'body_2/']],
    'tiny_se': [[_OUTPUT_LAYER], [r'body_3/'], [r'body_2/']],
}
