"""PyTorch transcription of the reference IR-50 / IR-SE-50 backbone.

Written from the reference's facts (sucv/ABAW2, model/arcface_model.py and the
40x40 output layer installed by `my_res50` in model/model.py) for parity tests
only. Attribute names and registration order reproduce the reference's
`state_dict()` keys and `parameters()` order: `input_layer.{0,1,2}`, then
`output_layer.{0,3,4}` (registered before the body), then
`body.<i>.shortcut_layer.*` before `body.<i>.res_layer.*`.
"""

from collections.abc import Sequence

import torch
from torch import nn


class SqueezeExcite(nn.Module):
  """Average pool -> 1x1 conv -> ReLU -> 1x1 conv -> sigmoid -> scale."""

  def __init__(self, channels: int, reduction: int):
    super().__init__()
    self.avg_pool = nn.AdaptiveAvgPool2d(1)
    self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
    self.relu = nn.ReLU()
    self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)
    self.sigmoid = nn.Sigmoid()

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    gate = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))
    return x * gate


class Unit(nn.Module):
  """bottleneck_IR (se_reduction=0) or bottleneck_IR_SE unit."""

  def __init__(
    self, in_channels: int, depth: int, stride: int, se_reduction: int
  ):
    super().__init__()
    if in_channels == depth:
      self.shortcut_layer = nn.MaxPool2d(1, stride)
    else:
      self.shortcut_layer = nn.Sequential(
        nn.Conv2d(in_channels, depth, 1, stride, bias=False),
        nn.BatchNorm2d(depth),
      )
    layers = [
      nn.BatchNorm2d(in_channels),
      nn.Conv2d(in_channels, depth, 3, 1, 1, bias=False),
      nn.PReLU(depth),
      nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
      nn.BatchNorm2d(depth),
    ]
    if se_reduction:
      layers.append(SqueezeExcite(depth, se_reduction))
    self.res_layer = nn.Sequential(*layers)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.res_layer(x) + self.shortcut_layer(x)


class Backbone(nn.Module):
  """The reference backbone at 40x40 input (final map 5x5), NCHW."""

  def __init__(
    self,
    stage_channels: Sequence[int] = (64, 128, 256, 512),
    stage_units: Sequence[int] = (3, 4, 14, 3),
    stage_strides: Sequence[int] = (1, 2, 2, 2),
    se_reduction: int = 0,
    embedding_dim: int = 512,
    final_size: int = 5,
    drop_ratio: float = 0.4,
  ):
    super().__init__()
    width = stage_channels[0]
    self.input_layer = nn.Sequential(
      nn.Conv2d(3, width, 3, 1, 1, bias=False),
      nn.BatchNorm2d(width),
      nn.PReLU(width),
    )
    last = stage_channels[-1]
    self.output_layer = nn.Sequential(
      nn.BatchNorm2d(last),
      nn.Dropout(drop_ratio),
      nn.Flatten(),
      nn.Linear(last * final_size * final_size, embedding_dim),
      nn.BatchNorm1d(embedding_dim),
    )
    units = []
    for depth, count, stride in zip(stage_channels, stage_units, stage_strides):
      for u in range(count):
        units.append(Unit(width, depth, stride if u == 0 else 1, se_reduction))
        width = depth
    self.body = nn.Sequential(*units)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.output_layer(self.body(self.input_layer(x)))
    return x / torch.norm(x, 2, 1, True)


class Res50(nn.Module):
  """The layout of the pretrained `res50_ir_0.887.pth`: backbone + logits."""

  def __init__(self, num_classes: int = 8, **backbone_kwargs):
    super().__init__()
    self.backbone = Backbone(**backbone_kwargs)
    self.logits = nn.Linear(512, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.logits(self.backbone(x))


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
  """Gives every BatchNorm non-trivial affine parameters and statistics.

  Values stay near the identity (scale ~1, mean ~0, var ~1) so that the
  50-layer residual stack neither explodes nor collapses, while every entry
  differs from the defaults and so exercises the conversion.
  """
  gen = torch.Generator().manual_seed(seed)

  def uniform(t: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return torch.rand(t.shape, generator=gen) * (high - low) + low

  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        module.weight.copy_(uniform(module.weight, 0.5, 1.5))
        module.bias.copy_(uniform(module.bias, -0.2, 0.2))
        module.running_mean.copy_(uniform(module.running_mean, -0.2, 0.2))
        module.running_var.copy_(uniform(module.running_var, 0.5, 2.0))
        module.num_batches_tracked.fill_(7)
      elif isinstance(module, nn.PReLU):
        module.weight.copy_(uniform(module.weight, 0.0, 0.5))
  return model
