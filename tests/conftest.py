"""Test-session setup: 8 fake CPU devices before JAX initialises, CPU only."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# affjax loads openSMILE's native library before any test imports TensorFlow
# (see affjax/opensmile_preload.py): the whole suite runs in one process.
import jax

import affjax  # noqa: F401

# Set before any computation so multi-device tests see 8 devices; this avoids
# XLA_FLAGS, which TensorFlow's own XLA also parses.
jax.config.update("jax_num_cpu_devices", 8)
