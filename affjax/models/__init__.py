"""Flax models: TCN, leader-follower fusion, full audio-visual models."""

from affjax.models.av_model import AVLeaderFollower
from affjax.models.av_model import build_model
from affjax.models.av_model import VisualOnly
from affjax.models.fusion import LeaderFollowerFusion
from affjax.models.tcn import TemporalConvNet

__all__ = [
  "AVLeaderFollower",
  "LeaderFollowerFusion",
  "TemporalConvNet",
  "VisualOnly",
  "build_model",
]
