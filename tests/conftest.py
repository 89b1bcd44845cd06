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
import pytest

from tests import shared_data

# Set before any computation so multi-device tests see 8 devices; this avoids
# XLA_FLAGS, which TensorFlow's own XLA also parses.
jax.config.update("jax_num_cpu_devices", 8)

# ----------------------------------------------------------------------------
# Session-wide synthetic data (see tests/shared_data.py).


@pytest.fixture(scope="session")
def test_data_root(tmp_path_factory) -> str:
  """Root of `configs/test.py`'s data: raw, feature cache and TFDS dataset.

  Built by `affjax.data.prepare`, exactly as a run of the config builds it,
  so runs pointed at it (in-process, or children given
  `shared_data.data_flags`) find it ready. Read only.
  """
  from affjax.data import prepare

  root = str(tmp_path_factory.mktemp("test_config_data"))
  prepare.prepare(shared_data.test_config(root).data, root)
  return root


@pytest.fixture(scope="session")
def video_raw(tmp_path_factory) -> str:
  """Raw data of `shared_data.VIDEO_DATA_ARGS` (3 trials, 6-8 s). Read only."""
  from affjax.data import synthetic

  raw = str(tmp_path_factory.mktemp("video_data") / "raw")
  synthetic.generate(raw, **shared_data.VIDEO_DATA_ARGS)
  return raw


@pytest.fixture(scope="session")
def video_cache(video_raw) -> tuple[str, dict]:
  """(feature cache of `video_raw` with the tiny VGGish, its manifest).

  Preprocessed in this process. Read only.
  """
  from affjax.data.preprocess import cache, run

  cache_dir = os.path.join(os.path.dirname(video_raw), "cache")
  settings = cache.PreprocessSettings(vggish_model="tiny")
  return cache_dir, run.preprocess(video_raw, cache_dir, settings)


@pytest.fixture(scope="session")
def trained_run(test_data_root, tmp_path_factory) -> tuple[str, dict]:
  """(workdir, summary) of an uninterrupted in-process `configs/test.py` run.

  On the session's data and 8 fake devices, to its end (max_epochs). Read
  only: a test that writes into a workdir (evaluation outputs, a resume)
  copies it first.
  """
  from affjax import train

  workdir = str(tmp_path_factory.mktemp("trained") / "work")
  config = shared_data.test_config(test_data_root)
  return workdir, train.train_and_evaluate(config, workdir)
