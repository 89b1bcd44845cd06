"""The reference's 6-fold cross-validation over train + validation trials.

sucv/ABAW2 (`base/dataset.py`) cuts the sorted training trials into five
chunks (for its 351 trials: 0:70, 70:140, 140:210, 210:280, 280:351) and
uses the official validation set as a sixth chunk. Fold f rolls the chunk
order by f (`np.roll(range(6), f)`) and validates on the last chunk of the
rolled order, training on the other five. Fold 0 is therefore the official
split; fold 1 validates on chunk 4, fold 2 on chunk 3, and so on.

For any number of training trials n the first four chunks hold n // 5 trials
each and the last one the rest (n = 351 gives the reference's 70 x 4 + 71).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NUM_FOLDS = 6
NUM_TRAIN_CHUNKS = 5
VALIDATION_CHUNK = NUM_FOLDS - 1  # the official validation set


def check_fold(fold: int) -> int:
  """Returns `fold` as an int, or raises ValueError if not in [0, 6)."""
  ok = isinstance(fold, (int, np.integer)) and not isinstance(fold, bool)
  if not ok or not 0 <= fold < NUM_FOLDS:
    raise ValueError(
      f"fold must be an integer in [0, {NUM_FOLDS}), got {fold!r}"
    )
  return int(fold)


def chunks(
  train_trials: Sequence[str], validation_trials: Sequence[str]
) -> list[list[str]]:
  """The six chunks: five of the sorted training trials, then validation.

  Args:
    train_trials: names of the official training trials (any order).
    validation_trials: names of the official validation trials.

  Returns:
    Six sorted name lists; chunk 5 is the official validation set.

  Raises:
    ValueError: a name is repeated or appears in both partitions.
  """
  train = sorted(train_trials)
  validation = sorted(validation_trials)
  for label, names in (("training", train), ("validation", validation)):
    if len(set(names)) != len(names):
      dup = sorted({n for n in names if names.count(n) > 1})
      raise ValueError(f"repeated {label} trial names: {dup[:5]}")
  both = sorted(set(train) & set(validation))
  if both:
    raise ValueError(f"trials in both training and validation: {both[:5]}")
  size = len(train) // NUM_TRAIN_CHUNKS
  bounds = [i * size for i in range(NUM_TRAIN_CHUNKS)] + [len(train)]
  out = [train[bounds[i] : bounds[i + 1]] for i in range(NUM_TRAIN_CHUNKS)]
  out.append(validation)
  return out


def fold_chunks(fold: int) -> tuple[list[int], int]:
  """Chunk ids of fold `fold`: (training chunks in rolled order, validation)."""
  order = np.roll(np.arange(NUM_FOLDS), check_fold(fold)).tolist()
  return order[:-1], order[-1]


def fold_partitions(
  train_trials: Sequence[str], validation_trials: Sequence[str], fold: int
) -> tuple[list[str], list[str]]:
  """Training and validation trial names of one fold (the reference's rule).

  Args:
    train_trials: official training trial names.
    validation_trials: official validation trial names.
    fold: 0..5; 0 = the official split.

  Returns:
    `(train_names, validation_names)`, each sorted.

  Raises:
    ValueError: invalid fold or inconsistent names (see `chunks`).
  """
  train_ids, val_id = fold_chunks(fold)
  parts = chunks(train_trials, validation_trials)
  train = sorted(n for i in train_ids for n in parts[i])
  return train, list(parts[val_id])
