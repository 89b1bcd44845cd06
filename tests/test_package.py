"""Smoke tests: the package and the dependencies it relies on import."""

import importlib

import affjax


def test_version():
  assert affjax.__version__.count(".") == 2


def test_runtime_dependencies_import():
  # tensorboard (for clu.metric_writers) and importlib_resources (for tfds
  # builders) are undeclared upstream; a missing one must fail here, fast.
  for name in (
    "clu.metric_writers",
    "clu.periodic_actions",
    "importlib_resources",
    "tensorflow_datasets",
    "orbax.checkpoint",
    "optax",
    "ml_collections",
  ):
    assert importlib.import_module(name) is not None
