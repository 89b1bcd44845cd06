"""Tests for affjax.merge with small fake fold outputs."""

import itertools

import numpy as np
import pytest

from affjax import evaluate, merge


def _centering_loop(data):
  """Float64 loop version of the reference's CCC centering (+ late clip)."""
  n = data.shape[0]
  if n == 1:
    return np.clip(data[0], -1, 1)

  def pair(x, y):
    cov = np.mean((x - x.mean()) * (y - y.mean()))
    vx = np.sum((x - x.mean()) ** 2) / (len(x) - 1)
    vy = np.sum((y - y.mean()) ** 2) / (len(y) - 1)
    return 2 * cov / (vx + vy + (x.mean() - y.mean()) ** 2 + 1e-100)

  ccc = np.zeros((n, n))
  for i, j in itertools.permutations(range(n), 2):
    ccc[i, j] = pair(data[i], data[j])
  agreement = ccc.sum(1) / (n - 1)
  means = data.mean(1)
  weight = np.sum(means * agreement / agreement.sum())
  return np.clip((data - means[:, None] + weight).mean(0), -1, 1)


def _write_fold(directory, trials, emotions, seed, scale=1.0):
  rng = np.random.default_rng(seed)
  out = {}
  for name, n in trials.items():
    t = np.linspace(0, 5, n)
    series = np.stack(
      [
        scale * np.sin(t + k)
        + rng.uniform(-0.3, 0.3)
        + 0.1 * rng.normal(size=n)
        for k in range(len(emotions))
      ],
      axis=1,
    )
    path = str(directory / f"{name}.txt")
    evaluate.write_prediction_file(path, series, emotions)
    # The truth for the checks is what the file holds (9 digits).
    out[name] = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    np.testing.assert_allclose(out[name], series, rtol=1e-8)
  return out


TRIALS = {"10-60-1280x720_right": 40, "video7": 25, "short": 3}


def test_merge_two_head_folds_matches_reference(tmp_path):
  folds = []
  for f in range(4):
    d = tmp_path / f"fold{f}"
    d.mkdir()
    folds.append(
      (d, _write_fold(d, TRIALS, ("valence", "arousal"), f, scale=1.3))
    )
  out = tmp_path / "submission"
  merged = merge.merge_folds([d for d, _ in folds], out)
  assert sorted(merged) == sorted(TRIALS)
  for name, n in TRIALS.items():
    names, data = evaluate.read_prediction_file(str(out / f"{name}.txt"))
    assert names == ["valence", "arousal"]
    assert data.shape == (n, 2)
    assert (out / f"{name}.txt").read_text().startswith("valence,arousal\n")
    for c in range(2):
      want = _centering_loop(np.stack([s[name][:, c] for _, s in folds]))
      np.testing.assert_allclose(merged[name][:, c], want, atol=1e-9)
      np.testing.assert_allclose(data[:, c], want, atol=1e-8)
  assert np.abs(np.concatenate(list(merged.values()))).max() <= 1.0


def test_merge_single_emotion_runs_in_reference_layout(tmp_path):
  # One run per emotion and fold; the reference's header is capitalised.
  val, aro = [], []
  for f in range(3):
    for emotion, store in (("Valence", val), ("Arousal", aro)):
      d = tmp_path / f"{emotion}{f}"
      d.mkdir()
      store.append(
        (d, _write_fold(d, TRIALS, (emotion,), 10 * f + len(emotion)))
      )
  out = tmp_path / "sub"
  merged = merge.merge_folds(
    [d for d, _ in aro + val], out, ("valence", "arousal")
  )
  for name in TRIALS:
    want_v = _centering_loop(np.stack([s[name][:, 0] for _, s in val]))
    want_a = _centering_loop(np.stack([s[name][:, 0] for _, s in aro]))
    np.testing.assert_allclose(merged[name][:, 0], want_v, atol=1e-9)
    np.testing.assert_allclose(merged[name][:, 1], want_a, atol=1e-9)


def test_single_fold_is_clipped_copy(tmp_path):
  d = tmp_path / "f0"
  d.mkdir()
  (d / "a.txt").write_text("valence,arousal\n1.5,-0.25\n-2,0.5\n0.1,0.2\n")
  merged = merge.merge_folds([d], tmp_path / "out")
  np.testing.assert_allclose(
    merged["a"], [[1.0, -0.25], [-1.0, 0.5], [0.1, 0.2]]
  )


def _two_folds(tmp_path):
  dirs = []
  for f in range(2):
    d = tmp_path / f"f{f}"
    d.mkdir()
    _write_fold(d, {"a": 10, "b": 12}, ("valence", "arousal"), f)
    dirs.append(d)
  return dirs


def test_mismatched_trial_sets(tmp_path):
  dirs = _two_folds(tmp_path)
  (dirs[1] / "b.txt").unlink()
  with pytest.raises(ValueError, match=r"trial sets differ.*\['b'\]"):
    merge.merge_folds(dirs, tmp_path / "out")
  with pytest.raises(ValueError, match=r"f1: missing predictions.*'b'"):
    merge.merge_folds(dirs, tmp_path / "out", trials=["a", "b"])
  # With an explicit list, only those trials are needed and merged.
  assert sorted(merge.merge_folds(dirs, tmp_path / "out", trials=["a"])) == [
    "a"
  ]


def test_mismatched_lengths_name_both_files(tmp_path):
  dirs = _two_folds(tmp_path)
  evaluate.write_prediction_file(
    str(dirs[1] / "a.txt"), np.zeros((9, 2)), ("valence", "arousal")
  )
  with pytest.raises(ValueError, match=r"f0/a\.txt has 10.*f1/a\.txt has 9"):
    merge.merge_folds(dirs, tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_nan_names_the_file(tmp_path):
  dirs = _two_folds(tmp_path)
  text = (dirs[0] / "b.txt").read_text().splitlines()
  text[4] = "nan,0.1"
  (dirs[0] / "b.txt").write_text("\n".join(text) + "\n")
  with pytest.raises(ValueError, match=r"f0/b\.txt, line 5: non-finite"):
    merge.merge_folds(dirs, tmp_path / "out")


def test_missing_emotion_and_missing_dir(tmp_path):
  dirs = _two_folds(tmp_path)
  with pytest.raises(ValueError, match="dominance"):
    merge.merge_folds(dirs, tmp_path / "out", ("valence", "dominance"))
  with pytest.raises(FileNotFoundError, match="nope"):
    merge.merge_folds([tmp_path / "nope"], tmp_path / "out")


def test_merge_runs_in_float64_on_a_cpu_device(tmp_path, monkeypatch):
  """The merge's arrays live on the host CPU in float64.

  On this CPU-only machine the default device is a CPU too, so this pins the
  dtype and the placement the merge asks for, not a TPU's absence of f64.
  """
  from affjax import ensemble

  seen = []
  real = ensemble.merge_folds

  def spy(x):
    out = real(x)
    seen.append((out.dtype, {d.platform for d in out.devices()}))
    return out

  monkeypatch.setattr(ensemble, "merge_folds", spy)
  trials = {"a": 30, "b": 20}
  folds = []
  for i in range(3):
    (tmp_path / f"f{i}").mkdir()
    folds.append(
      _write_fold(tmp_path / f"f{i}", trials, ("valence", "arousal"), seed=i)
    )
  got = merge.merge_folds(
    [tmp_path / f"f{i}" for i in range(3)], tmp_path / "o"
  )
  assert seen == [(np.float64, {"cpu"})] * 2
  for name in trials:
    for k in range(2):
      want = _centering_loop(np.stack([f[name][:, k] for f in folds]))
      np.testing.assert_allclose(got[name][:, k], want, rtol=0, atol=1e-12)
