"""Tests of the window start rule and of stitching windows into trials."""

import numpy as np
import pytest

from affjax.data import stitch


def _reference_starts(length, window, hop):
  """The reference's loop (sucv/ABAW2 base/dataset.py), restated."""
  starts, start = [], 0
  if start + window < length:
    while start + window < length:
      starts.append(start)
      start += hop
    starts.append(length - window)
  else:
    starts.append(0)
  return starts


def test_window_starts_hand_cases():
  np.testing.assert_array_equal(stitch.window_starts(500, 300, 200), [0, 200])
  np.testing.assert_array_equal(stitch.window_starts(400, 300, 200), [0, 100])
  np.testing.assert_array_equal(stitch.window_starts(300, 300, 200), [0])
  np.testing.assert_array_equal(stitch.window_starts(120, 300, 200), [0])
  np.testing.assert_array_equal(stitch.window_starts(301, 300, 200), [0, 1])
  np.testing.assert_array_equal(
    stitch.window_starts(1000, 300, 200), [0, 200, 400, 600, 700]
  )
  assert stitch.num_windows(1000, 300, 200) == 5


@pytest.mark.parametrize(
  "window,hop", [(300, 200), (300, 300), (7, 3), (5, 1), (4, 4)]
)
def test_window_starts_match_reference_loop(window, hop):
  for length in range(1, 4 * window + 3):
    got = stitch.window_starts(length, window, hop)
    assert got.tolist() == _reference_starts(length, window, hop), length
    ends = np.minimum(got + window, length)
    assert ends[-1] == length  # the last window ends at the trial's end
    covered = np.zeros(length, bool)
    for s, e in zip(got, ends):
      covered[s:e] = True
    assert covered.all()


def test_window_starts_invalid():
  with pytest.raises(ValueError, match="skip"):
    stitch.window_starts(100, 10, 11)
  with pytest.raises(ValueError, match="> 0"):
    stitch.window_starts(0, 10, 5)


def _windows(lengths, window, hop, values):
  """Windows of per-trial values, padded like the pipeline pads them."""
  preds, trial, index = [], [], []
  for i, length in enumerate(lengths):
    for s in stitch.window_starts(length, window, hop):
      idx = np.arange(s, s + window)
      idx[idx >= length] = -1
      w = np.zeros((window, values[i].shape[1]), np.float32)
      w[idx >= 0] = values[i][idx[idx >= 0]]
      w[idx < 0] = 99.0  # garbage on padding must be ignored
      preds.append(w)
      trial.append(i)
      index.append(idx)
  return np.stack(preds), np.array(trial), np.stack(index)


def test_round_trip_exact():
  rng = np.random.default_rng(0)
  lengths = [3, 10, 11, 25]
  values = [rng.normal(size=(n, 2)).astype(np.float32) for n in lengths]
  preds, trial, index = _windows(lengths, 10, 4, values)
  # Padding rows at the end (trial -1) must be ignored.
  preds = np.concatenate([preds, np.full((2, 10, 2), 7.0, np.float32)])
  trial = np.concatenate([trial, [-1, -1]])
  index = np.concatenate([index, np.full((2, 10), -1)])
  out = stitch.stitch_windows(preds, trial, index, lengths)
  assert len(out) == 4
  for o, v in zip(out, values):
    assert o.shape == v.shape
    np.testing.assert_array_equal(o, v.astype(np.float64))


def test_overlaps_are_averaged():
  # Trial of 6 frames, windows [0,4) and [2,6): frames 2, 3 are shared.
  preds = np.array([[[1.0], [1.0], [1.0], [1.0]], [[3.0], [3.0], [3.0], [3.0]]])
  index = np.array([[0, 1, 2, 3], [2, 3, 4, 5]])
  out = stitch.stitch_windows(preds, np.array([0, 0]), index, [6])
  np.testing.assert_array_equal(out[0][:, 0], [1, 1, 2, 2, 3, 3])


def test_uncovered_frame_raises():
  preds = np.ones((1, 4, 1))
  with pytest.raises(ValueError, match="covered by no window"):
    stitch.stitch_windows(preds, np.array([0]), np.array([[0, 1, 2, 3]]), [5])
  with pytest.raises(ValueError, match="beyond"):
    stitch.stitch_windows(preds, np.array([0]), np.array([[0, 1, 2, 3]]), [3])
  with pytest.raises(ValueError, match="expected"):
    stitch.stitch_windows(preds, np.array([0, 0]), np.zeros((1, 4)), [4])
