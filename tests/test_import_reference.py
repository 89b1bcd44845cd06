"""Importing the authors' preprocessed dataset (affjax.data.import_reference).

The source is written in the reference's layout by tests/abaw2_reference
(from its documented format) out of small trials with unlabelled runs; the
imported cache must give the windows the reference's Dataset would cut from
that source, normalised with its `mean_std_dict.pkl`.
"""

import os
import pickle

import numpy as np
import pytest
import test_reference_data as refdata
from test_affwild2 import write_tiny_cache

from affjax import required_weights
from affjax.data import affwild2, import_reference, pipeline, prepare
from affjax.data.preprocess import cache
from tests.abaw2_reference import data as ref


def _source(root):
  """Writes the reference layout of refdata.SPEC; returns its pieces."""
  written = write_tiny_cache(str(root / "affjax_cache"), refdata.SPEC)
  parts = dict(zip(ref.PARTITIONS, ("train", "validation", "test")))
  npy = {
    name: ref.compact(written[name], test=part == "test")
    for name, part, *_ in refdata.SPEC
  }
  dataset_partition = {
    p: {
      name: len(npy[name]["frame"])
      for name in sorted(n for n, part, *_ in refdata.SPEC if part == parts[p])
    }
    for p in ref.PARTITIONS
  }
  for arrays in npy.values():
    if "label" in arrays:  # the tiny trials' labels run up to 1.009
      arrays["label"] = np.clip(arrays["label"], -1.0, 1.0)
  # Distinct from what affjax would compute, so the test sees which is used.
  stats = ref.mean_std(npy, dataset_partition)
  for feat in stats:
    for fold in stats[feat]:
      for part in stats[feat][fold]:
        stats[feat][fold][part]["mean"] += 0.25
  src = str(root / "src")
  ref.write_layout(src, npy, dataset_partition, stats)
  return src, npy, dataset_partition, stats


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  root = tmp_path_factory.mktemp("import")
  src, npy, dataset_partition, stats = _source(root)
  paths = prepare.DataPaths(
    str(root / "raw"), str(root / "cache"), str(root / "tfds")
  )
  import_reference.import_reference(src, paths.cache_dir)
  affwild2.build(paths.cache_dir, paths.tfds_dir)
  return paths, npy, dataset_partition, stats, src


def test_imported_windows_equal_the_reference(imported):
  paths, npy, dataset_partition, stats, _ = imported
  fold = 1
  config = refdata.reference_config(fold)
  config.audio_stats = "imported"
  part = ref.partition_dict(dataset_partition, fold)
  for split, partition in (
    ("train", "Train_Set"),
    ("validation", "Validation_Set"),
  ):
    s = pipeline.load_split(config, paths, split)
    assert s.trial_names == sorted(part[partition])
    assert s.kept_rows is not None
    assert [len(k) for k in s.kept_rows] == list(s.trial_lengths)
  want_stats = {
    f: (
      stats[f][fold]["Validation_Set"]["mean"],
      stats[f][fold]["Validation_Set"]["std"],
    )
    for f in ("vggish", "mfcc")
  }
  entries = ref.windows(part["Validation_Set"], refdata.W, refdata.H)
  split = pipeline.load_split(config, paths, "validation")
  batches = list(
    pipeline.eval_batches(config, paths, "validation", batch_size=refdata.B)
  )
  rows = refdata._rows(batches, split.trial_names)
  assert [(n, int(r["frame_index"][0])) for n, r in rows] == [
    (n, int(idx[0])) for n, idx, _ in entries
  ]
  c = (refdata.SIZE - refdata.CROP) // 2
  for (name, got), entry in zip(rows, entries):
    want = ref.get_item(npy, entry, refdata.W, want_stats)
    refdata._check_window(
      got, want, refdata._frames(want["frame"], (c, c, 0)), name
    )
  # Training windows come out in the reference's replayed order.
  train = ref.shuffled_once(
    ref.windows(part["Train_Set"], refdata.W, refdata.H)
  )
  names = pipeline.load_split(config, paths, "train").trial_names
  got = refdata._rows(
    pipeline.train_batches(
      config, paths, "train", batch_size=refdata.B, epoch=0, seed=0
    ),
    names,
  )
  assert [(n, int(r["frame_index"][0])) for n, r in got] == [
    (n, int(idx[0])) for n, idx, _ in train
  ]


def test_imported_cache_contents(imported):
  paths, npy, *_ = imported
  manifest = cache.read_json(os.path.join(paths.cache_dir, cache.MANIFEST))
  assert manifest["settings"]["imported_from"] == import_reference.SOURCE
  assert required_weights.imported_cache(paths.cache_dir)
  t = cache.read_trial(paths.cache_dir, "x_test")
  assert t["frames"].dtype == np.uint8
  assert np.all(t["labels"] == -5) and t["meta"]["partition"] == "test"
  a = cache.read_trial(paths.cache_dir, "t_a")
  np.testing.assert_array_equal(a["labels"], npy["t_a"]["label"])
  np.testing.assert_array_equal(
    a["face_mask"], npy["t_a"]["frame"].any((1, 2, 3))
  )
  assert a["meta"]["n_frames"] == 20  # 23 frames, 3 unlabelled


def test_resumes_and_keeps_finished_trials(tmp_path):
  src, *_ = _source(tmp_path)
  out = str(tmp_path / "out")
  import_reference.import_reference(src, out, trials=["t_a", "t_b"])
  before = os.stat(os.path.join(out, "trials", "t_a", "frames.npy")).st_mtime_ns
  # A temporary left by an interrupted run is cleaned up.
  os.makedirs(os.path.join(out, "trials", ".tmp-t_c-x"))
  manifest = import_reference.import_reference(src, out)
  assert sorted(manifest["trials"]) == sorted(n for n, *_ in refdata.SPEC)
  assert not any(
    n.startswith(".tmp-") for n in os.listdir(os.path.join(out, "trials"))
  )
  after = os.stat(os.path.join(out, "trials", "t_a", "frames.npy")).st_mtime_ns
  assert before == after


def _break(src, trial, key, value):
  np.save(os.path.join(src, "npy_data", trial, key + ".npy"), value)


@pytest.mark.parametrize(
  "problem,match",
  [
    ("missing", r"t_b/mfcc.npy not found"),
    ("count", r"t_c/vggish.npy: shape \(30, 128\), expected \(31, 128\)"),
    ("frames", r"t_d/frame.npy: shape"),
    ("label", r"t_f/label.npy: 1 label values outside \[-1, 1\]"),
    ("info", r"dataset_info.pkl: unknown partition 'Dev_Set'"),
    ("stats", r"mean_std_dict.pkl: no mean/std for \['mfcc'\]\[3\]"),
  ],
)
def test_bad_inputs_name_the_file(tmp_path, problem, match):
  src, npy, dataset_partition, stats = _source(tmp_path)
  if problem == "missing":
    os.remove(os.path.join(src, "npy_data", "t_b", "mfcc.npy"))
  elif problem == "count":
    _break(src, "t_c", "vggish", npy["t_c"]["vggish"][:-1])
  elif problem == "frames":
    _break(src, "t_d", "frame", npy["t_d"]["frame"][..., 0])
  elif problem == "label":
    label = npy["t_f"]["label"].copy()
    label[4, 1] = 1.5
    _break(src, "t_f", "label", label)
  elif problem == "info":
    with open(os.path.join(src, "dataset_info.pkl"), "wb") as f:
      pickle.dump({"partition": {**dataset_partition, "Dev_Set": {}}}, f)
  else:
    del stats["mfcc"][3]
    with open(os.path.join(src, "mean_std_dict.pkl"), "wb") as f:
      pickle.dump(stats, f)
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    import_reference.import_reference(src, str(tmp_path / "out"))
  assert (
    import_reference.main([f"--src={src}", f"--out={tmp_path / 'o2'}"]) == 2
  )
