"""Tests of the reference's 6-fold cross-validation rule."""

import numpy as np
import pytest

from affjax.data import folds


def _names(prefix, n):
  return [f"{prefix}{i:03d}" for i in range(n)]


def test_351_trials_match_reference_slices():
  train = _names("t", 351)
  val = _names("v", 70)
  parts = folds.chunks(train[::-1], val)  # input order must not matter
  bounds = [(0, 70), (70, 140), (140, 210), (210, 280), (280, 351)]
  for i, (a, b) in enumerate(bounds):
    assert parts[i] == train[a:b]
  assert parts[5] == val
  tr, va = folds.fold_partitions(train, val, 0)
  assert tr == train and va == val  # fold 0 = official split


def test_rolled_order_picks_validation_chunk():
  train = _names("t", 351)
  val = _names("v", 70)
  parts = folds.chunks(train, val)
  # np.roll(range(6), f)[-1] = 5 - f.
  for fold, expect_val in zip(range(6), (5, 4, 3, 2, 1, 0)):
    ids, val_id = folds.fold_chunks(fold)
    assert val_id == expect_val
    assert ids == np.roll(np.arange(6), fold)[:-1].tolist()
    tr, va = folds.fold_partitions(train, val, fold)
    assert va == parts[expect_val]
    assert tr == sorted(set(train + val) - set(va))
    assert len(tr) + len(va) == 421


def test_small_counts_remainder_goes_to_last_chunk():
  parts = folds.chunks(_names("t", 12), ["v0"])
  assert [len(p) for p in parts] == [2, 2, 2, 2, 4, 1]
  assert parts[4] == ["t008", "t009", "t010", "t011"]
  parts = folds.chunks(_names("t", 3), ["v0", "v1"])
  assert [len(p) for p in parts] == [0, 0, 0, 0, 3, 2]
  tr, va = folds.fold_partitions(_names("t", 3), ["v0", "v1"], 1)
  assert va == ["t000", "t001", "t002"] and tr == ["v0", "v1"]


def test_every_trial_validated_exactly_once_over_folds():
  train, val = _names("t", 23), _names("v", 4)
  seen = []
  for fold in range(6):
    tr, va = folds.fold_partitions(train, val, fold)
    assert not set(tr) & set(va)
    seen += va
  assert sorted(seen) == sorted(train + val)


@pytest.mark.parametrize("fold", [-1, 6, 1.5, "0", True])
def test_invalid_fold_raises(fold):
  with pytest.raises(ValueError, match="fold"):
    folds.fold_partitions(["a"], ["b"], fold)


def test_overlapping_partitions_raise():
  with pytest.raises(ValueError, match="both"):
    folds.chunks(["a", "b"], ["b"])
  with pytest.raises(ValueError, match="repeated"):
    folds.chunks(["a", "a"], ["b"])
