"""End to end on the synthetic data with `configs/test.py` (8 fake devices).

One uninterrupted run, one run interrupted inside its second epoch and then
resumed, and an evaluation of the best checkpoint. The data (generation,
preprocessing, TFDS) is the session's (tests/conftest.py).
"""

import json
import os
import shutil

import numpy as np
import pytest

from affjax import checkpoints, train
from tests import shared_data


class Interrupted(Exception):
  pass


@pytest.fixture(scope="module")
def data_dirs(test_data_root):
  """The session's `configs/test.py` data (read only)."""
  return test_data_root


def _config(data_root):
  return shared_data.test_config(data_root)


@pytest.fixture(scope="module")
def uninterrupted(trained_run, tmp_path_factory):
  """A copy of the session's uninterrupted run: these tests write into it."""
  workdir = str(tmp_path_factory.mktemp("full") / "work")
  shutil.copytree(trained_run[0], workdir)
  return workdir, trained_run[1]


def test_training_runs_releases_and_keeps_latest_and_best(uninterrupted):
  workdir, summary = uninterrupted
  # 3 epochs (max_epochs); test.py's lr/min-lr make a release likely, and the
  # schedule itself is covered in test_optim.py.
  assert summary["epochs"] == 3
  assert summary["stop_reason"] == "max_epochs"
  manager = checkpoints.create_manager(workdir, read_only=True)
  assert manager.latest_step() == 3
  assert manager.best_step() == summary["best_epoch"] + 1
  meta = checkpoints.restore(manager, 3).metadata
  assert meta["emotions"] == ["valence", "arousal"]
  assert set(meta["feature_stats"]) >= {"vggish", "mfcc"}
  assert meta["plateau"]["epoch"] == 3
  assert meta["preprocess_settings"]["frame_size"] == 48
  assert np.isfinite(summary["best_ccc"])


def test_interrupted_then_resumed_matches_uninterrupted(
  uninterrupted, data_dirs, tmp_path, monkeypatch
):
  _, full = uninterrupted
  workdir = str(tmp_path / "resumed")
  real_train_epoch = train.train_epoch
  calls = []

  def crashing_train_epoch(state, *args, **kwargs):
    calls.append(int(state.step))
    if len(calls) == 2:  # inside the second epoch
      raise Interrupted()
    return real_train_epoch(state, *args, **kwargs)

  monkeypatch.setattr(train, "train_epoch", crashing_train_epoch)
  with pytest.raises(Interrupted):
    train.train_and_evaluate(_config(data_dirs), workdir)
  manager = checkpoints.create_manager(workdir, read_only=True)
  assert manager.latest_step() == 1
  saved_step = checkpoints.restore(manager, 1).metadata["step"]
  manager.close()

  calls.clear()

  def counting_train_epoch(state, *args, **kwargs):
    calls.append(int(state.step))
    return real_train_epoch(state, *args, **kwargs)

  monkeypatch.setattr(train, "train_epoch", counting_train_epoch)
  resumed = train.train_and_evaluate(_config(data_dirs), workdir)
  # Resumed at epoch 1 from the saved step, then ran epochs 1 and 2 only.
  assert len(calls) == 2 and calls[0] == saved_step
  assert resumed["step"] == full["step"]
  assert resumed["best_epoch"] == full["best_epoch"]
  np.testing.assert_allclose(
    resumed["best_ccc"], full["best_ccc"], rtol=1e-6, atol=1e-7
  )
  for emotion, scores in full["validation"]["overall"].items():
    for name, value in scores.items():
      np.testing.assert_allclose(
        resumed["validation"]["overall"][emotion][name],
        value,
        rtol=1e-6,
        atol=1e-7,
        err_msg=f"{emotion}/{name}",
      )


def test_evaluate_reproduces_logged_validation_ccc(uninterrupted, data_dirs):
  workdir, summary = uninterrupted
  results = train.evaluate_checkpoint(_config(data_dirs), workdir)
  assert results["step"] == summary["best_epoch"] + 1
  np.testing.assert_allclose(
    results["ccc_mean"], summary["best_ccc"], rtol=1e-6, atol=1e-7
  )
  for emotion, scores in summary["validation"]["overall"].items():
    np.testing.assert_allclose(
      results["overall"][emotion]["ccc"], scores["ccc"], rtol=1e-6, atol=1e-7
    )
  out_dir = os.path.join(workdir, "eval", f"validation_{results['step']}")
  with open(os.path.join(out_dir, "results.json")) as f:
    written = json.load(f)
  np.testing.assert_allclose(
    written["ccc_mean"], summary["best_ccc"], rtol=1e-6
  )
  assert os.listdir(os.path.join(out_dir, "predictions"))


def test_evaluate_rejects_a_different_model_config(uninterrupted, data_dirs):
  workdir, _ = uninterrupted
  config = _config(data_dirs)
  config.model.kernel_size = 5
  with pytest.raises(
    ValueError, match="model.kernel_size: checkpoint 3, given 5"
  ):
    train.evaluate_checkpoint(config, workdir)


def test_train_mode_ends_with_an_evaluation_of_the_best(
  uninterrupted, data_dirs
):
  workdir, summary = uninterrupted
  config = _config(data_dirs)
  config.eval.after_training = True
  # The run has reached max_epochs: training stops at once, then evaluates.
  again, results = train.train_then_evaluate(config, workdir)
  assert again["best_epoch"] == summary["best_epoch"]
  assert results["step"] == summary["best_epoch"] + 1
  assert results["out_dir"] == os.path.join(
    workdir, "eval", f"validation_{results['step']}"
  )
  with open(os.path.join(results["out_dir"], "results.json")) as f:
    assert json.load(f)["ccc_mean"] == pytest.approx(summary["best_ccc"])
  config.eval.after_training = False
  assert train.train_then_evaluate(config, workdir)[1] is None
