"""VGGish audio embedding network in Flax, with checkpoint converters.

Architecture of the public VGGish (TF-slim `vggish_slim.py`): input
`[N, 96, 64, 1]` log-mel patches; 3x3 SAME convolutions with ReLU and 2x2
stride-2 max-pools: conv1 64, pool, conv2 128, pool, conv3_1/conv3_2 256,
pool, conv4_1/conv4_2 512, pool → `[N, 6, 4, 512]`, flattened in NHWC order
(h, w, c) to 12288; fc1_1 4096 ReLU, fc1_2 4096 ReLU, fc2 128. The TF
model's embedding (fc2) has *no* activation; the PyTorch port
(harritaylor/torchvggish) adds a ReLU after it, selectable here with
`final_relu=True`. The ABAW2 reference used the raw TF embedding without
PCA, which is this module's default output.

Parameter names follow the TF scopes: `conv1`, `conv2`, `conv3_1`,
`conv3_2`, `conv4_1`, `conv4_2`, `fc1_1`, `fc1_2`, `fc2`, each with `kernel`
and `bias`.

Converters return a Flax `params` dict from
* the torch port's state_dict (`features.{0,3,6,8,11,13}`, Conv2d weights
  `[out, in, 3, 3]`; `embeddings.{0,2,4}`, Linear weights `[out, in]`; the
  port transposes to NHWC before flattening, so fc weights only need a
  transpose);
* the TF-slim checkpoint variables (`vggish/conv1/weights` `[3, 3, in, out]`,
  `vggish/conv3/conv3_1/biases`, `vggish/fc1/fc1_1/weights` `[in, out]`, ...)
  given as a dict of numpy arrays, or read from a checkpoint file.
`postprocess` applies AudioSet's PCA whitening and 8-bit quantisation.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

NUM_FRAMES = 96
NUM_BANDS = 64
EMBEDDING_SIZE = 128
CONV_NAMES = ("conv1", "conv2", "conv3_1", "conv3_2", "conv4_1", "conv4_2")
FC_NAMES = ("fc1_1", "fc1_2")
# Layers followed by a 2x2 max-pool.
_POOL_AFTER = ("conv1", "conv2", "conv3_2", "conv4_2")
# AudioSet quantisation range of the PCA-whitened embedding.
QUANTIZE_MIN = -2.0
QUANTIZE_MAX = 2.0

Params = Mapping[str, Any]


class VGGish(nn.Module):
  """VGGish embedding network.

  Attributes:
    conv_widths: output channels of conv1, conv2, conv3_1, conv3_2, conv4_1,
      conv4_2 (public model: 64, 128, 256, 256, 512, 512).
    fc_widths: widths of fc1_1 and fc1_2 (public model: 4096, 4096).
    embedding_size: width of the fc2 embedding layer.
    final_relu: apply ReLU to the embedding (torch port) or not (TF model).
  """

  conv_widths: Sequence[int] = (64, 128, 256, 256, 512, 512)
  fc_widths: Sequence[int] = (4096, 4096)
  embedding_size: int = EMBEDDING_SIZE
  final_relu: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Embeds log-mel patches.

    Args:
      x: `[N, 96, 64, 1]` (or `[N, 96, 64]`) log-mel examples.
      train: unused (no dropout or batch norm); kept for the house signature.

    Returns:
      `[N, embedding_size]` embeddings.
    """
    del train
    if x.ndim == 3:
      x = x[..., None]
    for name, width in zip(CONV_NAMES, self.conv_widths, strict=True):
      x = nn.relu(nn.Conv(width, (3, 3), padding="SAME", name=name)(x))
      if name in _POOL_AFTER:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    x = x.reshape(x.shape[0], -1)  # NHWC flatten, as slim.flatten.
    for name, width in zip(FC_NAMES, self.fc_widths, strict=True):
      x = nn.relu(nn.Dense(width, name=name)(x))
    x = nn.Dense(self.embedding_size, name="fc2")(x)
    return nn.relu(x) if self.final_relu else x


# Small variant for tests: same layers and names, narrow widths.
_TINY = {"conv_widths": (4, 8, 8, 8, 8, 8), "fc_widths": (16, 16)}


def module_from_params(params: Params, final_relu: bool = False) -> VGGish:
  """The `VGGish` whose widths match `params` (full size or a narrow one)."""
  try:
    convs = tuple(int(params[n]["kernel"].shape[-1]) for n in CONV_NAMES)
    fcs = tuple(int(params[n]["kernel"].shape[-1]) for n in FC_NAMES)
    emb = int(params["fc2"]["kernel"].shape[-1])
  except KeyError as e:
    raise KeyError(
      f"VGGish params lack layer {e}; have {sorted(params)}."
    ) from e
  return VGGish(
    conv_widths=convs, fc_widths=fcs, embedding_size=emb, final_relu=final_relu
  )


def _param_shapes(model: VGGish) -> dict[str, dict[str, tuple[int, ...]]]:
  x = jax.ShapeDtypeStruct((1, NUM_FRAMES, NUM_BANDS, 1), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)[
    "params"
  ]
  return {
    layer: {leaf: tuple(s.shape) for leaf, s in leaves.items()}
    for layer, leaves in shapes.items()
  }


def init_params(seed: int = 0, *, tiny: bool = False) -> dict[str, Any]:
  """Random VGGish params (`tiny=True`: the narrow test variant).

  Kernels are N(0, 1 / fan_in) (LeCun normal), biases zero, drawn with
  numpy's PCG64 from `seed`: for the 72M weights of the full model this is
  several times faster than JAX's PRNG on CPU, and equally deterministic.
  """
  shapes = _param_shapes(VGGish(**_TINY) if tiny else VGGish())
  rng = np.random.default_rng(seed)
  params = {}
  for layer in CONV_NAMES + FC_NAMES + ("fc2",):  # Fixed draw order.
    kernel_shape = shapes[layer]["kernel"]
    fan_in = int(np.prod(kernel_shape[:-1]))
    kernel = rng.standard_normal(kernel_shape, dtype=np.float32)
    kernel *= np.float32(1.0 / np.sqrt(fan_in))
    params[layer] = {
      "kernel": kernel,
      "bias": np.zeros(shapes[layer]["bias"], np.float32),
    }
  return params


@functools.lru_cache(maxsize=1)
def default_params() -> dict[str, Any]:
  """Fixed-seed (0) random full-size params, shared by every call.

  Used when no converted checkpoint is given, so that all trials of a cache
  are embedded by the same network.
  """
  return init_params(0)


@functools.lru_cache(maxsize=8)
def _apply_fn(model: VGGish) -> Callable[[Params, jax.Array], jax.Array]:
  return jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))


def embed(
  examples: np.ndarray,
  params: Params | None = None,
  *,
  batch_size: int = 64,
  final_relu: bool = False,
) -> np.ndarray:
  """Embeds `[N, 96, 64]` examples in fixed-size jitted batches.

  Batches are padded to one shape (the smallest power of two >= N, capped at
  `batch_size`) so a clip compiles at most once per size bucket.

  Returns:
    `[N, embedding_size]` float32 numpy array.
  """
  if params is None:
    params = default_params()
  examples = np.asarray(examples, np.float32)
  if examples.ndim == 3:
    examples = examples[..., None]
  if examples.shape[1:] != (NUM_FRAMES, NUM_BANDS, 1):
    raise ValueError(
      f"VGGish examples must be [N, {NUM_FRAMES}, "
      f"{NUM_BANDS}(, 1)], got {examples.shape}."
    )
  model = module_from_params(params, final_relu=final_relu)
  n = examples.shape[0]
  if n == 0:
    return np.zeros((0, model.embedding_size), np.float32)
  bs = min(int(batch_size), 1 << (n - 1).bit_length())
  apply = _apply_fn(model)
  params = jax.device_put(params)
  out = []
  for start in range(0, n, bs):
    chunk = examples[start : start + bs]
    pad = bs - chunk.shape[0]
    if pad:
      chunk = np.concatenate(
        [chunk, np.zeros((pad,) + chunk.shape[1:], np.float32)]
      )
    out.append(np.asarray(apply(params, chunk))[: bs - pad])
  return np.concatenate(out).astype(np.float32, copy=False)


def _as_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # torch.Tensor, without importing torch.
    value = value.detach().cpu().numpy()
  return np.asarray(value, np.float32)


def _check_against_init(params: dict[str, Any], source: str) -> None:
  """Raises if the converted shapes do not form a consistent VGGish."""
  expected = _param_shapes(module_from_params(params))
  for layer, leaves in expected.items():
    for leaf, shape in leaves.items():
      got = tuple(params[layer][leaf].shape)
      if got != shape:
        raise ValueError(
          f"{source}: {layer}/{leaf} has shape {got}, the "
          f"architecture needs {shape}."
        )


def _take(source: Mapping[str, Any], key: str, what: str) -> np.ndarray:
  if key not in source:
    raise KeyError(f"{what} lacks key {key!r}; it has {sorted(source)}.")
  return _as_numpy(source[key])


# torch port: Sequential indices of the convs in `features` and of the
# Linears in `embeddings`.
_TORCH_KEYS = dict(
  zip(
    CONV_NAMES,
    (
      "features.0",
      "features.3",
      "features.6",
      "features.8",
      "features.11",
      "features.13",
    ),
  )
)
_TORCH_KEYS.update(
  fc1_1="embeddings.0", fc1_2="embeddings.2", fc2="embeddings.4"
)


def params_from_torch_state_dict(
  state_dict: Mapping[str, Any], *, prefix: str = "", strict: bool = True
) -> dict[str, Any]:
  """Flax params from a harritaylor/torchvggish `VGG` state_dict.

  Args:
    state_dict: tensors or arrays keyed `features.N.weight|bias`,
      `embeddings.N.weight|bias` (after `prefix`).
    prefix: prefix of the VGGish keys in `state_dict` (e.g. 'vggish.').
    strict: raise on unexpected keys under `prefix` (PCA keys `pproc.*` /
      `pca_*` are always ignored).

  Returns:
    params for `VGGish` (use `final_relu=True` to reproduce the port's
    output exactly; the default gives the original TF embedding).

  Raises:
    KeyError: a needed key is missing (named). ValueError: unexpected keys
    or inconsistent shapes (named).
  """
  what = "torch VGGish state_dict"
  params = {}
  for name, tkey in _TORCH_KEYS.items():
    w = _take(state_dict, f"{prefix}{tkey}.weight", what)
    b = _take(state_dict, f"{prefix}{tkey}.bias", what)
    # Conv2d [out, in, kh, kw] → HWIO; Linear [out, in] → [in, out].
    kernel = w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T
    params[name] = {"kernel": kernel, "bias": b}
  if strict:
    used = {
      f"{prefix}{k}.{s}"
      for k in _TORCH_KEYS.values()
      for s in ("weight", "bias")
    }
    extra = sorted(
      k
      for k in state_dict
      if k.startswith(prefix)
      and k not in used
      and "pca" not in k
      and not k[len(prefix) :].startswith("pproc.")
    )
    if extra:
      raise ValueError(f"{what} has unexpected keys {extra}.")
  _check_against_init(params, what)
  return params


_TF_SCOPES = {
  "conv1": "vggish/conv1",
  "conv2": "vggish/conv2",
  "conv3_1": "vggish/conv3/conv3_1",
  "conv3_2": "vggish/conv3/conv3_2",
  "conv4_1": "vggish/conv4/conv4_1",
  "conv4_2": "vggish/conv4/conv4_2",
  "fc1_1": "vggish/fc1/fc1_1",
  "fc1_2": "vggish/fc1/fc1_2",
  "fc2": "vggish/fc2",
}


def params_from_tf_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
  """Flax params from the TF-slim VGGish variables.

  Args:
    variables: arrays keyed by checkpoint variable name, e.g.
      `vggish/conv1/weights` `[3, 3, 1, 64]`, `vggish/fc1/fc1_1/biases`
      (a trailing ':0' tensor suffix is accepted). Other keys (optimizer
      slots, global_step) are ignored.

  Raises:
    KeyError: a needed variable is missing (named). ValueError: shapes do
    not form a consistent VGGish (named).
  """
  variables = {k.removesuffix(":0"): v for k, v in variables.items()}
  what = "TF VGGish variables"
  params = {}
  for name, scope in _TF_SCOPES.items():
    # slim layouts already match Flax: conv HWIO, dense [in, out].
    params[name] = {
      "kernel": _take(variables, f"{scope}/weights", what),
      "bias": _take(variables, f"{scope}/biases", what),
    }
  _check_against_init(params, what)
  return params


def load_tf_checkpoint(path: str) -> dict[str, Any]:
  """Reads a TF VGGish checkpoint (e.g. `vggish_model.ckpt`) to Flax params.

  Imports TensorFlow lazily. Raises ValueError naming the path when it cannot
  be read.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  try:
    reader = tf.train.load_checkpoint(path)
  except (tf.errors.OpError, ValueError) as e:
    raise ValueError(f"Cannot read TF checkpoint {path!r}: {e}") from e
  names = reader.get_variable_to_shape_map()
  return params_from_tf_variables(
    {n: reader.get_tensor(n) for n in names if n.startswith("vggish/")}
  )


def load_params(path: str | os.PathLike) -> dict[str, Any]:
  """Flax VGGish params from a checkpoint file, by kind.

  Args:
    path: a torchvggish state_dict (`.pth`/`.pt`, e.g. `vggish-10086976.pth`;
      needs torch) or a TF checkpoint (e.g. `vggish_model.ckpt`, V1 file or
      V2 prefix).

  Raises:
    FileNotFoundError: nothing exists at `path` (named).
    ValueError/KeyError: the file is not a readable VGGish checkpoint.
  """
  path = os.fspath(path)
  if not (os.path.exists(path) or os.path.exists(path + ".index")):
    raise FileNotFoundError(f"VGGish checkpoint {path!r} does not exist.")
  if path.endswith((".pth", ".pt")):
    import torch  # pylint: disable=g-import-not-at-top

    try:
      state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises assorted types for bad files.
      raise ValueError(f"Cannot read torch checkpoint {path!r}: {e}") from e
    return params_from_torch_state_dict(state_dict)
  return load_tf_checkpoint(path)


def load_pca_params(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Reads AudioSet's `vggish_pca_params.npz` for `postprocess`.

  Returns:
    `(pca_eigen_vectors [128, 128], pca_means [128])` float32.

  Raises:
    FileNotFoundError / KeyError naming the file or the missing array.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"VGGish PCA file {path!r} does not exist.")
  with np.load(path) as data:
    for key in ("pca_eigen_vectors", "pca_means"):
      if key not in data:
        raise KeyError(f"{path!r} lacks array {key!r}; has {data.files}.")
    return (
      data["pca_eigen_vectors"].astype(np.float32),
      data["pca_means"].reshape(-1).astype(np.float32),
    )


def postprocess(
  embeddings: jax.Array,
  pca_eigen_vectors: jax.Array,
  pca_means: jax.Array,
  *,
  quantize: bool = True,
) -> jax.Array:
  """AudioSet PCA whitening (+ 8-bit quantisation) of VGGish embeddings.

  Args:
    embeddings: `[N, 128]` raw embeddings (`final_relu=False` output).
    pca_eigen_vectors: `[128, 128]`, rows are output dimensions.
    pca_means: `[128]` or `[128, 1]`.
    quantize: map the clipped [-2, 2] values to uint8 0..255 by truncation,
      as the original release; False returns the clipped float values.

  Returns:
    `[N, 128]` uint8 (quantize) or float32.
  """
  embeddings = jnp.asarray(embeddings, jnp.float32)
  means = jnp.reshape(jnp.asarray(pca_means, jnp.float32), (-1,))
  if embeddings.ndim != 2 or embeddings.shape[1] != means.shape[0]:
    raise ValueError(
      f"embeddings {embeddings.shape} do not match PCA means {means.shape}."
    )
  whitened = (embeddings - means) @ jnp.asarray(
    pca_eigen_vectors, jnp.float32
  ).T
  clipped = jnp.clip(whitened, QUANTIZE_MIN, QUANTIZE_MAX)
  if not quantize:
    return clipped
  scaled = (clipped - QUANTIZE_MIN) * (255.0 / (QUANTIZE_MAX - QUANTIZE_MIN))
  return scaled.astype(jnp.uint8)
