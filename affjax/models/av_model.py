"""Full models: audio-visual leader-follower and visual-only, plus build_model.

Visual block: the frame backbone applied to every frame (batch and time
merged) gives 512-d embeddings, or precomputed embeddings are read from the
batch; a TCN turns them into 128-d visual features. Aural block: one TCN per
configured audio feature. Fusion: `LeaderFollowerFusion` with the visual
stream leading. The visual-only model (the reference's `my_2d1d`) regresses
straight from the visual TCN.

Flax parameter layout (the converter in `affjax/convert.py` relies on it):
`backbone`, `visual_tcn`, `<feature>_tcn` per audio feature, `fusion`
(audio-visual) or `regressor` (visual-only).
"""

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from affjax import sharding
from affjax.models import fusion as fusion_lib
from affjax.models import iresnet, tcn

Array = jax.Array
Batch = Mapping[str, Array]

EMBEDDING_DIM = 512  # backbone output width, per frame.
VISUAL_INPUTS = ("frames", "embeddings")


def _visual_input(visual_input: str, batch: Batch) -> Array:
  """The checked `frames [B,T,H,W,C]` or `embeddings [B,T,512]` array."""
  if visual_input not in VISUAL_INPUTS:
    raise ValueError(
      f"visual_input must be one of {VISUAL_INPUTS}, got {visual_input!r}."
    )
  if visual_input not in batch:
    raise ValueError(
      f"Batch has no {visual_input!r} key (model input is "
      f"{visual_input!r}); found keys {sorted(batch)}."
    )
  x = batch[visual_input]
  if visual_input == "embeddings" and (
    x.ndim != 3 or x.shape[-1] != EMBEDDING_DIM
  ):
    raise ValueError(
      f"embeddings must be [batch, time, {EMBEDDING_DIM}], got {x.shape}."
    )
  if visual_input == "frames" and x.ndim != 5:
    raise ValueError(
      f"frames must be [batch, time, height, width, channels], got {x.shape}."
    )
  return x


def _embed(backbone: nn.Module | None, x: Array, train: bool) -> Array:
  """Backbone per frame (batch and time merged): `[B,T,H,W,C] -> [B,T,512]`.

  Frames are float in [-1, 1] or uint8 pixels (normalised here, on device).

  `x` is returned unchanged when it already holds embeddings `[B,T,512]`.
  """
  if x.ndim == 3:
    return x
  if backbone is None:
    raise ValueError("visual_input='frames' needs a backbone module.")
  if x.dtype == jnp.uint8:
    # Raw pixels cross to the device as bytes (4x fewer than float32) and
    # are normalised here, as the data pipeline does: (x / 255 - 0.5) / 0.5.
    x = (x.astype(jnp.float32) / 255.0 - 0.5) / 0.5
  b, t = x.shape[:2]
  # The B*T crops are spread over every device, not only those the batch
  # of windows is split over (a batch of 8 then runs on 16+ chips).
  crops = sharding.shard_crops(x.reshape(b * t, *x.shape[2:]))
  emb = backbone(crops, train=train)
  return emb.reshape(b, t, emb.shape[-1])


class AVLeaderFollower(nn.Module):
  """Audio-visual leader-follower attentive fusion model.

  Attributes:
    backbone: frame encoder `[N, H, W, 3] -> [N, 512]` (called with
      `train=`); unused and may be None when visual_input is 'embeddings'.
    visual_input: 'frames' or 'embeddings' (batch key read for the leader).
    audio_features: `(name, dim)` pairs; batch keys read, in stream order.
    visual_channels: visual TCN level widths.
    audio_channels: audio TCN level widths.
    kernel_size: TCN taps.
    dropout: TCN channel-dropout rate.
    fusion_dim: attention width.
    num_outputs: 1 (one emotion) or 2 (valence, arousal).
    follower_qv_from_keys: reproduce the reference's follower Q/V quirk.
    dtype: activation dtype of the TCNs and the fusion (the backbone has its
      own); parameters stay float32 and predictions are returned in float32,
      so the loss and metrics are computed in float32.
  """

  backbone: nn.Module | None = None
  visual_input: str = "frames"
  audio_features: Sequence[tuple[str, int]] = (("vggish", 128), ("mfcc", 39))
  visual_channels: Sequence[int] = (128, 128, 128, 128)
  audio_channels: Sequence[int] = (32, 32, 32, 32)
  kernel_size: int = 5
  dropout: float = 0.1
  fusion_dim: int = 32
  num_outputs: int = 2
  follower_qv_from_keys: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, batch: Batch, *, train: bool) -> Array:
    """Predicts per-frame emotions.

    Args:
      batch: `frames [B,T,40,40,3]` or `embeddings [B,T,512]`, and one
        `[B,T,dim]` array per audio feature; other keys are ignored.
      train: enables dropout and BatchNorm batch statistics in the backbone.

    Returns:
      `[batch, time, num_outputs]`.
    """
    if not self.audio_features:
      raise ValueError("AVLeaderFollower needs at least one audio feature.")
    x = _visual_input(self.visual_input, batch)
    # Check every audio input before running anything heavy.
    for name, dim in self.audio_features:
      if name not in batch:
        raise ValueError(
          f"Batch has no audio feature {name!r}; found keys {sorted(batch)}."
        )
      if batch[name].shape != (*x.shape[:2], dim):
        raise ValueError(
          f"{name} must be [batch, time, {dim}] = "
          f"{[*x.shape[:2], dim]}, got "
          f"{list(batch[name].shape)}."
        )
    visual = _embed(self.backbone, x, train)
    streams = [
      tcn.TemporalConvNet(
        self.visual_channels,
        self.kernel_size,
        self.dropout,
        dtype=self.dtype,
        name="visual_tcn",
      )(visual, train=train)
    ]
    for name, _ in self.audio_features:
      streams.append(
        tcn.TemporalConvNet(
          self.audio_channels,
          self.kernel_size,
          self.dropout,
          dtype=self.dtype,
          name=f"{name}_tcn",
        )(batch[name], train=train)
      )
    return fusion_lib.LeaderFollowerFusion(
      num_outputs=self.num_outputs,
      fusion_dim=self.fusion_dim,
      follower_qv_from_keys=self.follower_qv_from_keys,
      dtype=self.dtype,
      name="fusion",
    )(streams).astype(jnp.float32)


class VisualOnly(nn.Module):
  """Visual-only model: backbone (or embeddings), TCN, linear regressor.

  Attributes: as `AVLeaderFollower`, without the audio and fusion fields.
  """

  backbone: nn.Module | None = None
  visual_input: str = "frames"
  visual_channels: Sequence[int] = (128, 128, 128, 128)
  kernel_size: int = 5
  dropout: float = 0.1
  num_outputs: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, batch: Batch, *, train: bool) -> Array:
    """`frames`/`embeddings` of `batch` -> `[batch, time, num_outputs]`."""
    visual = _embed(
      self.backbone, _visual_input(self.visual_input, batch), train
    )
    h = tcn.TemporalConvNet(
      self.visual_channels,
      self.kernel_size,
      self.dropout,
      dtype=self.dtype,
      name="visual_tcn",
    )(visual, train=train)
    return fusion_lib.torch_dense(
      self.num_outputs, h.shape[-1], "regressor", self.dtype
    )(h).astype(jnp.float32)


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def activation_dtype(model_config: Any) -> Any:
  """`config.model.dtype` ('float32' | 'bfloat16', default float32).

  Raises:
    ValueError: another value.
  """
  name = model_config.get("dtype", "float32")
  if name not in DTYPES:
    raise ValueError(
      f"config.model.dtype must be one of {sorted(DTYPES)}, got {name!r}."
    )
  return DTYPES[name]


def build_backbone(backbone_config: Any, dtype: Any = jnp.float32) -> nn.Module:
  """The frame backbone of `config.model.backbone` (`name`, `dropout`,
  `conv_chunk`), computing in `dtype` (parameters stay float32).

  Raises:
    ValueError: unknown backbone name.
  """
  name = backbone_config.name
  if name not in iresnet.BACKBONES:
    raise ValueError(
      f"config.model.backbone.name must be one of "
      f"{sorted(iresnet.BACKBONES)}, got {name!r}."
    )
  return iresnet.BACKBONES[name](
    dropout_rate=float(backbone_config.dropout),
    conv_chunk=int(backbone_config.get("conv_chunk", 0)),
    dtype=dtype,
  )


def build_model(model_config: Any) -> nn.Module:
  """Builds the model described by `config.model` (an ml_collections dict).

  Reads `name` ('av_leader_follower' | 'visual_only'), `input` ('frames' |
  'embeddings'), `backbone` (only for 'frames'), `visual_channels`,
  `audio_channels`, `audio_features`, `kernel_size`, `dropout`, `fusion_dim`,
  `num_outputs` and optionally `follower_qv_from_keys` (default True) and
  `dtype` (activation dtype, default 'float32').

  Raises:
    ValueError: unknown model name or input.
  """
  visual_input = model_config.input
  if visual_input not in VISUAL_INPUTS:
    raise ValueError(
      f"config.model.input must be one of {VISUAL_INPUTS}, "
      f"got {visual_input!r}."
    )
  dtype = activation_dtype(model_config)
  backbone = (
    build_backbone(model_config.backbone, dtype)
    if visual_input == "frames"
    else None
  )
  common = {
    "dtype": dtype,
    "backbone": backbone,
    "visual_input": visual_input,
    "visual_channels": tuple(model_config.visual_channels),
    "kernel_size": int(model_config.kernel_size),
    "dropout": float(model_config.dropout),
    "num_outputs": int(model_config.num_outputs),
  }
  if model_config.name == "visual_only":
    return VisualOnly(**common)
  if model_config.name == "av_leader_follower":
    return AVLeaderFollower(
      audio_features=tuple(
        (str(n), int(d)) for n, d in model_config.audio_features
      ),
      audio_channels=tuple(model_config.audio_channels),
      fusion_dim=int(model_config.fusion_dim),
      follower_qv_from_keys=bool(
        model_config.get("follower_qv_from_keys", True)
      ),
      **common,
    )
  raise ValueError(
    "config.model.name must be 'av_leader_follower' or "
    f"'visual_only', got {model_config.name!r}."
  )
