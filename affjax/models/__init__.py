"""Flax models: TCN, leader-follower fusion, full audio-visual models."""

from affjax.models.av_model import AVLeaderFollower, VisualOnly, build_model
from affjax.models.fusion import LeaderFollowerFusion
from affjax.models.tcn import TemporalConvNet

__all__ = [
  "AVLeaderFollower",
  "LeaderFollowerFusion",
  "TemporalConvNet",
  "VisualOnly",
  "build_model",
]
