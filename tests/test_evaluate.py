"""Tests for affjax.evaluate with a fake model of fixed outputs."""

import dataclasses
import json
import os
import sys
import types

import numpy as np
import pytest

from affjax import evaluate

EMOTIONS = ("valence", "arousal")
WINDOW, HOP = 12, 8


def _stitch_reference(preds, trial, frame_index, trial_lengths):
  """Test-only stand-in for affjax.data.stitch.stitch_windows."""
  sums = [np.zeros((n, preds.shape[-1])) for n in trial_lengths]
  counts = [np.zeros((n, 1)) for n in trial_lengths]
  for w in range(preds.shape[0]):
    if trial[w] < 0:
      continue
    for k, f in enumerate(frame_index[w]):
      if f >= 0:
        sums[trial[w]][f] += preds[w, k]
        counts[trial[w]][f] += 1
  return [s / np.maximum(c, 1) for s, c in zip(sums, counts)]


@pytest.fixture(autouse=True)
def _stitch_module(monkeypatch):
  """Uses the real stitch module when it exists (data helper D2's)."""
  try:
    import affjax.data.stitch  # noqa: F401
  except ModuleNotFoundError:
    fake = types.ModuleType("affjax.data.stitch")
    fake.stitch_windows = _stitch_reference
    monkeypatch.setitem(sys.modules, "affjax.data.stitch", fake)


@dataclasses.dataclass
class FakeSplit:
  name: str
  trial_names: list
  trial_lengths: np.ndarray
  labels: list
  label_masks: list


def _split(lengths=(30, 7, 21), seed=0):
  rng = np.random.default_rng(seed)
  labels, masks = [], []
  for n in lengths:
    t = np.linspace(0, 3, n)
    lab = np.stack([np.sin(t + rng.uniform()), 0.5 * np.cos(2 * t)], 1)
    mask = np.ones(n, bool)
    mask[rng.integers(0, n, 2)] = False
    labels.append(np.where(mask[:, None], lab, -5.0).astype(np.float32))
    masks.append(mask)
  names = [f"trial{i}" for i in range(len(lengths))]
  return FakeSplit("validation", names, np.asarray(lengths), labels, masks)


def _batches(split, batch_size=3):
  """Reference windowing: hop 8, last window ends at the trial end."""
  rows = []
  for i, n in enumerate(split.trial_lengths):
    starts = list(range(0, max(n - WINDOW, 0) + 1, HOP))
    if n > WINDOW and starts[-1] != n - WINDOW:
      starts.append(n - WINDOW)
    for s in starts:
      idx = np.arange(s, s + WINDOW)
      rows.append((i, np.where(idx < n, idx, -1)))
  while len(rows) % batch_size:
    rows.append((-1, np.full(WINDOW, -1)))
  for b in range(0, len(rows), batch_size):
    chunk = rows[b : b + batch_size]
    trial = np.array([r[0] for r in chunk], np.int32)
    frame_index = np.stack([r[1] for r in chunk]).astype(np.int32)
    label = np.zeros((len(chunk), WINDOW, 2), np.float32)
    for j, (t, idx) in enumerate(chunk):
      if t >= 0:
        ok = idx >= 0
        label[j, ok] = split.labels[t][idx[ok]]
    yield {"trial": trial, "frame_index": frame_index, "label": label}


def _label_model(shift=(0.0, 0.0), noise_seed=None):
  """Fake predict_fn: the window's label (+ shift), fixed per frame."""

  def predict(batch):
    out = batch["label"] + np.asarray(shift, np.float32)
    if noise_seed is not None:
      # Noise that depends on (trial, frame) only, so overlapping windows
      # agree and stitching is exact.
      key = batch["trial"][:, None] * 1000 + batch["frame_index"]
      out = out + 0.1 * np.sin(key * 1.7 + noise_seed)[..., None]
    return out

  return predict


def _concat_valid(split, stitched, c):
  p = np.concatenate([s[m, c] for s, m in zip(stitched, split.label_masks)])
  t = np.concatenate([l[m, c] for l, m in zip(split.labels, split.label_masks)])
  return p, t.astype(np.float64)


def test_perfect_model_scores_one_and_writes_files(tmp_path):
  split = _split()
  res = evaluate.evaluate_windows(
    _label_model(), _batches(split), split, EMOTIONS, out_dir=str(tmp_path)
  )
  for e in EMOTIONS:
    assert res["overall"][e]["ccc"] == pytest.approx(1.0, abs=1e-6)
    assert res["overall"][e]["pcc"] == pytest.approx(1.0, abs=1e-6)
    assert res["overall"][e]["rmse"] == pytest.approx(0.0, abs=1e-6)
    assert res["overall"][e]["num_frames"] == sum(
      int(m.sum()) for m in split.label_masks
    )
  assert res["ccc_mean"] == pytest.approx(1.0, abs=1e-6)
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert on_disk["overall"]["arousal"]["ccc"] == pytest.approx(1.0, abs=1e-6)
  assert sorted(on_disk["trials"]) == split.trial_names
  for i, name in enumerate(split.trial_names):
    names, data = evaluate.read_prediction_file(
      str(tmp_path / "predictions" / f"{name}.txt")
    )
    assert names == list(EMOTIONS)
    assert data.shape == (split.trial_lengths[i], 2)
    # Invalid frames carry the -5 label the fake model copies.
    np.testing.assert_allclose(data, split.labels[i], atol=1e-6)
    png = (tmp_path / "plots" / f"{name}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_constant_shift_gives_known_partition_ccc():
  split = _split(seed=1)
  shift = (0.3, -0.2)
  res = evaluate.evaluate_windows(
    _label_model(shift), _batches(split), split, EMOTIONS
  )
  for c, e in enumerate(EMOTIONS):
    t = np.concatenate(
      [l[m, c] for l, m in zip(split.labels, split.label_masks)]
    ).astype(float)
    want = 2 * t.var() / (2 * t.var() + shift[c] ** 2)
    assert res["overall"][e]["ccc"] == pytest.approx(want, rel=1e-5)
    assert res["overall"][e]["rmse"] == pytest.approx(abs(shift[c]), rel=1e-5)


def test_partition_level_is_concatenation_not_trial_average():
  split = _split(seed=2)
  noisy = _label_model(noise_seed=3)

  def predict(batch):
    # A trial-dependent offset separates partition-level from mean-of-trials.
    return noisy(batch) + 0.2 * batch["trial"][:, None, None]

  res = evaluate.evaluate_windows(predict, _batches(split), split, EMOTIONS)
  windows = evaluate.collect_windows(predict, _batches(split))
  stitched = evaluate.stitch_trials(windows, split)
  for c, e in enumerate(EMOTIONS):
    p, t = _concat_valid(split, stitched, c)
    cov = np.mean((p - p.mean()) * (t - t.mean()))
    want = 2 * cov / (p.var() + t.var() + (p.mean() - t.mean()) ** 2)
    assert res["overall"][e]["ccc"] == pytest.approx(want, rel=1e-9)
    np.testing.assert_allclose(
      res["overall"][e]["pcc"], np.corrcoef(p, t)[0, 1], rtol=1e-9
    )
    per_trial = [res["trials"][n][e]["ccc"] for n in split.trial_names]
    assert abs(np.mean(per_trial) - want) > 1e-3
    # Per-trial values are each trial's own CCC.
    m = split.label_masks[1]
    p1, t1 = stitched[1][m, c], split.labels[1][m, c].astype(float)
    cov1 = np.mean((p1 - p1.mean()) * (t1 - t1.mean()))
    want1 = 2 * cov1 / (p1.var() + t1.var() + (p1.mean() - t1.mean()) ** 2)
    assert res["trials"]["trial1"][e]["ccc"] == pytest.approx(want1, rel=1e-6)


def test_overlapping_windows_are_averaged():
  split = _split(lengths=(20,), seed=4)

  # Window outputs equal to the window's row number: frames 8..11 are
  # covered by windows 0 and 1, so they get 0.5; the last window (start 8)
  # makes frames 12..19 equal 1.
  def predict(batch):
    rows = np.arange(batch["trial"].shape[0], dtype=np.float32)
    return np.broadcast_to(rows[:, None, None], batch["label"].shape).copy()

  windows = evaluate.collect_windows(predict, _batches(split, batch_size=4))
  stitched = evaluate.stitch_trials(windows, split)[0]
  np.testing.assert_allclose(stitched[:8, 0], 0.0)
  np.testing.assert_allclose(stitched[8:12, 0], 0.5)
  np.testing.assert_allclose(stitched[12:, 0], 1.0)


def test_missing_windows_name_the_trial():
  split = _split()
  batches = list(_batches(split))
  for b in batches:
    # Drop the last window of trial 2 as if another process had it.
    last = np.flatnonzero(b["trial"] == 2)
    if last.size and b["frame_index"][last[-1]].max() == 20:
      b["trial"][last[-1]] = -1
  with pytest.raises(ValueError, match="trial2"):
    evaluate.evaluate_windows(_label_model(), batches, split, EMOTIONS)


def test_output_channel_mismatch():
  split = _split()
  with pytest.raises(ValueError, match="outputs"):
    evaluate.evaluate_windows(
      _label_model(), _batches(split), split, ("valence",)
    )


def test_nan_metrics_are_null_in_json(tmp_path):
  split = _split(lengths=(14,))
  split.label_masks[0][:] = False
  res = evaluate.evaluate_windows(
    _label_model(),
    _batches(split),
    split,
    EMOTIONS,
    out_dir=str(tmp_path),
    plots=False,
  )
  assert np.isnan(res["overall"]["valence"]["ccc"])
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert on_disk["overall"]["valence"]["ccc"] is None
  assert not (tmp_path / "plots").exists()
  assert evaluate.scalars(res, "eval/")["eval/valence/rmse"] != 0


def test_prediction_file_errors(tmp_path):
  path = tmp_path / "t.txt"
  path.write_text("valence,arousal\n0.1,0.2\nnan,0.3\n")
  with pytest.raises(ValueError, match=r"t\.txt, line 3: non-finite"):
    evaluate.read_prediction_file(str(path))
  path.write_text("valence,arousal\n0.1\n")
  with pytest.raises(ValueError, match=r"line 2: 1 values, expected 2"):
    evaluate.read_prediction_file(str(path))
  with pytest.raises(FileNotFoundError):
    evaluate.read_prediction_file(str(tmp_path / "missing.txt"))
