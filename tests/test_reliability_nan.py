"""NaN/Inf: training stops with a message naming the step or the trial and
never overwrites the checkpoints it had.

In-process runs of `train.train_and_evaluate` with `configs/test.py` (8 fake
devices). A clean run is stopped after two epochs (checkpoints 1 and 2), then
(a copy of) its workdir is resumed with

* NaN written into a few rows of one training trial's cached VGGish features:
  the error must name the trial;
* NaN in one validation trial's cached features, or in the model's
  predictions for it: training must stop naming the trial, and no checkpoint
  with a NaN score may be saved;
* a NaN parameter update injected at a known step (as a non-finite gradient
  would produce): the step must be named.

Plus the checkpoint manager itself: a NaN score never displaces the best
checkpoint (orbax's BestN, given a NaN metric, would delete the real best).
"""

import collections
import hashlib
import os
import re
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from affjax import checkpoints, train
from affjax.data import pipeline
from affjax.data import prepare as prepare_lib
from affjax.data.preprocess import cache
from configs import test as test_config


class Interrupted(Exception):
  pass


def _config(data_dirs):
  config = test_config.get_config()
  config.unlock()
  config.data.update(data_dirs)
  return config.lock()


def _tree_digest(path: str) -> dict[str, str]:
  out = {}
  for dirpath, _, files in os.walk(path):
    for f in files:
      p = os.path.join(dirpath, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def base(test_data_root, tmp_path_factory):
  """(data dirs, workdir with checkpoints 1 and 2 of a clean run).

  The cache and TFDS dataset are a copy of the session's (the tests poison
  them); the raw data is the session's.
  """
  root = tmp_path_factory.mktemp("nan")
  data_dirs = {"raw_dir": os.path.join(test_data_root, "raw")}
  for kind in ("cache", "tfds"):
    data_dirs[f"{kind}_dir"] = str(root / kind)
    shutil.copytree(os.path.join(test_data_root, kind), str(root / kind))
  workdir = str(root / "clean")
  real = train.train_epoch
  calls = []

  def two_epochs(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
      raise Interrupted()
    return real(*args, **kwargs)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(train, "train_epoch", two_epochs)
    with pytest.raises(Interrupted):
      train.train_and_evaluate(_config(data_dirs), workdir)
  return data_dirs, workdir


@pytest.fixture
def corrupt(base, tmp_path):
  """Returns `poison(split, feature, rows) -> trial` on a private data copy.

  The copy's cache gets NaN in `rows` of one trial of `split`; its TFDS
  dataset is deleted so the next run rebuilds it from the poisoned arrays.
  Yields (config, workdir copy, poison).
  """
  data_dirs, clean = base
  # Same paths as the clean run (the compiled program is keyed by the
  # config): swap the data directories for copies and put them back after.
  saved = {}
  for key in ("cache_dir", "tfds_dir"):
    saved[key] = str(tmp_path / ("saved_" + key))
    shutil.copytree(data_dirs[key], saved[key])
  workdir = str(tmp_path / "work")
  shutil.copytree(clean, workdir)
  config = _config(data_dirs)
  paths = prepare_lib.resolve_paths(config.data, workdir)

  def poison(split, feature, rows):
    trial = pipeline.load_split(config.data, paths, split).trial_names[0]
    path = os.path.join(cache.trial_dir(paths.cache_dir, trial), feature)
    values = np.load(path)
    values[rows] = np.nan
    np.save(path, values)
    shutil.rmtree(paths.tfds_dir)
    return trial

  yield config, workdir, poison
  for key in ("cache_dir", "tfds_dir"):
    shutil.rmtree(data_dirs[key])
    shutil.copytree(saved[key], data_dirs[key])


def _checkpoint_state(workdir):
  manager = checkpoints.create_manager(workdir, read_only=True)
  state = (manager.all_steps(), manager.best_step(), manager.latest_step())
  manager.close()
  return state, _tree_digest(checkpoints.directory(workdir))


def test_nan_in_training_data_stops_and_keeps_the_checkpoints(corrupt):
  config, workdir, poison = corrupt
  poison("train", "vggish.npy", slice(10, 13))
  before = _checkpoint_state(workdir)
  with pytest.raises((FloatingPointError, ValueError)) as info:
    train.train_and_evaluate(config, workdir)
  message = str(info.value)
  if isinstance(info.value, FloatingPointError):
    assert re.search(r"steps? \d+", message), message
  else:  # refused while reading the data: the file must be named
    assert "vggish.npy" in message, message
  assert _checkpoint_state(workdir) == before


def test_nan_in_a_training_trial_names_the_trial(corrupt):
  config, workdir, poison = corrupt
  trial = poison("train", "vggish.npy", slice(10, 13))
  with pytest.raises((FloatingPointError, ValueError)) as info:
    train.train_and_evaluate(config, workdir)
  assert trial in str(info.value), str(info.value)


def test_nan_in_a_validation_trial_stops_without_saving(corrupt):
  config, workdir, poison = corrupt
  trial = poison("validation", "mfcc.npy", slice(0, 3))
  before = _checkpoint_state(workdir)
  with pytest.raises((FloatingPointError, ValueError)) as info:
    train.train_and_evaluate(config, workdir)
  assert trial in str(info.value), str(info.value)
  assert _checkpoint_state(workdir) == before


def test_nan_validation_predictions_stop_before_saving(
  base, tmp_path, monkeypatch
):
  """A NaN score from the model (not the data) is caught by the loop."""
  data_dirs, clean = base
  workdir = str(tmp_path / "work")
  shutil.copytree(clean, workdir)
  config = _config(data_dirs)
  paths = prepare_lib.resolve_paths(config.data, workdir)
  trial = pipeline.load_split(config.data, paths, "validation").trial_names[0]
  real = train.make_predict_fn

  def nan_for_first_trial(*args, **kwargs):
    predict = real(*args, **kwargs)

    def wrapped(batch):
      out = predict(batch)
      out.preds = np.where((out.trial == 0)[:, None, None], np.nan, out.preds)
      return out

    return wrapped

  monkeypatch.setattr(train, "make_predict_fn", nan_for_first_trial)
  before = _checkpoint_state(workdir)
  with pytest.raises(FloatingPointError) as info:
    train.train_and_evaluate(config, workdir)
  assert trial in str(info.value), str(info.value)
  assert _checkpoint_state(workdir) == before


POISON_STEP = 7  # state.step at the poisoned update (epoch 2 is steps 6..8)


def test_nan_update_names_the_step(base, tmp_path, monkeypatch):
  data_dirs, clean = base
  workdir = str(tmp_path / "work")
  shutil.copytree(clean, workdir)
  real = train.make_train_step

  def poisoned(setup, loop_key, *, released):
    step = real(setup, loop_key, released=released)

    def wrapped(state, batch):
      new, metrics = step(state, batch)
      bad = state.step == POISON_STEP
      params = jax.tree.map(lambda p: jnp.where(bad, jnp.nan, p), new.params)
      return new.replace(params=params), metrics

    return wrapped

  # A fresh program cache: the memoised clean program has no poison.
  monkeypatch.setattr(train, "_PROGRAMS", collections.OrderedDict())
  monkeypatch.setattr(train, "make_train_step", poisoned)
  before = _checkpoint_state(workdir)
  with pytest.raises(FloatingPointError) as info:
    train.train_and_evaluate(_config(data_dirs), workdir)
  message = str(info.value)
  # The first non-finite loss is that of step POISON_STEP + 2 (1-based):
  # the named step, or step range, must contain it.
  found = re.search(r"steps? (\d+)(?:\.\.(\d+))?", message)
  assert found, message
  first = int(found.group(1))
  last = int(found.group(2) or first)
  assert first <= POISON_STEP + 2 <= last, message
  assert last - first < config_log_every(data_dirs), message
  assert _checkpoint_state(workdir) == before


def config_log_every(data_dirs):
  return _config(data_dirs).train.log_every_steps


@pytest.mark.parametrize(
  "scores, best",
  [
    ((0.5, 0.7, float("nan")), 2),
    ((0.5, float("nan"), 0.3), 1),
    ((float("nan"), 0.2, 0.1), 2),
  ],
)
def test_nan_score_never_displaces_the_best_checkpoint(tmp_path, scores, best):
  manager = checkpoints.create_manager(str(tmp_path))
  config = ml_collections.ConfigDict({"a": 1})
  for step, score in enumerate(scores, start=1):
    checkpoints.save(manager, step, {"x": jnp.ones(3)}, config, {}, score)
    manager.wait_until_finished()
  assert manager.best_step() == best
  assert manager.latest_step() == len(scores)
  assert set(manager.all_steps()) == {best, len(scores)}
  manager.close()
