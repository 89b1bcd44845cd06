"""Test-session setup: 8 fake CPU devices before JAX initialises, CPU only."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Tests compute audio features in this process, which also imports
# TensorFlow: openSMILE's native library must load first (see
# affjax/data/preprocess/opensmile_preload.py).
from affjax.data.preprocess import opensmile_preload

opensmile_preload.preload()

import jax

# Set before any computation so multi-device tests see 8 devices; this avoids
# XLA_FLAGS, which TensorFlow's own XLA also parses.
jax.config.update("jax_num_cpu_devices", 8)
