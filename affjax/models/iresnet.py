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

import functools
import math
import re
from collections.abc import Mapping, Sequence
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
  1.0 / 3.0, "fan_in", "uniform"
)


def _torch_default_bias_init(key, shape, dtype=jnp.float32, *, fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _chunk_size(n: int, chunk: int) -> int:
  """Largest divisor of `n` <= `chunk`; 0 (no chunking) if under chunk/2."""
  if chunk <= 0 or n <= chunk:
    return 0
  size = max(d for d in range(1, chunk + 1) if n % d == 0)
  return size if 2 * size >= chunk else 0


def conv2d(
  x: Array,
  kernel: Array,
  strides: tuple[int, int],
  padding: Any,
  chunk: int = 0,
) -> Array:
  """NHWC x HWIO convolution, optionally over `chunk` images at a time.

  XLA:CPU's convolution is faster per image on small batches (IR-50's
  convs on 1024 crops run 1.2-1.3x faster in 64-crop chunks;
  `benchmarks/backbone_conv.py`), so on CPU the frozen forward over 2400
  crops is faster as a loop over chunks. Same result as one call.

  Args:
    x: `[N, H, W, Cin]`.
    kernel: `[kh, kw, Cin, Cout]`.
    strides: `(sh, sw)`.
    padding: 'VALID' or `((top, bottom), (left, right))`.
    chunk: images per call, 0 = one call; the largest divisor of N up to
      `chunk` is used (no chunking if that is under `chunk / 2`).

  Returns:
    `[N, H', W', Cout]`.
  """

  def conv(images):
    return jax.lax.conv_general_dilated(
      images,
      kernel,
      strides,
      padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )

  n = x.shape[0]
  size = _chunk_size(n, chunk)
  if not size:
    return conv(x)
  count = n // size
  # Chunk j holds images j, j + count, ...: the batch axis's major factor is
  # the within-chunk one, so a batch sharding carries over to every chunk.
  grouped = x.reshape(size, count, *x.shape[1:])
  out_shape = jax.eval_shape(conv, grouped[:, 0]).shape

  def body(j, out):
    y = conv(jax.lax.dynamic_index_in_dim(grouped, j, 1, keepdims=False))
    return jax.lax.dynamic_update_index_in_dim(out, y, j, 1)

  out = jnp.zeros((size, count, *out_shape[1:]), x.dtype)
  out = jax.lax.fori_loop(0, count, body, out)
  return out.reshape(n, *out.shape[2:])


class Conv(nn.Module):
  """Bias-free 2-D conv with nn.Conv's `kernel` parameter, chunked (`conv2d`).

  Used instead of nn.Conv when `conv_chunk` > 0; the parameter tree is the
  same, so checkpoints and the converter do not change.
  """

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: Any = "VALID"
  chunk: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """`[N, H, W, Cin] -> [N, H', W', features]`."""
    kernel = self.param(
      "kernel",
      torch_default_kernel_init,
      (*self.kernel_size, x.shape[-1], self.features),
    )
    return conv2d(
      x.astype(self.dtype),
      kernel.astype(self.dtype),
      self.strides,
      self.padding,
      self.chunk,
    )


def _conv(
  features: int,
  kernel_size: tuple[int, int],
  *,
  chunk: int,
  dtype: Any,
  name: str,
  strides: tuple[int, int] = (1, 1),
  padding: Any = "VALID",
) -> nn.Module:
  if chunk > 0:
    return Conv(
      features, kernel_size, strides, padding, chunk, dtype, name=name
    )
  return nn.Conv(
    features,
    kernel_size,
    strides=strides,
    padding=padding,
    use_bias=False,
    dtype=dtype,
    kernel_init=torch_default_kernel_init,
    name=name,
  )


def _batch_norm(*, train: bool, dtype: Any, name: str) -> nn.BatchNorm:
  # Two-pass variance, as PyTorch computes it; the fast E[x^2] - E[x]^2 form
  # loses precision when the mean is large relative to the spread.
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=BN_MOMENTUM,
    epsilon=BN_EPSILON,
    use_fast_variance=False,
    dtype=dtype,
    name=name,
  )


class PReLU(nn.Module):
  """PReLU with one learned slope per channel (last axis), as torch.nn.PReLU."""

  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    slope = self.param(
      "negative_slope",
      nn.initializers.constant(PRELU_INIT),
      (x.shape[-1],),
      self.param_dtype,
    )
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
    dense = functools.partial(
      nn.Dense,
      use_bias=False,
      dtype=self.dtype,
      kernel_init=torch_default_kernel_init,
    )
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.relu(dense(channels // self.reduction, name="fc1")(s))
    s = nn.sigmoid(dense(channels, name="fc2")(s))
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
  conv_chunk: int = 0  # images per conv call (`conv2d`); 0 = all at once.
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    norm = functools.partial(_batch_norm, train=train, dtype=self.dtype)
    conv = functools.partial(
      _conv, self.features, chunk=self.conv_chunk, dtype=self.dtype
    )
    s = self.stride
    if x.shape[-1] == self.features:
      shortcut = x[:, ::s, ::s, :]
    else:
      shortcut = conv(
        (1, 1), strides=(s, s), padding="VALID", name="shortcut_conv"
      )(x)
      shortcut = norm(name="shortcut_bn")(shortcut)

    # Explicit symmetric padding: 'SAME' would pad (0, 1) at stride 2 on even
    # sizes, which differs from PyTorch's padding=1.
    y = norm(name="res_bn1")(x)
    y = conv((3, 3), padding=((1, 1), (1, 1)), name="res_conv1")(y)
    y = PReLU(name="res_prelu")(y)
    y = conv(
      (3, 3), strides=(s, s), padding=((1, 1), (1, 1)), name="res_conv2"
    )(y)
    y = norm(name="res_bn2")(y)
    if self.se_reduction:
      y = SqueezeExcite(self.se_reduction, dtype=self.dtype, name="se")(y)
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
    conv_chunk: images per convolution call (see `conv2d`); 0 = the whole
      batch at once. A CPU speed setting, same results.
    dtype: computation dtype (parameters stay float32; the embedding is
      normalised and returned in float32).
  """

  stage_channels: Sequence[int] = (64, 128, 256, 512)
  stage_units: Sequence[int] = (3, 4, 14, 3)
  stage_strides: Sequence[int] = (1, 2, 2, 2)
  se_reduction: int = 0
  embedding_dim: int = 512
  dropout_rate: float = 0.4
  conv_chunk: int = 0
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
      raise ValueError(
        f"IResNet expects [batch, height, width, channels] "
        f"images, found shape {x.shape}"
      )
    norm = functools.partial(_batch_norm, train=train, dtype=self.dtype)
    x = x.astype(self.dtype)
    x = _conv(
      self.stage_channels[0],
      (3, 3),
      padding=((1, 1), (1, 1)),
      chunk=self.conv_chunk,
      dtype=self.dtype,
      name="input_conv",
    )(x)
    x = norm(name="input_bn")(x)
    x = PReLU(name="input_prelu")(x)

    index = 0
    for features, units, stride in zip(
      self.stage_channels, self.stage_units, self.stage_strides
    ):
      for u in range(units):
        x = IRUnit(
          features,
          stride if u == 0 else 1,
          self.se_reduction,
          self.conv_chunk,
          dtype=self.dtype,
          name=f"body_{index}",
        )(x, train=train)
        index += 1

    x = norm(name="output_bn2d")(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    # The reference flattens NCHW (channel-major); flattening in the same
    # order keeps the dense kernel identical to the PyTorch weight transposed.
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    x = nn.Dense(
      self.embedding_dim,
      dtype=self.dtype,
      kernel_init=torch_default_kernel_init,
      bias_init=functools.partial(_torch_default_bias_init, fan_in=x.shape[-1]),
      name="output_dense",
    )(x)
    x = norm(name="output_bn1d")(x)
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
IRTiny = functools.partial(
  IResNet, stage_channels=(16, 32, 64, 128), stage_units=(1, 1, 1, 1)
)
IRSETiny = functools.partial(IRTiny, se_reduction=4)
# The CPU demo's backbone, trained from scratch: half the tiny widths, and the
# first stage already at stride 2 (40 -> 20 -> 10 -> 5 -> 5), about 4x
# cheaper per frame than IRTiny; same 512-d output.
IRDemo = functools.partial(
  IResNet,
  stage_channels=(8, 16, 32, 64),
  stage_units=(1, 1, 1, 1),
  stage_strides=(2, 2, 2, 1),
)

# Backbone names as used in config.model.backbone.name.
BACKBONES = {
  "ir50": IR50,
  "ir_se50": IRSE50,
  "tiny": IRTiny,
  "tiny_se": IRSETiny,
  "demo": IRDemo,
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
_OUTPUT_LAYER = r"output_(bn2d|dense|bn1d)/"
RELEASE_GROUPS: dict[str, list[list[str]]] = {
  "ir50": [[_OUTPUT_LAYER], [r"body_(21|22|23)/"], [r"body_(18|19|20)/"]],
  "ir_se50": [[_OUTPUT_LAYER], [r"body_(21|22|23)/"], [r"body_(19|20)/"]],
  "tiny": [[_OUTPUT_LAYER], [r"body_3/"], [r"body_2/"]],
  "tiny_se": [[_OUTPUT_LAYER], [r"body_3/"], [r"body_2/"]],
  "demo": [[_OUTPUT_LAYER], [r"body_3/"], [r"body_2/"]],
}

# Reference layer name -> (flax module path, layer kind). Body entries are
# relative to `body.<i>.` / `body_<i>/`.
_TOP_LAYERS = {
  "input_layer.0": ("input_conv", "conv"),
  "input_layer.1": ("input_bn", "bn"),
  "input_layer.2": ("input_prelu", "prelu"),
  "output_layer.0": ("output_bn2d", "bn"),
  "output_layer.3": ("output_dense", "linear"),
  "output_layer.4": ("output_bn1d", "bn"),
}
_RES_LAYERS = {
  "res_layer.0": ("res_bn1", "bn"),
  "res_layer.1": ("res_conv1", "conv"),
  "res_layer.2": ("res_prelu", "prelu"),
  "res_layer.3": ("res_conv2", "conv"),
  "res_layer.4": ("res_bn2", "bn"),
}
_SE_LAYERS = {
  "res_layer.5.fc1": ("se/fc1", "se"),
  "res_layer.5.fc2": ("se/fc2", "se"),
}
_SHORTCUT_LAYERS = {
  "shortcut_layer.0": ("shortcut_conv", "conv"),
  "shortcut_layer.1": ("shortcut_bn", "bn"),
}
# Per layer kind: reference leaf -> (collection, flax leaf, transform).
_LEAVES = {
  "conv": {"weight": ("params", "kernel", lambda w: w.transpose(2, 3, 1, 0))},
  "linear": {
    "weight": ("params", "kernel", lambda w: w.T),
    "bias": ("params", "bias", None),
  },
  "se": {"weight": ("params", "kernel", lambda w: w[:, :, 0, 0].T)},
  "prelu": {"weight": ("params", "negative_slope", None)},
  "bn": {
    "weight": ("params", "scale", None),
    "bias": ("params", "bias", None),
    "running_mean": ("batch_stats", "mean", None),
    "running_var": ("batch_stats", "var", None),
  },
}
_BODY_KEY = re.compile(r"body\.(\d+)\.")


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # torch.Tensor, without importing torch.
    value = value.detach().cpu().numpy()
  return np.asarray(value, dtype=np.float32)


def _reference_layers(
  keys: set[str], shapes: Mapping[str, tuple[int, ...]]
) -> dict:
  """Infers the reference's layer list (name -> (flax path, kind)) from keys.

  The unit count comes from the `body.<i>` indices, SE from any SE key, and a
  unit's shortcut kind from its channel counts (BN input vs conv output
  width), falling back to the presence of shortcut keys; missing leaves of the
  inferred layers are then reported by the caller.
  """
  layers = dict(_TOP_LAYERS)
  indices = {int(m.group(1)) for k in keys if (m := _BODY_KEY.match(k))}
  has_se = any(".res_layer.5." in k for k in keys)
  for i in range(max(indices) + 1 if indices else 0):
    unit = dict(_RES_LAYERS)
    if has_se:
      unit.update(_SE_LAYERS)
    in_shape = shapes.get(f"body.{i}.res_layer.0.weight")
    out_shape = shapes.get(f"body.{i}.res_layer.1.weight")
    if in_shape is not None and out_shape is not None:
      conv_shortcut = in_shape[0] != out_shape[0]
    else:
      conv_shortcut = any(
        k.startswith(f"body.{i}.shortcut_layer.") for k in keys
      )
    if conv_shortcut:
      unit.update(_SHORTCUT_LAYERS)
    for name, (path, kind) in unit.items():
      layers[f"body.{i}.{name}"] = (f"body_{i}/{path}", kind)
  return layers


def _set_nested(tree: dict, path: str, value: np.ndarray) -> None:
  *parents, leaf = path.split("/")
  for part in parents:
    tree = tree.setdefault(part, {})
  tree[leaf] = value


def iresnet_variables_from_torch(
  state_dict: Mapping[str, Any], prefix: str = ""
) -> Variables:
  """Converts the reference backbone's PyTorch state dict to Flax variables.

  Args:
    state_dict: reference key names (exactly as `Backbone.state_dict()` has
      them, e.g. `body.3.res_layer.1.weight`) to arrays (numpy or torch).
    prefix: only keys starting with it are converted (e.g. 'spatial.' in the
      fusion model's state dict); other keys are left to the caller.
      `num_batches_tracked` entries are ignored.

  Returns:
    `{'params': ..., 'batch_stats': ...}` for `IResNet` with the architecture
    the keys describe (unit count, SE or not).

  Raises:
    ValueError: if no key has the prefix, or if keys are missing or
      unexpected for the inferred architecture (all of them listed).
  """
  sub = {
    k[len(prefix) :]: v
    for k, v in state_dict.items()
    if k.startswith(prefix) and not k.endswith(".num_batches_tracked")
  }
  if not sub:
    raise ValueError(
      f"no backbone keys with prefix {prefix!r} in the state "
      f"dict; found e.g. {sorted(state_dict)[:5]}"
    )
  shapes = {k: tuple(getattr(v, "shape", ())) for k, v in sub.items()}
  layers = _reference_layers(set(sub), shapes)
  expected = {}
  for name, (path, kind) in layers.items():
    for leaf, (collection, flax_leaf, fn) in _LEAVES[kind].items():
      expected[f"{name}.{leaf}"] = (collection, f"{path}/{flax_leaf}", fn)
  missing = sorted(set(expected) - set(sub))
  unexpected = sorted(set(sub) - set(expected))
  if missing or unexpected:
    raise ValueError(
      f"IResNet state dict (prefix {prefix!r}) does not match the "
      f"reference layout: missing keys {[prefix + k for k in missing]}, "
      f"unexpected keys {[prefix + k for k in unexpected]}"
    )
  variables = {"params": {}, "batch_stats": {}}
  for key, (collection, path, fn) in expected.items():
    value = _to_numpy(sub[key])
    # A contiguous copy: the result must not alias the caller's tensors.
    value = np.array(fn(value) if fn else value, order="C")
    _set_nested(variables[collection], path, value)
  return variables


def iresnet_variables_from_res50(state_dict: Mapping[str, Any]) -> Variables:
  """Converts the pretrained `res50_ir_0.887.pth` layout (reference my_res50).

  That file holds the backbone under `backbone.` and an expression classifier
  under `logits.`, which the reference drops when it keeps only the backbone.

  Raises:
    ValueError: on keys outside `backbone.` / `logits.`, or as
      `iresnet_variables_from_torch` does.
  """
  stray = sorted(
    k for k in state_dict if not k.startswith(("backbone.", "logits."))
  )
  if stray:
    raise ValueError(
      f"res50 state dict: unexpected keys {stray} (expected "
      f"only backbone.* and logits.*)"
    )
  return iresnet_variables_from_torch(state_dict, prefix="backbone.")
