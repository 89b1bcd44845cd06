"""Bad inputs: a clear error naming the file or key, non-zero exit, nothing
corrupted.

Most cases run the real command lines (`python -m affjax.main` with
`configs/test.py`, or the preprocessing CLI) in a child process on a private
copy of the tiny synthetic dataset that the test breaks. The data for the
training cases (raw, cache, TFDS) is the session's (tests/conftest.py), built
by `affjax.data.prepare` for `configs/test.py`, so the children find it
ready.

Besides failing, some cases must fail early or cleanly: a split left empty by
skipped trials stops the run before any training step, and a bad config
override is one "FATAL Flags parsing error" line (no traceback) naming the
argument and, for a misspelled key, the nearest existing key.
"""

import hashlib
import os
import shutil
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest

from affjax import checkpoints
from affjax.data import synthetic
from affjax.data.preprocess import __main__ as preprocess_cli
from affjax.data.preprocess import cache, labels
from configs import test as test_config
from tests import reliability_helpers as rh
from tests import shared_data


@pytest.fixture(scope="module")
def data(test_data_root):
  """Raw, cache and TFDS of `configs/test.py`'s synthetic data (the
  session's, read only: tests that break data copy it first)."""
  return {k: os.path.join(test_data_root, k) for k in shared_data.KINDS}


def _copy(data, tmp_path, *keys):
  """Private copies of some data directories; others stay shared."""
  dirs = dict(data)
  for key in keys:
    dirs[key] = str(tmp_path / key)
    shutil.copytree(data[key], dirs[key])
  return dirs


def _fresh(tmp_path, dirs, *keys):
  for key in keys:
    dirs[key] = str(tmp_path / ("fresh_" + key))
  return dirs


def _train(workdir, dirs, *overrides, timeout=300):
  return rh.run(
    [
      rh.PYTHON,
      "-m",
      "affjax.main",
      "--config=configs/test.py",
      f"--workdir={workdir}",
      *(f"--config.data.{k}_dir={v}" for k, v in dirs.items()),
      *overrides,
    ],
    timeout=timeout,
  )


def _annotation(raw, trial):
  for sub in ("Train_Set", "Validation_Set"):
    path = os.path.join(raw, "annotations", "VA_Set", sub, trial + ".txt")
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(trial)


def _first_trial(raw, partition_dir):
  folder = os.path.join(raw, "annotations", "VA_Set", partition_dir)
  return min(os.listdir(folder))[: -len(".txt")]


def _edit_line(path, number, text):
  with open(path) as f:
    lines = f.read().splitlines()
  lines[number - 1] = text
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def _digest(path):
  """sha256 of every data file under `path`.

  Lock files (`affjax.data.dirlock`) are left out: they record who last held
  the directory, not data.
  """
  out = {}
  for dirpath, _, files in os.walk(path):
    for name in files:
      if name.endswith(".lock"):
        continue
      p = os.path.join(dirpath, name)
      with open(p, "rb") as f:
        out[os.path.relpath(p, path)] = hashlib.sha256(f.read()).hexdigest()
  return out


# ----------------------------------------------------------------------------
# Raw data.


def test_bad_raw_files_are_all_named_and_nothing_is_built(data, tmp_path):
  """One training command on a raw dataset with six different problems."""
  dirs = _fresh(tmp_path, _copy(data, tmp_path, "raw"), "cache", "tfds")
  raw = dirs["raw"]
  trials = sorted(os.listdir(os.path.join(raw, "cropped_aligned")))
  with open(os.path.join(raw, synthetic.TEST_LIST)) as f:
    (test_trial,) = f.read().split()
  annotated = [t for t in trials if t != test_trial]

  def video(trial):
    return os.path.join(raw, "videos", trial.split("_")[0] + ".mp4")

  # Two videos: one truncated (its index is at the end), one not a video.
  with open(video(test_trial), "rb") as f:
    head = f.read()[:4000]
  with open(video(test_trial), "wb") as f:
    f.write(head)
  validation = next(
    t for t in annotated if "Validation_Set" in _annotation(raw, t)
  )
  with open(video(validation), "wb") as f:
    f.write(b"not a video " * 500)
  # Four annotation files: header, columns, number, range.
  train = [t for t in annotated if t != validation]
  assert len(train) == 4
  broken = {
    train[0]: (1, "0.1,0.2", "expected the header 'valence,arousal'"),
    train[1]: (3, "0.1,0.2,0.3", "line 3 has 3 columns"),
    train[2]: (4, "0.1,high", "line 4 is not numeric"),
    train[3]: (5, "0.5,1.7", "line 5 has 1.7"),
  }
  for trial, (line, text, _) in broken.items():
    _edit_line(_annotation(raw, trial), line, text)

  result = _train(str(tmp_path / "work"), dirs)
  assert result.returncode != 0
  err = result.stderr
  assert "6 trials have bad inputs" in err, err[-4000:]
  for path in (video(test_trial), video(validation)):
    assert f"{path}: unreadable or corrupt video" in err, err[-4000:]
  for trial, (_, _, message) in broken.items():
    assert f"{_annotation(raw, trial)}: {message}" in err, err[-4000:]
  # Nothing was built: the check runs before any feature is computed.
  assert cache.finished_trials(dirs["cache"]) == []
  assert not os.path.exists(dirs["tfds"])
  assert not os.path.exists(checkpoints.directory(str(tmp_path / "work")))


def _rewrite_audio(path, audio_seconds, n_frames, fps):
  """Rewrites `path`: `n_frames` video frames, `audio_seconds` of audio."""
  import av  # pylint: disable=g-import-not-at-top

  rate = 16000
  with av.open(path, "w") as c:
    vs = c.add_stream("libx264", rate=fps)
    vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
    aus = c.add_stream("aac", rate=rate, layout="mono")
    n = int(rate * audio_seconds)
    tone = np.sin(np.arange(n) * 0.05).astype(np.float32) * 0.3
    frame = av.AudioFrame.from_ndarray(tone[None], format="fltp", layout="mono")
    frame.sample_rate, frame.pts = rate, 0
    for p in aus.encode(frame):
      c.mux(p)
    for i in range(n_frames):
      image = np.full((48, 64, 3), i % 200, np.uint8)
      for p in vs.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
        c.mux(p)
    for s in (vs, aus):
      for p in s.encode():
        c.mux(p)


def test_audio_shorter_than_the_video(data, tmp_path, capsys):
  raw = _copy(data, tmp_path, "raw")["raw"]
  out = str(tmp_path / "cache")
  trial = _first_trial(raw, "Validation_Set")
  path = os.path.join(raw, "videos", trial + ".mp4")
  n = len(labels.read_annotation(_annotation(raw, trial)))
  seconds = n / 30.0
  # 0.5 s short: tolerated (the last feature row is repeated).
  _rewrite_audio(path, seconds - 0.5, n, 30)
  argv = [
    f"--raw={raw}",
    f"--out={out}",
    "--vggish_model=tiny",
    f"--trials={trial}",
  ]
  assert preprocess_cli.main(argv) == 0
  capsys.readouterr()
  shutil.rmtree(out)
  # 1.5 s short: more than tolerated; the error names trial and video.
  _rewrite_audio(path, seconds - 1.5, n, 30)
  assert preprocess_cli.main(argv) == 2
  err = capsys.readouterr().err
  assert f"trial {trial} ({path})" in err, err
  assert "missing" in err, err
  rh.assert_cache_consistent(out)
  assert cache.finished_trials(out) == []


def test_trial_with_every_label_invalid_is_skipped_with_a_warning(
  data, tmp_path, capsys
):
  raw = _copy(data, tmp_path, "raw")["raw"]
  out = str(tmp_path / "cache")
  trial = _first_trial(raw, "Train_Set")
  path = _annotation(raw, trial)
  n = len(labels.read_annotation(path))
  with open(path, "w") as f:
    f.write("valence,arousal\n" + "-5,-5\n" * n)
  with pytest.warns(UserWarning, match=f"skipping trial {trial}.*{path}"):
    code = preprocess_cli.main(
      [f"--raw={raw}", f"--out={out}", "--vggish_model=tiny"]
    )
  assert code == 0
  manifest = cache.read_json(os.path.join(out, cache.MANIFEST))
  assert trial in manifest["skipped"] and trial not in manifest["trials"]
  assert trial not in cache.finished_trials(out)


def test_empty_validation_split_stops_before_training(data, tmp_path):
  """The only validation trial of fold 0 has no valid label (skipped)."""
  dirs = _fresh(tmp_path, _copy(data, tmp_path, "raw"), "cache", "tfds")
  trial = _first_trial(dirs["raw"], "Validation_Set")
  path = _annotation(dirs["raw"], trial)
  n = len(labels.read_annotation(path))
  with open(path, "w") as f:
    f.write("valence,arousal\n" + "-5,-5\n" * n)
  workdir = str(tmp_path / "work")
  result = _train(workdir, dirs)
  assert result.returncode != 0
  err = result.stderr
  # The failure names the split and the trial (the skip warning alone
  # names the trial's annotation file under Validation_Set/).
  message = err[err.rfind("Error") :]
  assert "validation" in message and trial in message, err[-3000:]
  assert "train/loss" not in err, "trained before failing"
  assert not os.path.exists(checkpoints.directory(workdir))


# ----------------------------------------------------------------------------
# Feature cache.


def test_feature_arrays_of_mismatched_length(data, tmp_path):
  dirs = _fresh(tmp_path, _copy(data, tmp_path, "cache"), "tfds")
  trial = cache.finished_trials(dirs["cache"])[0]
  path = os.path.join(cache.trial_dir(dirs["cache"], trial), "mfcc.npy")
  np.save(path, np.load(path)[:-5])
  before = _digest(dirs["cache"])
  result = _train(str(tmp_path / "work"), dirs)
  assert result.returncode != 0
  assert path in result.stderr, result.stderr[-4000:]
  assert "rows" in result.stderr, result.stderr[-4000:]
  assert _digest(dirs["cache"]) == before
  assert not os.path.exists(checkpoints.directory(str(tmp_path / "work")))


# ----------------------------------------------------------------------------
# Config.


@pytest.mark.parametrize(
  "override, expected",
  [
    (
      "--config.data.window_length=abc",
      "--config.data.window_length=abc: invalid literal for int()",
    ),
    ("--config.model.kernel_size=3.5", "--config.model.kernel_size=3.5"),
    ("--config.data.fold=9", "fold must be an integer in [0, 6), got 9"),
  ],
)
def test_config_value_of_the_wrong_type_or_range(
  data, tmp_path, override, expected
):
  workdir = str(tmp_path / "work")
  result = _train(workdir, data, override)
  assert result.returncode != 0
  assert expected in result.stderr, result.stderr[-4000:]
  assert not os.path.exists(checkpoints.directory(workdir))


def test_misspelled_config_key_names_the_argument(data, tmp_path):
  result = _train(str(tmp_path / "w"), data, "--config.model.kernal_size=3")
  assert result.returncode != 0
  err = result.stderr
  assert "--config.model.kernal_size=3: the config has no field" in err, err
  assert "'kernal_size'" in err and "kernel_size" in err, err
  assert "Traceback" not in err, err[-3000:]


def test_wrong_type_fails_without_a_traceback(data, tmp_path):
  result = _train(str(tmp_path / "w"), data, "--config.data.window_length=abc")
  assert result.returncode != 0
  assert "--config.data.window_length=abc" in result.stderr
  assert "Traceback" not in result.stderr, result.stderr[-3000:]


def test_workdir_with_checkpoints_of_another_config(data, tmp_path):
  workdir = str(tmp_path / "work")
  config = test_config.get_config()
  config.unlock()
  config.data.update({f"{k}_dir": v for k, v in data.items()})
  manager = checkpoints.create_manager(workdir)
  checkpoints.save(
    manager, 1, {"x": jnp.zeros(3)}, config.lock(), {"plateau": {}}, 0.1
  )
  manager.wait_until_finished()
  manager.close()
  before = _digest(checkpoints.directory(workdir))
  result = _train(
    workdir,
    data,
    "--config.model.kernel_size=5",
    "--config.optim.learning_rate=0.01",
  )
  assert result.returncode != 0
  err = result.stderr
  assert "model.kernel_size: checkpoint 3, given 5" in err, err[-4000:]
  assert "optim.learning_rate: checkpoint 0.001, given 0.01" in err, err[-4000:]
  assert checkpoints.directory(workdir) in err
  assert _digest(checkpoints.directory(workdir)) == before


# ----------------------------------------------------------------------------
# Workdir.


def test_workdir_under_a_regular_file(data, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  result = _train(str(blocker / "work"), data)
  assert result.returncode != 0
  assert f"{blocker} is not a directory" in result.stderr, result.stderr[-4000:]
  assert blocker.read_text() == "not a directory"


def test_read_only_workdir(data, tmp_path):
  """A read-only file system (root ignores permission bits)."""
  mount = tmp_path / "ro"
  mount.mkdir()
  cmd = subprocess.list2cmdline(
    [
      rh.PYTHON,
      "-m",
      "affjax.main",
      "--config=configs/test.py",
      f"--workdir={mount / 'work'}",
      *(f"--config.data.{k}_dir={v}" for k, v in data.items()),
    ]
  )
  result = subprocess.run(
    [
      "unshare",
      "-m",
      "sh",
      "-c",
      f"mount -t tmpfs -o ro,size=1m tmpfs {mount} && exec {cmd}",
    ],
    cwd=rh.ROOT,
    env=rh.child_env(),
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert result.returncode != 0
  assert "Read-only file system" in result.stderr, result.stderr[-4000:]
  assert str(mount / "work") in result.stderr, result.stderr[-4000:]
