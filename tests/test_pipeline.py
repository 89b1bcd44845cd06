"""Tests of the tf.data pipeline and of `prepare` on hand-written caches.

The cache is written directly with numpy (`test_affwild2.write_tiny_cache`),
so expected values come from the written arrays, not from the pipeline.
Tests marked with `mode` run both reading paths: trials kept in memory
(`memory`) and streamed from disk (`stream`, `memory_cache_gb = 0`).
"""

import dataclasses
import os
import shutil

import ml_collections
import numpy as np
import pytest
from test_affwild2 import SPEC, write_tiny_cache

from affjax.data import affwild2, folds, pipeline, prepare, stitch, trials
from affjax.data import windows as windows_lib

W, H = 10, 6  # t_b (9 frames) and v_b (8) are shorter than a window


MODES = {"memory": {}, "stream": {"memory_cache_gb": 0.0}}


def cfg(mode="memory", **overrides):
  base = {
    "name": "affwild2",
    "fold": 0,
    "window_length": W,
    "hop_length": H,
    "emotions": ("valence", "arousal"),
    "features": ("frames", "vggish", "mfcc", "egemaps"),
    "crop_size": 40,
    "time_delay": 0,
    "raw_dir": "",
    "cache_dir": "",
    "tfds_dir": "",
  }
  base.update(MODES[mode])
  base.update(overrides)
  return ml_collections.ConfigDict(base)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipe")
  paths = prepare.DataPaths(
    str(root / "raw"), str(root / "cache"), str(root / "tfds")
  )
  written = write_tiny_cache(paths.cache_dir, SPEC, embeddings=True)
  affwild2.build(paths.cache_dir, paths.tfds_dir)
  return paths, written


def _names(split):
  by = {
    p: sorted(n for n, p2, *_ in SPEC if p2 == p)
    for p in ("train", "validation", "test")
  }
  return by


def _expected_names(fold, split):
  by = _names(split)
  tr, va = folds.fold_partitions(by["train"], by["validation"], fold)
  return {"train": tr, "validation": va, "test": by["test"]}[split]


def _numpy_stats(written, names, feat):
  """Reference normalisation from the raw arrays: one scalar, ddof=1."""
  rows = [
    written[n][feat][np.all(written[n]["labels"] != -5, 1)] for n in names
  ]
  x = np.concatenate(rows).astype(np.float64).ravel()
  return x.mean(), x.std(ddof=1)


def _stitch(batches, key, split):
  trial = np.concatenate([b["trial"] for b in batches])
  index = np.concatenate([b["frame_index"] for b in batches])
  values = np.concatenate([b[key] for b in batches])
  values = values.reshape(values.shape[:2] + (-1,)).astype(np.float64)
  return stitch.stitch_windows(values, trial, index, split.trial_lengths)


@pytest.mark.parametrize(
  "fold,split_name,delay,mode",
  [
    (0, "validation", 3, "memory"),
    (3, "validation", 0, "stream"),
    (1, "train", 2, "memory"),
    (1, "train", 2, "stream"),
    (0, "test", 0, "memory"),
  ],
)
def test_eval_round_trip(data, fold, split_name, delay, mode):
  paths, written = data
  c = cfg(mode, fold=fold, time_delay=delay)
  split = pipeline.load_split(c, paths, split_name)
  assert split.trial_names == _expected_names(fold, split_name)
  batches = list(pipeline.eval_batches(c, paths, split_name, batch_size=3))
  labels = _stitch(batches, "label", split)
  masks = _stitch(batches, "mask", split)
  mean, std = _numpy_stats(written, _expected_names(fold, "train"), "mfcc")
  mfcc = _stitch(batches, "mfcc", split)
  frames = _stitch(batches, "frames", split)
  for i, name in enumerate(split.trial_names):
    raw = written[name]
    n = raw["labels"].shape[0]
    shifted = raw["labels"][np.minimum(np.arange(n) + delay, n - 1)]
    valid = np.all(shifted != -5, 1)
    np.testing.assert_array_equal(split.labels[i], shifted)
    np.testing.assert_array_equal(split.label_masks[i], valid)
    np.testing.assert_array_equal(masks[i][:, 0], valid.astype(float))
    # Stitched labels == the original valid labels, exactly.
    np.testing.assert_array_equal(labels[i][valid], shifted[valid])
    np.testing.assert_array_equal(labels[i][~valid], 0.0)
    np.testing.assert_allclose(
      mfcc[i], (raw["mfcc"] - mean) / std, rtol=1e-5, atol=1e-5
    )
    centre = raw["frames"][:, 4:44, 4:44].reshape(n, -1) / 255.0
    np.testing.assert_allclose(frames[i], (centre - 0.5) / 0.5, atol=1e-6)
  if split_name == "test":
    assert not any(m.any() for m in split.label_masks)


@pytest.mark.parametrize("mode", MODES)
def test_eval_windows_masks_and_padding(data, mode):
  paths, written = data
  c = cfg(mode, fold=0, features=("frames", "vggish"))
  split = pipeline.load_split(c, paths, "validation")
  assert split.trial_names == ["a_val", "v_b"]
  batches = list(pipeline.eval_batches(c, paths, "validation", batch_size=4))
  assert {tuple(sorted(b)) for b in batches} == {
    ("frame_index", "frames", "label", "mask", "trial", "vggish")
  }
  rows = []
  for b in batches:
    assert b["frames"].shape == (4, W, 40, 40, 3)
    assert b["frames"].dtype == np.float32 and b["label"].dtype == np.float32
    assert b["frame_index"].dtype == np.int32 and b["trial"].dtype == np.int32
    assert b["mask"].dtype == bool
    for r in range(4):
      rows.append({k: v[r] for k, v in b.items()})
  # Every window exactly once, in fixed order, then padding rows.
  expect = [
    (i, s)
    for i, n in enumerate(split.trial_lengths)
    for s in stitch.window_starts(n, W, H)
  ]
  assert split.num_windows == len(expect) == 5
  real = [r for r in rows if r["trial"] >= 0]
  assert [(int(r["trial"]), int(r["frame_index"][0])) for r in real] == expect
  assert len(rows) - len(real) == 3
  for r in rows[len(real) :]:
    assert not r["mask"].any() and (r["frame_index"] == -1).all()
    assert (r["frames"] == -1).all() and (r["vggish"] == 0).all()
  for r in real:
    name = split.trial_names[r["trial"]]
    labels = written[name]["labels"]
    n, s = len(labels), r["frame_index"][0]
    idx = np.arange(s, s + W)
    np.testing.assert_array_equal(r["frame_index"], np.where(idx < n, idx, -1))
    real_f = idx < n
    valid = np.zeros(W, bool)
    valid[real_f] = np.all(labels[idx[real_f]] != -5, 1)
    np.testing.assert_array_equal(r["mask"], valid)
    assert (r["frames"][~real_f] == -1).all()
    assert (r["vggish"][~real_f] == 0).all()
    assert (r["label"][~valid] == 0).all()
  # v_b has 8 frames < W: one window, 2 padded frames.
  short = [r for r in real if split.trial_names[r["trial"]] == "v_b"]
  assert len(short) == 1 and (short[0]["frame_index"] == -1).sum() == 2
  # a_val has -5 at frames 10, 11: masked out.
  first = [r for r in real if r["trial"] == 0]
  assert not first[1]["mask"][10 - first[1]["frame_index"][0]]


@pytest.mark.parametrize("mode", MODES)
def test_eval_process_sharding_disjoint_complete(data, mode):
  paths, _ = data
  c = cfg(mode, fold=2, features=("mfcc",))
  single = list(pipeline.eval_batches(c, paths, "train", batch_size=2))
  per = [
    list(
      pipeline.eval_batches(
        c, paths, "train", batch_size=2, process_index=p, process_count=3
      )
    )
    for p in range(3)
  ]
  assert len({len(b) for b in per}) == 1  # same number of batches

  def real(batches):
    t = np.concatenate([b["trial"] for b in batches])
    keep = t >= 0
    return {
      k: np.concatenate([b[k] for b in batches])[keep] for k in batches[0]
    }

  whole = real(single)
  parts = [real(b) for b in per]
  # Concatenated in process order: the single-process windows, in order.
  for k in whole:
    np.testing.assert_array_equal(
      np.concatenate([p[k] for p in parts]), whole[k]
    )
  # Each process reads whole trials of its own.
  owners = [set(p["trial"].tolist()) for p in parts]
  assert sum(len(o) for o in owners) == len(set().union(*owners)) == 7
  # More processes than trials: the idle ones yield padding batches only.
  c = cfg(mode, fold=0, features=("frames", "mfcc"))
  per = [
    list(
      pipeline.eval_batches(
        c, paths, "validation", batch_size=2, process_index=p, process_count=4
      )
    )
    for p in range(4)
  ]
  # a_val: 4 windows, v_b: 1; the cuts at 5/4, 10/4, 15/4 windows all fall
  # in a_val, so the last process gets both trials.
  assert [len(b) for b in per] == [3] * 4
  assert [sum(int((b["trial"] >= 0).sum()) for b in bs) for bs in per] == [
    0,
    0,
    0,
    5,
  ]
  for b in per[0] + per[1] + per[2]:
    assert b["frames"].shape == (2, W, 40, 40, 3)
    assert (b["frames"] == -1).all() and (b["mfcc"] == 0).all()
    assert not b["mask"].any() and (b["frame_index"] == -1).all()


def _window_keys(batches):
  return [
    (int(t), int(f[0]))
    for b in batches
    for t, f in zip(b["trial"], b["frame_index"])
  ]


def _crop_params(raw, window):
  """(oy, ox, flip) reproducing the window's frames from the raw frames."""
  idx = window["frame_index"]
  real = idx >= 0
  target = window["frames"][real]
  for oy in range(9):
    for ox in range(9):
      crop = raw[idx[real], oy : oy + 40, ox : ox + 40]
      for flip in (False, True):
        c = crop[:, :, ::-1] if flip else crop
        if np.allclose((c / 255.0 - 0.5) / 0.5, target, atol=1e-6):
          return oy, ox, flip
  return None


@pytest.mark.parametrize("mode", MODES)
def test_train_batches_content_and_determinism(data, mode):
  paths, written = data
  c = cfg(mode, fold=0, time_delay=1)
  split = pipeline.load_split(c, paths, "train")
  assert (
    split.num_windows
    == sum(stitch.num_windows(n, W, H) for n in split.trial_lengths)
    == 21
  )
  args = {"batch_size": 4, "epoch": 0, "seed": 7}
  a = list(pipeline.train_batches(c, paths, "train", **args))
  assert len(a) == 21 // 4
  keys = _window_keys(a)
  assert len(set(keys)) == len(keys)
  params = set()
  for b in a:
    assert b["frames"].shape == (4, W, 40, 40, 3)
    for r in range(4):
      name = split.trial_names[b["trial"][r]]
      raw = written[name]
      p = _crop_params(raw["frames"], {k: v[r] for k, v in b.items()})
      assert p is not None, name
      params.add(p)
      idx = b["frame_index"][r]
      ok = idx >= 0
      np.testing.assert_array_equal(
        b["label"][r][b["mask"][r]],
        split.labels[b["trial"][r]][idx[b["mask"][r]]],
      )
      assert not b["mask"][r][~ok].any()
  assert len(params) > 3  # crops and flips vary between windows
  assert any(p[2] for p in params) and not all(p[2] for p in params)
  again = list(pipeline.train_batches(c, paths, "train", **args))
  for x, y in zip(a, again):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  other_seed = _window_keys(
    pipeline.train_batches(c, paths, "train", batch_size=4, epoch=0, seed=8)
  )
  other_epoch = _window_keys(
    pipeline.train_batches(c, paths, "train", batch_size=4, epoch=1, seed=7)
  )
  assert other_seed != keys and other_epoch != keys


@pytest.mark.parametrize("mode", MODES)
def test_train_process_sharding_disjoint(data, mode):
  paths, _ = data
  c = cfg(mode, fold=0, features=("mfcc",))
  single = pipeline.load_split(c, paths, "train")
  for count, batch in ((2, 1), (3, 2)):
    per = [
      list(
        pipeline.train_batches(
          c,
          paths,
          "train",
          batch_size=batch,
          epoch=3,
          seed=0,
          process_index=p,
          process_count=count,
        )
      )
      for p in range(count)
    ]
    assert len({len(b) for b in per}) == 1
    keys = [_window_keys(b) for b in per]
    flat = [k for ks in keys for k in ks]
    assert len(flat) == len(set(flat))  # disjoint
    trials = [{t for t, _ in ks} for ks in keys]
    for p in range(count):
      for q in range(p):
        assert not trials[p] & trials[q]  # each reads only its own trials
    everything = {
      (i, int(s))
      for i, n in enumerate(single.trial_lengths)
      for s in stitch.window_starts(n, W, H)
    }
    assert set(flat) <= everything
    assert len(flat) >= len(everything) - count * (batch + 4)
  # batch 1, 1 process: complete coverage.
  one = _window_keys(
    pipeline.train_batches(c, paths, "train", batch_size=1, epoch=0, seed=0)
  )
  assert sorted(one) == sorted(everything)


def test_feature_stats_scalar_and_per_dim(data):
  paths, written = data
  train = _expected_names(4, "train")
  c = cfg(fold=4)
  stats = pipeline.load_split(c, paths, "validation").feature_stats
  assert set(stats) == {"vggish", "mfcc", "egemaps"}
  for feat in stats:
    mean, std = _numpy_stats(written, train, feat)
    np.testing.assert_allclose(stats[feat][0], mean, rtol=1e-5)
    np.testing.assert_allclose(stats[feat][1], std, rtol=1e-5)
  per = pipeline.load_split(
    cfg(fold=4, normalization="per_dim"), paths, "test"
  ).feature_stats
  x = np.concatenate(
    [
      written[n]["egemaps"][np.all(written[n]["labels"] != -5, 1)]
      for n in train
    ]
  ).astype(np.float64)
  np.testing.assert_allclose(per["egemaps"][0], x.mean(0), rtol=1e-5)
  np.testing.assert_allclose(per["egemaps"][1], x.std(0, ddof=1), rtol=1e-5)


def test_embeddings_mode(data):
  paths, written = data
  c = cfg(features=("embeddings", "mfcc"), emotions=("arousal",))
  split = pipeline.load_split(c, paths, "validation")
  batches = list(pipeline.eval_batches(c, paths, "validation", batch_size=2))
  assert set(batches[0]) == {
    "embeddings",
    "mfcc",
    "label",
    "mask",
    "frame_index",
    "trial",
  }
  assert batches[0]["label"].shape == (2, W, 1)
  emb = _stitch(batches, "embeddings", split)
  lab = _stitch(batches, "label", split)
  for i, name in enumerate(split.trial_names):
    np.testing.assert_array_equal(emb[i], written[name]["embeddings"])
    valid = written[name]["labels"][:, 1] != -5
    valid &= written[name]["labels"][:, 0] != -5
    np.testing.assert_array_equal(
      lab[i][valid, 0], written[name]["labels"][valid, 1]
    )


def test_memory_and_stream_agree(data):
  paths, _ = data
  mem, stream = cfg("memory", time_delay=2), cfg("stream", time_delay=2)
  assert pipeline._Reader(mem, paths, "train", 1, 0, 1).store is not None
  assert pipeline._Reader(stream, paths, "train", 1, 0, 1).store is None
  # Evaluation: the same batches, exactly.
  a = list(pipeline.eval_batches(mem, paths, "validation", batch_size=3))
  b = list(pipeline.eval_batches(stream, paths, "validation", batch_size=3))
  assert len(a) == len(b) == 2
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      assert x[k].dtype == y[k].dtype, k
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
  # Training: other order, but the same windows with the same crops.
  args = {"batch_size": 1, "epoch": 4, "seed": 3}

  def by_window(c):
    return {
      (int(b["trial"][0]), int(b["frame_index"][0, 0])): b
      for b in pipeline.train_batches(c, paths, "train", **args)
    }

  x, y = by_window(mem), by_window(stream)
  assert sorted(x) == sorted(y) and len(x) == 21
  for key in x:
    for k in x[key]:
      np.testing.assert_array_equal(x[key][k], y[key][k], err_msg=k)


def test_window_rows_hand_case():
  frame_index, rows, label_rows = windows_lib.window_rows(
    offset=np.array([10, 0, 5], np.int32),
    length=np.array([4, 3, 0], np.int32),
    start=np.array([1, 0, 0], np.int32),
    window=4,
    delay=1,
    sentinel=99,
  )
  np.testing.assert_array_equal(
    frame_index, [[1, 2, 3, -1], [0, 1, 2, -1], [-1, -1, -1, -1]]
  )
  np.testing.assert_array_equal(
    rows, [[11, 12, 13, 99], [0, 1, 2, 99], [99, 99, 99, 99]]
  )
  # Labels one frame later, clamped to the trial's last frame.
  np.testing.assert_array_equal(
    label_rows, [[12, 13, 13, 99], [1, 2, 2, 99], [99, 99, 99, 99]]
  )


def test_crop_table():
  a = windows_lib.crop_table(5, 400, 8)
  assert a.shape == (400, 3) and a.dtype == np.int32
  np.testing.assert_array_equal(a, windows_lib.crop_table(5, 400, 8))
  assert not np.array_equal(a, windows_lib.crop_table(6, 400, 8))
  assert set(a[:, 0]) == set(a[:, 1]) == set(range(9))
  assert set(a[:, 2]) == {0, 1}


def test_rebuilt_dataset_and_edited_labels_are_read_again(tmp_path):
  paths = prepare.DataPaths("", str(tmp_path / "cache"), str(tmp_path / "tfds"))
  spec = SPEC[:1] + SPEC[6:7]
  written = write_tiny_cache(paths.cache_dir, spec, size=48)
  affwild2.build(paths.cache_dir, paths.tfds_dir)
  c = cfg(features=("mfcc",))
  first = list(pipeline.eval_batches(c, paths, "validation", batch_size=8))
  # Same manifest (same fingerprint), other arrays: the dataset is rebuilt
  # by hand, as after fixing a cache in place.
  trial_dir = os.path.join(paths.cache_dir, "trials", "a_val")
  np.save(os.path.join(trial_dir, "mfcc.npy"), written["a_val"]["mfcc"] + 100.0)
  labels = written["a_val"]["labels"].copy()
  labels[:, 0] = 0.25
  np.save(os.path.join(trial_dir, "labels.npy"), labels)
  assert pipeline.load_split(c, paths, "validation").labels[0][3, 0] == 0.25
  shutil.rmtree(paths.tfds_dir)
  affwild2.build(paths.cache_dir, paths.tfds_dir)
  again = list(pipeline.eval_batches(c, paths, "validation", batch_size=8))
  real = first[0]["frame_index"][0] >= 0
  np.testing.assert_allclose(
    again[0]["mfcc"][0][real] - first[0]["mfcc"][0][real],
    100.0
    / pipeline.load_split(c, paths, "validation").feature_stats["mfcc"][1][0],
    rtol=1e-4,
  )
  valid = again[0]["mask"][0]
  np.testing.assert_array_equal(again[0]["label"][0][valid, 0], 0.25)


def test_load_split_copies_and_memory_budget(data):
  paths, _ = data
  a = pipeline.load_split(cfg(), paths, "train")
  a.trial_names.append("extra")
  a.labels.pop()
  b = pipeline.load_split(cfg(), paths, "train")
  assert "extra" not in b.trial_names and len(b.labels) == 6
  assert trials.budget_bytes(cfg(memory_cache_gb=0.5)) == 2**29
  with pytest.raises(ValueError, match="memory_cache_gb"):
    trials.budget_bytes(cfg(memory_cache_gb=-1.0))
  # A budget smaller than the split: streamed.
  tiny = cfg(memory_cache_gb=1e-6)
  assert pipeline._Reader(tiny, paths, "train", 2, 0, 1).store is None


def test_config_errors(data, tmp_path):
  paths, _ = data
  with pytest.raises(ValueError, match="split must be"):
    pipeline.load_split(cfg(), paths, "dev")
  with pytest.raises(ValueError, match="fold"):
    pipeline.load_split(cfg(fold=6), paths, "train")
  with pytest.raises(ValueError, match="process_index"):
    next(
      pipeline.eval_batches(
        cfg(), paths, "train", batch_size=2, process_index=2, process_count=2
      )
    )
  with pytest.raises(ValueError, match="emotions"):
    pipeline.load_split(cfg(emotions=("joy",)), paths, "train")
  other = prepare.DataPaths("", str(tmp_path / "c"), str(tmp_path / "t"))
  write_tiny_cache(other.cache_dir, SPEC[:3], size=48)
  affwild2.build(other.cache_dir, other.tfds_dir)
  with pytest.raises(ValueError, match="affjax.embed"):
    pipeline.load_split(cfg(features=("embeddings",)), other, "train")
  with pytest.raises(FileNotFoundError, match="no aff_wild2 dataset"):
    pipeline.load_split(
      cfg(),
      dataclasses.replace(other, tfds_dir=str(tmp_path / "none")),
      "train",
    )


def test_prepare_paths_and_affwild2_errors(tmp_path):
  work = str(tmp_path / "work")
  paths = prepare.resolve_paths(cfg(), work)
  assert paths == prepare.DataPaths(
    *(os.path.join(work, "data", d) for d in ("raw", "cache", "tfds"))
  )
  with pytest.raises(FileNotFoundError, match="config.data.raw_dir"):
    prepare.prepare(cfg(raw_dir=str(tmp_path / "missing")), work)
  with pytest.raises(FileNotFoundError, match="config.data.cache_dir"):
    prepare.prepare(cfg(), work)
  with pytest.raises(ValueError, match="config.data.name"):
    prepare.prepare(cfg(name="imagenet"), work)
  with pytest.raises(ValueError, match="config.data.preprocess.bogus"):
    prepare.prepare(cfg(preprocess={"bogus": 1}), work)
  # A cache without raw data is used as is.
  write_tiny_cache(paths.cache_dir, SPEC[:2] + SPEC[6:7], size=48)
  got = prepare.prepare(cfg(), work)
  assert got == paths
  assert affwild2.read_metadata(paths.tfds_dir)["splits"]["chunk5"] == ["a_val"]
