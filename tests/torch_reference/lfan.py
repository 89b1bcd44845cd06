"""PyTorch transcription of the reference TCN and leader-follower fusion model.

Written from the reference's facts (sucv/ABAW2, model/model.py and
model/temporal_convolutional_model.py) for parity tests only. Module
attribute names are chosen so that `state_dict()` produces exactly the
reference's key names (`temporal.network.0.conv1.weight_g`, the duplicated
`net.0.*` keys, `encoderQ2.weight`, the unused `gn1`/`gn2`, ...).
"""

import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn


def _weight_norm(conv: nn.Module) -> nn.Module:
  # The old-style weight_norm (deprecated, still shipped) is what gives the
  # reference's `weight_g` / `weight_v` state_dict keys.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    return nn.utils.weight_norm(conv)


class CausalChop(nn.Module):
  """Drops the trailing `size` time steps of a `[B, C, T]` tensor."""

  def __init__(self, size: int):
    super().__init__()
    self.size = size

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x[:, :, : -self.size]


class TemporalBlock(nn.Module):
  """Two weight-normalised dilated convs, channel dropout, residual."""

  def __init__(
    self, n_in: int, n_out: int, kernel_size: int, dilation: int, dropout: float
  ):
    super().__init__()
    pad = (kernel_size - 1) * dilation
    self.conv1 = _weight_norm(
      nn.Conv1d(n_in, n_out, kernel_size, padding=pad, dilation=dilation)
    )
    self.chomp1 = CausalChop(pad)
    self.relu1 = nn.LeakyReLU()
    # The reference's nn.Dropout2d on [B, C, T] zeroes whole channels per
    # sequence (torch <= 1.10 semantics); Dropout1d is that, without the
    # deprecation warning newer torch prints for 3-D Dropout2d inputs.
    self.dropout1 = nn.Dropout1d(dropout)
    self.conv2 = _weight_norm(
      nn.Conv1d(n_out, n_out, kernel_size, padding=pad, dilation=dilation)
    )
    self.chomp2 = CausalChop(pad)
    self.relu2 = nn.LeakyReLU()
    self.dropout2 = nn.Dropout1d(dropout)
    # Registering the convs a second time inside `net` is what duplicates
    # their tensors under `net.0.*` and `net.4.*` in the reference.
    self.net = nn.Sequential(
      self.conv1,
      self.chomp1,
      self.relu1,
      self.dropout1,
      self.conv2,
      self.chomp2,
      self.relu2,
      self.dropout2,
    )
    self.downsample = nn.Conv1d(n_in, n_out, 1) if n_in != n_out else None
    self.relu = nn.LeakyReLU()

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    res = x if self.downsample is None else self.downsample(x)
    return self.relu(self.net(x) + res)


class TemporalConvNet(nn.Module):
  """Channels-first TCN: `[B, C_in, T] -> [B, channels[-1], T]`."""

  def __init__(
    self,
    num_inputs: int,
    channels: Sequence[int],
    kernel_size: int = 5,
    dropout: float = 0.1,
  ):
    super().__init__()
    blocks = []
    for i, c in enumerate(channels):
      c_in = num_inputs if i == 0 else channels[i - 1]
      blocks.append(TemporalBlock(c_in, c, kernel_size, 2**i, dropout))
    self.network = nn.Sequential(*blocks)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.network(x)


class LeaderFollowerNet(nn.Module):
  """The reference's audio-visual model (my_2d1ddy), n audio streams.

  `spatial` is the frame backbone (`[N, 3, H, W] -> [N, 512]`) or None when
  the visual input is already a 512-d embedding per frame. Stream 0 (visual)
  leads; followers' queries and values are computed from their keys, as the
  reference's forward does (it overwrites the follower features with the key
  encoding before computing Q and V).
  """

  def __init__(
    self,
    spatial: nn.Module | None,
    audio_dims: Sequence[int] = (128, 39),
    visual_channels: Sequence[int] = (128, 128, 128, 128),
    audio_channels: Sequence[int] = (32, 32, 32, 32),
    embedding_dim: int = 512,
    kernel_size: int = 5,
    dropout: float = 0.1,
    fusion_dim: int = 32,
    output_dim: int = 2,
  ):
    super().__init__()
    self.spatial = spatial
    self.fusion_dim = fusion_dim
    self.n_audio = len(audio_dims)
    self.temporal = TemporalConvNet(
      embedding_dim, visual_channels, kernel_size, dropout
    )
    for j, dim in enumerate(audio_dims, start=1):
      setattr(
        self,
        f"temporal{j}",
        TemporalConvNet(dim, audio_channels, kernel_size, dropout),
      )
    widths = [visual_channels[-1]] + [audio_channels[-1]] * self.n_audio
    for prefix in ("encoder", "encoderQ", "encoderV"):
      for i, w in enumerate(widths, start=1):
        setattr(self, f"{prefix}{i}", nn.Linear(w, fusion_dim))
    self.gn1 = nn.GroupNorm(8, 32)
    self.gn2 = nn.GroupNorm(8, 32)
    self.ln = nn.LayerNorm([len(widths), fusion_dim])
    self.regressor = nn.Linear(
      visual_channels[-1] + len(widths) * fusion_dim, output_dim
    )

  def visual_embeddings(self, frames: torch.Tensor) -> torch.Tensor:
    """`[B, T, 3, H, W] -> [B, T, 512]` through the backbone."""
    b, t = frames.shape[:2]
    return self.spatial(frames.reshape(b * t, *frames.shape[2:])).reshape(
      b, t, -1
    )

  def fuse(
    self, leader: torch.Tensor, followers: Sequence[torch.Tensor]
  ) -> torch.Tensor:
    """Fusion head on TCN outputs `[B, T, C_i]` -> `[B, T, output_dim]`."""
    b, t = leader.shape[:2]
    flat = [leader.reshape(b * t, -1)] + [
      f.reshape(b * t, -1) for f in followers
    ]
    keys, queries, values = [], [], []
    for i, h in enumerate(flat, start=1):
      k = getattr(self, f"encoder{i}")(h)
      src = h if i == 1 else k
      keys.append(k)
      queries.append(getattr(self, f"encoderQ{i}")(src))
      values.append(getattr(self, f"encoderV{i}")(src))
    k = torch.stack(keys, dim=-2)
    q = torch.stack(queries, dim=-2)
    v = torch.stack(values, dim=-2)
    scores = torch.softmax(
      k @ q.transpose(1, 2) / math.sqrt(self.fusion_dim), dim=-1
    )
    out = self.ln(scores @ v + v).reshape(b * t, -1)
    return self.regressor(torch.cat([flat[0], out], dim=-1)).reshape(b, t, -1)

  def forward(self, visual: torch.Tensor, *audio: torch.Tensor) -> torch.Tensor:
    """Frames `[B,T,3,H,W]` or embeddings `[B,T,512]`, audio `[B,T,D]`."""
    if self.spatial is not None:
      visual = self.visual_embeddings(visual)
    lead = self.temporal(visual.transpose(1, 2)).transpose(1, 2)
    follow = [
      getattr(self, f"temporal{j}")(a.transpose(1, 2)).transpose(1, 2)
      for j, a in enumerate(audio, start=1)
    ]
    return self.fuse(lead, follow)


class VisualOnlyNet(nn.Module):
  """The reference's visual-only model (my_2d1d): backbone, TCN, linear."""

  def __init__(
    self,
    spatial: nn.Module | None,
    visual_channels: Sequence[int] = (128, 128, 128, 128),
    embedding_dim: int = 512,
    kernel_size: int = 5,
    dropout: float = 0.1,
    output_dim: int = 2,
  ):
    super().__init__()
    self.spatial = spatial
    self.temporal = TemporalConvNet(
      embedding_dim, visual_channels, kernel_size, dropout
    )
    self.regressor = nn.Linear(visual_channels[-1], output_dim)

  def forward(self, visual: torch.Tensor) -> torch.Tensor:
    if self.spatial is not None:
      b, t = visual.shape[:2]
      visual = self.spatial(visual.reshape(b * t, *visual.shape[2:]))
      visual = visual.reshape(b, t, -1)
    h = self.temporal(visual.transpose(1, 2)).transpose(1, 2)
    return self.regressor(h)


def randomize_(
  module: nn.Module, seed: int = 0, skip: tuple[str, ...] = ("spatial.",)
) -> nn.Module:
  """Gives parameters and norm statistics non-trivial random values.

  Entries under the `skip` prefixes (the backbone, which has its own
  near-identity randomiser in `iresnet.randomize_`) keep their values.
  Returns the module in eval mode.
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.startswith(skip):
        continue
      if name.endswith("weight_g"):
        p.copy_(0.5 + torch.rand(p.shape, generator=gen))
      else:
        p.copy_(0.2 * torch.randn(p.shape, generator=gen))
  return module.eval()


def state_dict_numpy(module: nn.Module) -> dict:
  """`module.state_dict()` as numpy arrays, keys unchanged."""
  return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
