"""Synthetic datasets shared by the test session (fixtures in conftest.py).

Generating and preprocessing a dataset takes tens of seconds on 2 cores, so
each is built once per session. Modules that only read a dataset use it in
place; a module that breaks or rewrites data works on its own copy (a few
MB).
"""

from __future__ import annotations

import os

# `configs/test.py`'s data lives under one root: <root>/{raw,cache,tfds}.
KINDS = ("raw", "cache", "tfds")

# One-subject videos long enough for face tracking and windowed prediction.
VIDEO_DATA_ARGS = {
  "num_trials": 3,
  "seed": 3,
  "min_seconds": 6,
  "max_seconds": 8,
  "two_subject_videos": 0,
}


def test_config(root: str):
  """`configs/test.py` with its data directories under `root` (locked)."""
  from configs import test

  config = test.get_config()
  config.unlock()
  for kind in KINDS:
    config.data[f"{kind}_dir"] = os.path.join(root, kind)
  return config.lock()


def data_flags(root: str) -> list[str]:
  """Command-line overrides pointing `configs/test.py` at `root`'s data."""
  return [
    f"--config.data.{kind}_dir={os.path.join(root, kind)}" for kind in KINDS
  ]
