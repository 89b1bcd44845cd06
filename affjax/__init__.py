"""affjax: continuous valence/arousal recognition from face video and audio.

A JAX/Flax reimplementation of the ABAW2 audio-visual leader-follower attentive
fusion system (Zhang et al., 2021).
"""

__version__ = "0.1.0"

from affjax import opensmile_preload as _opensmile_preload

# Must run before anything imports TensorFlow; see opensmile_preload.
_opensmile_preload.preload()
