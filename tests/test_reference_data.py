"""affjax's reference recipe gives the reference's windows, checked against
an independent transcription (tests/abaw2_reference/data.py).

A small hand-written dataset with unlabelled runs, short trials and a last
partial batch, and the synthetic test dataset (`affjax.data.synthetic`,
preprocessed): for a fold, with `configs.common.reference_recipe`'s data
settings the training batches (every epoch) and the validation batches
hold exactly the
windows, frames, labels and (to float rounding) audio the reference's
Dataset/DataLoader would yield, in the same order. The random crop/flip of
a training window is affjax's own draw (the reference's comes from torch's
RNG); the expected frames apply the same draw to the reference's window.
"""

import os

import ml_collections
import numpy as np
import pytest
from test_affwild2 import write_tiny_cache

from affjax import losses
from affjax.data import affwild2, pipeline, prepare
from affjax.data import windows as windows_lib
from affjax.data.preprocess import cache
from configs import common
from tests.abaw2_reference import data as ref

W, H, B, SIZE, CROP = 10, 6, 3, 48, 40
SPEC = [
  ("t_a", "train", 23, (0, 1, 5)),
  ("t_b", "train", 9, ()),
  ("t_c", "train", 40, (*range(12, 20), 39)),
  ("t_d", "train", 17, (3, 4)),
  ("t_e", "train", 12, (2, 3, 4)),  # 9 labelled frames: one short window
  ("t_f", "train", 31, (3,)),
  ("a_val", "validation", 26, (10, 11)),
  ("v_b", "validation", 8, ()),
  ("x_test", "test", 14, ()),
]
FEATURES = ("frames", "vggish", "mfcc")
REF_NAMES = {"frames": "frame", "vggish": "vggish", "mfcc": "mfcc"}


def reference_config(fold):
  return ml_collections.ConfigDict(
    {
      "name": "affwild2",
      "fold": fold,
      "window_length": W,
      "hop_length": H,
      "emotions": ("valence", "arousal"),
      "features": FEATURES,
      "crop_size": CROP,
      "time_delay": 0,
      "raw_dir": "",
      "cache_dir": "",
      "tfds_dir": "",
      "unlabelled_frames": "drop",
      "audio_stats": "per_partition",
      "window_order": "once",
      "padding_in_loss": True,
    }
  )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("refdata")
  paths = prepare.DataPaths(
    str(root / "raw"), str(root / "cache"), str(root / "tfds")
  )
  written = write_tiny_cache(paths.cache_dir, SPEC)
  affwild2.build(paths.cache_dir, paths.tfds_dir)
  parts = {
    p: n for p, n in zip(ref.PARTITIONS, ("train", "validation", "test"))
  }
  npy = {
    name: ref.compact(written[name], test=part == "test")
    for name, part, *_ in SPEC
  }
  dataset_partition = {
    p: {
      name: len(npy[name]["frame"])
      for name in sorted(n for n, part, *_ in SPEC if part == parts[p])
    }
    for p in ref.PARTITIONS
  }
  return paths, npy, dataset_partition


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory):
  """The synthetic test dataset (`affjax.data.synthetic`), preprocessed."""
  root = tmp_path_factory.mktemp("refsynth")
  config = ml_collections.ConfigDict(
    {
      "name": "synthetic",
      "synthetic": common.test_synthetic(),
      "raw_dir": str(root / "raw"),
      "cache_dir": str(root / "cache"),
      "tfds_dir": str(root / "tfds"),
    }
  )
  paths = prepare.prepare(config, str(root))
  manifest = cache.read_json(os.path.join(paths.cache_dir, cache.MANIFEST))
  npy = {
    name: ref.compact(
      cache.read_trial(paths.cache_dir, name), test=e["partition"] == "test"
    )
    for name, e in manifest["trials"].items()
  }
  parts = dict(zip(ref.PARTITIONS, ("train", "validation", "test")))
  dataset_partition = {
    p: {
      name: len(npy[name]["frame"])
      for name, e in sorted(manifest["trials"].items())
      if e["partition"] == parts[p]
    }
    for p in ref.PARTITIONS
  }
  # The dataset has unlabelled runs to drop.
  dropped = [
    e["n_frames"] - len(npy[n]["frame"])
    for n, e in manifest["trials"].items()
    if e["partition"] != "test"
  ]
  assert min(dropped) >= 0 and max(dropped) > 0
  return paths, npy, dataset_partition


def _frames(raw, crop):
  """Reference window frames after affjax's crop/flip draw, normalised."""
  r, c, flip = (int(v) for v in crop)
  x = raw[:, r : r + CROP, c : c + CROP].astype(np.float32)
  if flip:
    x = x[:, :, ::-1]
  return (x / 255.0 - 0.5) / 0.5


def _window_ids(trials, entries):
  """affjax's split-wide id of each window of `entries` (windows numbered
  trial after trial over the sorted trials, in start order)."""
  ids, total = {}, 0
  for name in sorted(trials):
    for _, idx, _ in ref.windows({name: trials[name]}, W, H):
      ids[name, int(idx[0])] = total
      total += 1
  return [ids[name, int(idx[0])] for name, idx, _ in entries], total


def _rows(batches, names):
  """Real rows of batches: (trial name, batch row dict) in order."""
  out = []
  for batch in batches:
    for i, t in enumerate(batch["trial"]):
      if t >= 0:
        out.append((names[t], {k: v[i] for k, v in batch.items()}))
  return out


def _check_window(got, want, frames, name):
  np.testing.assert_array_equal(got["frames"], frames, err_msg=name)
  np.testing.assert_array_equal(got["label"], want["label"], err_msg=name)
  for feat in ("vggish", "mfcc"):
    np.testing.assert_allclose(
      got[feat], want[feat], rtol=1e-5, atol=1e-5, err_msg=f"{name} {feat}"
    )


@pytest.mark.parametrize(
  "dataset,fold", [("data", 1), ("synthetic_data", 0), ("synthetic_data", 1)]
)
def test_training_windows_and_order_equal_the_reference(request, dataset, fold):
  """Hand-written trials, and the synthetic dataset (preprocessed)."""
  paths, npy, dataset_partition = request.getfixturevalue(dataset)
  config = reference_config(fold)
  part = ref.partition_dict(dataset_partition, fold)
  stats = ref.mean_std(npy, dataset_partition, features=("vggish", "mfcc"))
  train_stats = {
    f: (stats[f][fold]["Train_Set"]["mean"], stats[f][fold]["Train_Set"]["std"])
    for f in ("vggish", "mfcc")
  }
  entries = ref.shuffled_once(ref.windows(part["Train_Set"], W, H), seed=0)
  expected_batches = ref.batches(entries, B)
  assert len(entries) >= 4
  if dataset == "data":
    assert len(entries) % B, "the spec must leave a partial last batch"
  ids, total = _window_ids(part["Train_Set"], entries)
  split = pipeline.load_split(config, paths, "train")
  assert split.trial_names == sorted(part["Train_Set"])
  assert list(split.trial_lengths) == [
    part["Train_Set"][n] for n in split.trial_names
  ]
  for epoch in (0, 1):
    batches = list(
      pipeline.train_batches(
        config, paths, "train", batch_size=B, epoch=epoch, seed=0
      )
    )
    assert len(batches) == len(expected_batches)
    crops = windows_lib.crop_table(
      pipeline._seeds(0, epoch)[2], total, SIZE - CROP
    )
    rows = _rows(batches, split.trial_names)
    assert [(n, int(r["frame_index"][0])) for n, r in rows] == [
      (n, int(idx[0])) for n, idx, _ in entries
    ]
    for (name, got), entry, wid in zip(rows, entries, ids):
      want = ref.get_item(npy, entry, W, train_stats)
      _check_window(got, want, _frames(want["frame"], crops[wid]), name)
    # Every frame of a real row counts in the loss, padding included.
    for batch in batches:
      mask = np.asarray(losses.training_mask(batch, True))
      want = np.broadcast_to((batch["trial"] >= 0)[:, None], mask.shape)
      np.testing.assert_array_equal(mask, want)


@pytest.mark.parametrize(
  "dataset,memory_cache_gb",
  [("data", None), ("data", 0.0), ("synthetic_data", None)],
)
def test_validation_windows_equal_the_reference(
  request, dataset, memory_cache_gb
):
  """In memory and streamed from disk (`memory_cache_gb = 0`)."""
  paths, npy, dataset_partition = request.getfixturevalue(dataset)
  fold = 1
  config = reference_config(fold)
  if memory_cache_gb is not None:
    config.memory_cache_gb = memory_cache_gb
  part = ref.partition_dict(dataset_partition, fold)
  stats = ref.mean_std(npy, dataset_partition, features=("vggish", "mfcc"))
  val_stats = {
    f: (
      stats[f][fold]["Validation_Set"]["mean"],
      stats[f][fold]["Validation_Set"]["std"],
    )
    for f in ("vggish", "mfcc")
  }
  entries = ref.windows(part["Validation_Set"], W, H)
  assert entries
  split = pipeline.load_split(config, paths, "validation")
  batches = list(
    pipeline.eval_batches(config, paths, "validation", batch_size=B)
  )
  rows = _rows(batches, split.trial_names)
  assert [(n, int(r["frame_index"][0])) for n, r in rows] == [
    (n, int(idx[0])) for n, idx, _ in entries
  ]
  centre = ((SIZE - CROP) // 2, (SIZE - CROP) // 2, 0)
  for (name, got), entry in zip(rows, entries):
    want = ref.get_item(npy, entry, W, val_stats)
    _check_window(got, want, _frames(want["frame"], centre), name)


@pytest.mark.parametrize(
  "key,value",
  [
    ("unlabelled_frames", "delete"),
    ("audio_stats", "test"),
    ("window_order", "one"),
  ],
)
def test_recipe_keys_are_checked(data, key, value):
  paths, _, _ = data
  config = reference_config(0)
  config[key] = value
  with pytest.raises(ValueError, match=f"config.data.{key}={value!r}"):
    pipeline.load_split(config, paths, "train")


def test_replayed_order_needs_the_split_in_memory(data):
  paths, _, _ = data
  config = reference_config(1)
  config.memory_cache_gb = 0.0
  with pytest.raises(ValueError, match="config.data.memory_cache_gb"):
    next(
      pipeline.train_batches(
        config, paths, "train", batch_size=B, epoch=0, seed=0
      )
    )


def test_a_frame_is_dropped_when_either_label_is_unlabelled(tmp_path):
  """valence -5 alone or arousal -5 alone deletes the frame (the reference's
  rule), whatever emotion is trained; test trials keep every frame."""
  spec = [(n, p, k, ()) for n, p, k, _ in SPEC]
  paths = prepare.DataPaths("", str(tmp_path / "cache"), str(tmp_path / "t"))
  written = write_tiny_cache(paths.cache_dir, spec)
  path = f"{paths.cache_dir}/trials/t_a/labels.npy"
  labels = written["t_a"]["labels"].copy()
  labels[4, 0] = -5.0  # valence only
  labels[9, 1] = -5.0  # arousal only
  np.save(path, labels)
  affwild2.build(paths.cache_dir, paths.tfds_dir)
  config = reference_config(0)
  config.emotions = ("arousal",)
  train = pipeline.load_split(config, paths, "train")
  i = train.trial_names.index("t_a")
  kept = np.delete(np.arange(23), [4, 9])
  np.testing.assert_array_equal(train.kept_rows[i], kept)
  np.testing.assert_array_equal(train.labels[i][:, 0], labels[kept, 1])
  assert train.trial_lengths[i] == 21
  test = pipeline.load_split(config, paths, "test")
  assert test.kept_rows is None and list(test.trial_lengths) == [14]
  config.unlabelled_frames = "mask"
  masked = pipeline.load_split(config, paths, "train")
  assert masked.kept_rows is None and masked.trial_lengths[i] == 23


def test_replayed_order_split_over_processes(data):
  """Two processes: global batch g is process 0's batch g, then process
  1's; together they are the single-process order, padding at the end."""
  paths, _, _ = data
  config = reference_config(1)

  def rows(process_index, process_count, batch_size):
    out = []
    for batch in pipeline.train_batches(
      config,
      paths,
      "train",
      batch_size=batch_size,
      epoch=0,
      seed=0,
      process_index=process_index,
      process_count=process_count,
    ):
      out.append(list(zip(batch["trial"], batch["frame_index"][:, 0])))
    return out

  single = [r for b in rows(0, 1, 6) for r in b]
  p0, p1 = rows(0, 2, 3), rows(1, 2, 3)
  assert len(p0) == len(p1)
  merged = [r for b0, b1 in zip(p0, p1) for r in b0 + b1]
  assert [(int(t), int(f)) for t, f in merged] == [
    (int(t), int(f)) for t, f in single
  ]
  assert int(merged[-1][0]) == -1  # 16 windows in batches of 6: padded
