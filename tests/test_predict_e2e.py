"""Prediction sees what training saw: video path vs the feature cache.

A synthetic dataset goes through the real preprocessing (cropped_aligned
crops + audio features into the cache, as training reads it) and, video by
video, through `affjax.predict` (YuNet detection, tracking, cropping, audio
features from the video file). The two must agree: same audio features,
nearly the same face frames, the same frames flagged face-less, and a model
fed either gives nearly the same predictions.
"""

import os

import jax
import numpy as np
import pytest

from affjax import checkpoints, face, metrics, predict, sharding, train_state
from affjax.data.preprocess import cache
from configs import test as test_config

TRIALS = ("1-25-256x192", "2-30-256x192", "3-25-256x192")


def _random_checkpoint(workdir, config, stats):
  """Random weights of `config`'s model, saved without compiling."""
  mesh = sharding.make_mesh((("data", 1),), devices=jax.devices()[:1])
  setup = train_state.build_setup(config, mesh)
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "batch_stats" in name and "var" in name:
      value = np.ones(leaf.shape, leaf.dtype)
    elif "params" in name and "opt_state" not in name:
      value = (0.3 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
    else:
      value = np.zeros(leaf.shape, leaf.dtype)
    return jax.device_put(value, leaf.sharding)

  state = jax.tree_util.tree_map_with_path(fill, setup.abstract_state)
  manager = checkpoints.create_manager(workdir)
  checkpoints.save(manager, 1, state, config, {"feature_stats": stats}, 0.0)
  manager.wait_until_finished()
  return workdir


@pytest.fixture(scope="module")
def data(tmp_path_factory, video_raw, video_cache):
  root = tmp_path_factory.mktemp("e2e")
  # The session's raw data and cache (tests/conftest.py), read only.
  raw, (cache_dir, manifest) = video_raw, video_cache
  settings = cache.PreprocessSettings(vggish_model="tiny")
  trials = {t: cache.read_trial(cache_dir, t) for t in TRIALS}
  # Normalisation statistics from the cached features (any fixed values do).
  stats = {}
  for name in ("mfcc", "vggish"):
    x = np.concatenate([trials[t][name] for t in TRIALS])
    stats[name] = {
      "mean": [float(x.mean())] * x.shape[1],
      "std": [float(x.std())] * x.shape[1],
    }
  config = test_config.get_config()
  config.unlock()
  config.data.cache_dir = cache_dir  # settings come from its manifest
  config.lock()
  workdir = _random_checkpoint(str(root / "run"), config, stats)
  faces = {
    # Synthetic-data models crop as the generator did (see predict_video).
    t: predict.extract_faces(
      os.path.join(raw, "videos", t + ".mp4"),
      detector=face.make_detector(drawn_faces=True),
    )
    for t in TRIALS
  }
  return {
    "raw": raw,
    "manifest": manifest,
    "trials": trials,
    "faces": faces,
    "model": predict.load_model(workdir),
    "settings": settings,
  }


def test_checkpoint_finds_the_cache_settings(data):
  assert data["model"].settings == data["settings"]


@pytest.mark.parametrize("trial", TRIALS)
def test_audio_features_equal_the_cache(data, trial):
  cached = data["trials"][trial]
  n, fps = len(cached["face_mask"]), cached["meta"]["fps"]
  video = os.path.join(data["raw"], "videos", trial + ".mp4")
  feats = predict.audio_features(
    video, ["mfcc", "egemaps", "vggish"], n, fps, data["settings"]
  )
  for name, value in feats.items():
    np.testing.assert_array_equal(value, cached[name], err_msg=name)


@pytest.mark.parametrize("trial", TRIALS)
def test_face_frames_match_the_cache(data, trial):
  cached, faces = data["trials"][trial], data["faces"][trial]
  mask = cached["face_mask"]
  assert faces.frames.shape == cached["frames"].shape
  # Every cached crop is found; the only extra frames are the generator's
  # random single missing crops (the face is drawn there).
  assert faces.found[mask].all()
  extra = np.flatnonzero(faces.found & ~mask)
  assert len(extra) <= 0.03 * len(mask)
  for i in extra:
    assert mask[i - 1] or mask[i + 1]
  assert not faces.frames[~faces.found].any()  # zeros, as the cache
  both = faces.found & mask
  mad = np.abs(
    faces.frames[both].astype(np.float64) - cached["frames"][both]
  ).mean()
  assert mad < 14.0, mad


@pytest.mark.parametrize("trial", TRIALS)
def test_model_gives_nearly_the_same_predictions(data, trial):
  model, cached = data["model"], data["trials"][trial]
  from_cache = predict.predict_windows(
    model, predict.model_inputs(model, cached["frames"], cached)
  )
  from_video = predict.predict_windows(
    model, predict.model_inputs(model, data["faces"][trial].frames, cached)
  )
  agreement = np.asarray(metrics.ccc(from_cache, from_video))
  assert agreement.shape == (2,)
  assert np.all(agreement > 0.95), agreement
