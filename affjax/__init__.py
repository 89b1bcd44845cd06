"""affjax: continuous valence/arousal recognition from face video and audio.

A JAX/Flax reimplementation of the ABAW2 audio-visual leader-follower attentive
fusion system (Zhang et al., 2021).
"""

__version__ = "0.1.0"
