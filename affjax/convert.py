"""Reference PyTorch checkpoints -> Flax variables.

`from_reference_state_dict` maps the key names of the reference's
`model.state_dict()` (sucv/ABAW2: `my_2d1ddy` for the audio-visual model,
`my_2d1d` for the visual-only one) onto the variables of
`affjax.models.build_model(config.model)`. Every key must be used and every
expected key present; otherwise a ValueError lists them all.

Layout changes: conv kernels go from `[out, in, k]` to `[k, in, out]`, linear
weights are transposed, weight-norm `weight_g` `[out, 1, 1]` becomes `g`
`[out]`. The TCN state dict names each weight-normalised conv twice
(`conv1.*` / `net.0.*`, `conv2.*` / `net.4.*`); both copies must agree. The
reference's `gn1`/`gn2` GroupNorms are never used in its forward, so their
keys are accepted and dropped. The backbone (`spatial.*` in full models,
`backbone.*` in the pretrained expression file) is converted by
`affjax.models.iresnet`'s converters.

PyTorch is imported only inside `load_torch_checkpoint`.
"""

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from affjax.models import av_model, iresnet

StateDict = Mapping[str, np.ndarray]
Variables = dict[str, dict[str, Any]]

# Keys present in the reference state dict that its forward never uses.
_UNUSED_PREFIXES = ("gn1.", "gn2.")


class _Reader:
  """Hands out state-dict entries, remembering which were used or missing."""

  def __init__(self, state_dict: StateDict):
    self.state_dict = state_dict
    self.used: set[str] = set()
    self.missing: list[str] = []

  def get(self, key: str) -> np.ndarray | None:
    if key not in self.state_dict:
      self.missing.append(key)
      return None
    self.used.add(key)
    return np.asarray(self.state_dict[key], dtype=np.float32)

  def consume_prefix(self, prefix: str) -> dict[str, np.ndarray]:
    """All entries under `prefix` (marked used), keys without the prefix."""
    out = {
      k[len(prefix) :]: v
      for k, v in self.state_dict.items()
      if k.startswith(prefix)
    }
    self.used.update(prefix + k for k in out)
    return out

  def check(self, what: str) -> None:
    unknown = sorted(set(self.state_dict) - self.used)
    if self.missing or unknown:
      raise ValueError(
        f"Cannot convert {what}: missing keys {sorted(self.missing)}; "
        f"unknown keys {unknown}."
      )


def _weight_norm_conv(r: _Reader, prefix: str, alias: str) -> dict | None:
  """`{prefix}weight_g/_v/bias` (and their `alias` copies) -> g, v, bias."""
  names = ("weight_g", "weight_v", "bias")
  pairs = {n: (r.get(prefix + n), r.get(alias + n)) for n in names}
  if any(a is None or b is None for a, b in pairs.values()):
    return None
  out = {}
  for torch_name, (a, b) in pairs.items():
    if a.shape != b.shape or not np.array_equal(a, b):
      raise ValueError(
        f"{prefix}{torch_name} and {alias}{torch_name} name "
        "the same tensor in the reference but differ here."
      )
    out[torch_name] = a
  return {
    "v": out["weight_v"].transpose(2, 1, 0),
    "g": out["weight_g"].reshape(-1),
    "bias": out["bias"],
  }


def _tcn(
  r: _Reader, prefix: str, in_features: int, channels: Sequence[int]
) -> dict:
  """Reference TemporalConvNet under `prefix` -> `TemporalConvNet` params."""
  params = {}
  width = in_features
  for level, features in enumerate(channels):
    p = f"{prefix}network.{level}."
    block = {
      "conv1": _weight_norm_conv(r, p + "conv1.", p + "net.0."),
      "conv2": _weight_norm_conv(r, p + "conv2.", p + "net.4."),
    }
    if width != features:
      w, b = r.get(p + "downsample.weight"), r.get(p + "downsample.bias")
      block["downsample"] = {
        "kernel": None if w is None else w.transpose(2, 1, 0),
        "bias": b,
      }
    params[f"block{level}"] = block
    width = features
  return params


def tcn_params_from_reference(
  state_dict: StateDict,
  in_features: int,
  channels: Sequence[int],
  prefix: str = "",
) -> dict:
  """Params of one `TemporalConvNet` from a reference TCN state dict.

  Args:
    state_dict: holds exactly the TCN's keys (`{prefix}network.{i}.*`).
    in_features: input width of the TCN.
    channels: level widths, as given to `TemporalConvNet`.
    prefix: key prefix, e.g. 'temporal1.'.

  Raises:
    ValueError: listing missing and unknown keys.
  """
  r = _Reader(state_dict)
  params = _tcn(r, prefix, in_features, channels)
  r.check(f"TCN state dict (prefix {prefix!r})")
  return params


def _dense(r: _Reader, name: str) -> dict:
  w, b = r.get(name + ".weight"), r.get(name + ".bias")
  return {"kernel": None if w is None else w.T, "bias": b}


def _fusion(r: _Reader, num_streams: int) -> dict:
  """encoder{i}/encoderQ{i}/encoderV{i}, ln, regressor -> fusion params."""
  params = {}
  for i in range(num_streams):
    params[f"key_{i}"] = _dense(r, f"encoder{i + 1}")
    params[f"query_{i}"] = _dense(r, f"encoderQ{i + 1}")
    params[f"value_{i}"] = _dense(r, f"encoderV{i + 1}")
  params["layer_norm"] = {"scale": r.get("ln.weight"), "bias": r.get("ln.bias")}
  params["regressor"] = _dense(r, "regressor")
  for prefix in _UNUSED_PREFIXES:
    r.consume_prefix(prefix)
  return params


def backbone_variables_from_reference(state_dict: StateDict) -> Variables:
  """Backbone variables from a reference file holding a backbone.

  Accepts the full model (`spatial.*`; the other keys are ignored) or the
  pretrained expression network `res50_ir_0.887.pth` (`backbone.*` plus a
  `logits.*` classifier, which is dropped).

  Returns:
    `{'params': ..., 'batch_stats': ...}` for the IResNet backbone.

  Raises:
    ValueError: neither prefix is present, or the backbone keys do not match.
  """
  if any(k.startswith("spatial.") for k in state_dict):
    return iresnet.iresnet_variables_from_torch(state_dict, "spatial.")
  if any(k.startswith("backbone.") for k in state_dict):
    return iresnet.iresnet_variables_from_res50(state_dict)
  raise ValueError(
    'No backbone keys (prefix "spatial." or "backbone.") in '
    f"state dict; first keys: {sorted(state_dict)[:5]}."
  )


def load_backbone_variables(path: str) -> Variables:
  """Backbone variables from any reference file that holds a backbone.

  The one loader of `model.backbone_checkpoint` and `affjax.embed`: the full
  model (`spatial.*`), the pretrained `res50_ir_0.887.pth` (`backbone.*` +
  `logits.*`) or a bare backbone state dict.

  Returns:
    `{'params': ..., 'batch_stats': ...}` for the IResNet backbone.
  """
  state_dict = load_torch_checkpoint(path)
  if any(k.startswith(("spatial.", "backbone.")) for k in state_dict):
    return backbone_variables_from_reference(state_dict)
  return iresnet.iresnet_variables_from_torch(state_dict)


def from_reference_state_dict(
  state_dict: StateDict, model_config: Any
) -> Variables:
  """Converts a reference model state dict for `build_model(model_config)`.

  Args:
    state_dict: reference key -> array, as `model.state_dict()` has them
      (`my_2d1ddy` for 'av_leader_follower', `my_2d1d` for 'visual_only').
      With `model_config.input == 'embeddings'` the `spatial.*` backbone keys
      may be present and are dropped (the model has no backbone).
    model_config: `config.model` (name, input, visual_channels,
      audio_channels, audio_features).

  Returns:
    `{'params': ..., 'batch_stats': ...}`.

  Raises:
    ValueError: listing every missing and unknown key; on inconsistent
      duplicated weight-norm tensors; or listing every variable whose shape
      differs from what `build_model(model_config)` expects.
  """
  r = _Reader(state_dict)
  params: dict[str, Any] = {}
  batch_stats: dict[str, Any] = {}
  spatial = r.consume_prefix("spatial.")
  if model_config.input == "frames":
    if not spatial:
      r.missing.append("spatial.*")
    else:
      backbone = iresnet.iresnet_variables_from_torch(state_dict, "spatial.")
      params["backbone"] = backbone["params"]
      if backbone.get("batch_stats"):
        batch_stats["backbone"] = backbone["batch_stats"]
  visual_channels = tuple(model_config.visual_channels)
  params["visual_tcn"] = _tcn(
    r, "temporal.", av_model.EMBEDDING_DIM, visual_channels
  )
  if model_config.name == "visual_only":
    params["regressor"] = _dense(r, "regressor")
  elif model_config.name == "av_leader_follower":
    for j, (name, dim) in enumerate(model_config.audio_features, start=1):
      params[f"{name}_tcn"] = _tcn(
        r, f"temporal{j}.", int(dim), tuple(model_config.audio_channels)
      )
    params["fusion"] = _fusion(r, 1 + len(model_config.audio_features))
  else:
    raise ValueError(f"Unknown config.model.name {model_config.name!r}.")
  r.check(f"reference state dict for model {model_config.name!r}")
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  _check_shapes(variables, model_config)
  return variables


def _check_shapes(variables: Variables, model_config: Any) -> None:
  """Compares converted variables with `build_model(model_config)`'s.

  Catches a state dict of another architecture (backbone variant, kernel
  size, feature widths) whose key names happen to match.
  """
  model = av_model.build_model(model_config)
  batch = {
    "embeddings": np.zeros((1, 1, av_model.EMBEDDING_DIM), np.float32),
    "frames": np.zeros((1, 1, 40, 40, 3), np.float32),
  }
  if model_config.name == "av_leader_follower":
    for name, dim in model_config.audio_features:
      batch[name] = np.zeros((1, 1, int(dim)), np.float32)
  abstract = jax.eval_shape(
    functools.partial(model.init, train=False), jax.random.key(0), batch
  )
  want = {
    jax.tree_util.keystr(p): tuple(a.shape)
    for p, a in jax.tree_util.tree_leaves_with_path(abstract)
  }
  got = {
    jax.tree_util.keystr(p): tuple(np.shape(a))
    for p, a in jax.tree_util.tree_leaves_with_path(variables)
  }
  bad = [
    f"{k}: expected {want.get(k)}, found {got.get(k)}"
    for k in sorted(set(want) | set(got))
    if want.get(k) != got.get(k)
  ]
  if bad:
    raise ValueError(
      f"Converted state dict does not fit config.model "
      f"(name {model_config.name!r}): {bad}"
    )


def load_torch_checkpoint(
  path: str | os.PathLike[str],
) -> dict[str, np.ndarray]:
  """Reads a PyTorch `.pth` state dict into `{key: numpy array}`.

  Args:
    path: file written by `torch.save(model.state_dict(), path)`.

  Raises:
    ImportError: PyTorch is not installed (install the `[torch]` extra).
    FileNotFoundError: `path` does not exist.
    ValueError: the file is not a readable state dict.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Checkpoint file not found: {path}")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
      f"Reading {path} needs PyTorch; install affjax[torch]."
    ) from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"Cannot read PyTorch checkpoint {path}: {e}") from e
  if not isinstance(obj, Mapping) or not all(
    isinstance(v, torch.Tensor) for v in obj.values()
  ):
    raise ValueError(
      f"{path} does not hold a state dict (mapping of name to "
      f"tensor); found {type(obj).__name__}."
    )
  return {k: v.detach().cpu().numpy() for k, v in obj.items()}
