"""Tests of the TFDS builder over a hand-written feature cache.

`write_tiny_cache` writes the feature-cache format (`affjax.data.preprocess.
cache`) directly with numpy (no preprocessing), and is shared with
tests/test_pipeline.py.
"""

import json
import os

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from affjax.data import affwild2, pipeline, prepare, stitch

DIMS = {"mfcc": 39, "egemaps": 23, "vggish": 128}


def make_trial(n, seed, *, invalid=(), test=False, size=48):
  """Arrays of one trial; frame t of trial with `seed` is recognisable."""
  rng = np.random.default_rng(seed)
  frames = rng.integers(1, 256, (n, size, size, 3), dtype=np.uint8)
  face = np.ones(n, bool)
  face[::7] = False
  frames[~face] = 0
  labels = np.stack(
    [np.linspace(-1, 1, n), np.cos(np.arange(n) / 5.0)], 1
  ).astype(np.float32)
  labels += np.float32(seed / 1000.0)
  labels[list(invalid)] = -5.0
  if test:
    labels[:] = -5.0
  arrays = {"frames": frames, "face_mask": face, "labels": labels}
  for k, d in DIMS.items():
    arrays[k] = (rng.normal(size=(n, d)) * (seed % 3 + 1) + seed % 5).astype(
      np.float32
    )
  return arrays


def write_tiny_cache(cache_dir, spec, *, embeddings=False, size=48):
  """Writes a cache; `spec` = [(name, partition, n_frames, invalid_rows)].

  Returns:
    {name: arrays} as written.
  """
  os.makedirs(os.path.join(cache_dir, "trials"), exist_ok=True)
  written, entries = {}, {}
  for seed, (name, part, n, invalid) in enumerate(spec):
    arrays = make_trial(
      n, seed + 1, invalid=invalid, test=part == "test", size=size
    )
    if embeddings:
      arrays["embeddings"] = (
        np.random.default_rng(seed).normal(size=(n, 512)).astype(np.float32)
      )
    d = os.path.join(cache_dir, "trials", name)
    os.makedirs(d, exist_ok=True)
    for k, v in arrays.items():
      np.save(os.path.join(d, k + ".npy"), v)
    if embeddings:
      with open(os.path.join(d, "embeddings.json"), "w") as f:
        json.dump({"backbone": "tiny", "n_frames": n}, f)
    valid = (
      np.all(arrays["labels"] != -5, 1)
      if part != "test"
      else (np.ones(n, bool))
    )
    sums = {
      k: {
        "count": int(valid.sum()),
        "sum": arrays[k][valid].astype(np.float64).sum(0).tolist(),
        "sumsq": np.square(arrays[k][valid].astype(np.float64)).sum(0).tolist(),
      }
      for k in DIMS
    }
    meta = {
      "trial": name,
      "video": name,
      "partition": part,
      "fps": 25,
      "n_frames": n,
      "n_valid_labels": int(valid.sum()),
      "n_faces": int(arrays["face_mask"].sum()),
      "feature_sums": sums,
    }
    with open(os.path.join(d, "meta.json"), "w") as f:
      json.dump(meta, f)
    entries[name] = {
      k: meta[k]
      for k in (
        "partition",
        "video",
        "fps",
        "n_frames",
        "n_valid_labels",
        "n_faces",
      )
    }
    written[name] = arrays
  with open(os.path.join(cache_dir, "manifest.json"), "w") as f:
    json.dump(
      {
        "version": 1,
        "settings": {"frame_size": size},
        "trials": entries,
        "skipped": {},
      },
      f,
    )
  return written


SPEC = [
  ("t_a", "train", 23, (0, 1, 5)),
  ("t_b", "train", 9, ()),
  ("t_c", "train", 40, (39,)),
  ("t_d", "train", 17, ()),
  ("t_e", "train", 12, ()),
  ("t_f", "train", 31, (3,)),
  ("a_val", "validation", 26, (10, 11)),  # sorts before the train names
  ("v_b", "validation", 8, ()),
  ("x_test", "test", 14, ()),
]


def test_build_and_read_back_exact(tmp_path):
  cache, tfds_dir = str(tmp_path / "cache"), str(tmp_path / "tfds")
  written = write_tiny_cache(cache, SPEC, embeddings=True, size=12)
  out = affwild2.build(cache, tfds_dir)
  assert out == affwild2.dataset_dir(tfds_dir)
  meta = affwild2.read_metadata(tfds_dir)
  # 6 training trials: chunks of 1, remainder (2) in chunk4.
  assert meta["splits"] == {
    "chunk0": ["t_a"],
    "chunk1": ["t_b"],
    "chunk2": ["t_c"],
    "chunk3": ["t_d"],
    "chunk4": ["t_e", "t_f"],
    "chunk5": ["a_val", "v_b"],
    "test": ["x_test"],
  }
  assert meta["trials"]["t_f"]["index"] == 1
  assert meta["trials"]["a_val"]["n_frames"] == 26
  assert meta["embeddings"] is True
  builder = tfds.builder_from_directory(out)
  seen = []
  for split in ("chunk4", "chunk5", "test", "chunk0"):
    for ex in tfds.as_numpy(builder.as_dataset(split=split)):
      name = ex["trial"].decode()
      seen.append(name)
      ref = written[name]
      assert ex["n_frames"] == ref["labels"].shape[0]
      for key in (
        "frames",
        "face_mask",
        "labels",
        "mfcc",
        "egemaps",
        "vggish",
        "embeddings",
      ):
        assert ex[key].dtype == ref[key].dtype, key
        np.testing.assert_array_equal(ex[key], ref[key], err_msg=key)
  assert seen == ["t_e", "t_f", "a_val", "v_b", "x_test", "t_a"]
  # One trial alone, by position (the pipeline reads trials this way).
  ex = next(iter(tfds.as_numpy(builder.as_dataset(split="chunk4[1:2]"))))
  assert ex["trial"] == b"t_f"


def test_build_is_skipped_when_cache_unchanged(tmp_path):
  cache, tfds_dir = str(tmp_path / "cache"), str(tmp_path / "tfds")
  write_tiny_cache(cache, SPEC[:3] + SPEC[6:8], size=8)
  out = affwild2.build(cache, tfds_dir)
  info = os.path.join(out, "dataset_info.json")
  stamp = os.stat(info).st_mtime_ns
  affwild2.build(cache, tfds_dir)
  assert os.stat(info).st_mtime_ns == stamp
  assert affwild2.read_metadata(tfds_dir)["embeddings"] is False
  # A changed manifest (one more trial) triggers a rebuild.
  write_tiny_cache(cache, SPEC[:4] + SPEC[6:8], size=8)
  affwild2.build(cache, tfds_dir)
  meta = affwild2.read_metadata(tfds_dir)
  assert sorted(meta["trials"]) == ["a_val", "t_a", "t_b", "t_c", "t_d", "v_b"]
  assert meta["splits"]["chunk4"] == ["t_a", "t_b", "t_c", "t_d"]
  assert meta["splits"]["chunk0"] == []


def test_missing_pieces_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="manifest.json"):
    affwild2.build(str(tmp_path / "nope"), str(tmp_path / "tfds"))
  cache = str(tmp_path / "cache")
  write_tiny_cache(cache, SPEC[:2], size=8)
  os.remove(os.path.join(cache, "trials", "t_b", "meta.json"))
  with pytest.raises(FileNotFoundError, match="t_b/meta.json"):
    affwild2.build(cache, str(tmp_path / "tfds"))
  with pytest.raises(FileNotFoundError, match="no aff_wild2 dataset"):
    affwild2.read_metadata(str(tmp_path / "tfds"))


def test_synthetic_end_to_end_round_trip(tmp_path):
  """Generator -> preprocessing -> TFDS -> windows -> stitch == annotations."""
  c = ml_collections.ConfigDict(
    {
      "name": "synthetic",
      "raw_dir": "",
      "cache_dir": "",
      "tfds_dir": "",
      "fold": 0,
      "window_length": 32,
      "hop_length": 16,
      "emotions": ("valence", "arousal"),
      "features": ("frames", "vggish", "mfcc", "egemaps"),
      "crop_size": 40,
      "time_delay": 0,
      "synthetic": {
        "num_trials": 4,
        "seed": 1,
        "min_seconds": 2.0,
        "max_seconds": 3.0,
        "vggish_model": "tiny",
      },
    }
  )
  paths = prepare.prepare(c, str(tmp_path))
  assert paths.raw_dir == str(tmp_path / "data" / "raw")
  stamp = os.stat(
    os.path.join(affwild2.dataset_dir(paths.tfds_dir), "dataset_info.json")
  ).st_mtime_ns
  assert prepare.prepare(c, str(tmp_path)) == paths  # everything skipped
  assert (
    os.stat(
      os.path.join(affwild2.dataset_dir(paths.tfds_dir), "dataset_info.json")
    ).st_mtime_ns
    == stamp
  )
  checked = 0
  for name, part_dir in (
    ("train", "Train_Set"),
    ("validation", "Validation_Set"),
  ):
    split = pipeline.load_split(c, paths, name)
    assert split.trial_names
    batches = list(pipeline.eval_batches(c, paths, name, batch_size=4))
    for b in batches:
      assert b["frames"].shape == (4, 32, 40, 40, 3)
      assert b["mfcc"].shape == (4, 32, 39)
      assert b["egemaps"].shape == (4, 32, 23)
      assert b["vggish"].shape == (4, 32, 128)
    cat = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    labels = stitch.stitch_windows(
      cat["label"], cat["trial"], cat["frame_index"], split.trial_lengths
    )
    masks = stitch.stitch_windows(
      cat["mask"][..., None].astype(float),
      cat["trial"],
      cat["frame_index"],
      split.trial_lengths,
    )
    for i, trial in enumerate(split.trial_names):
      ann = np.loadtxt(
        os.path.join(
          paths.raw_dir, "annotations", "VA_Set", part_dir, trial + ".txt"
        ),
        delimiter=",",
        skiprows=1,
        dtype=np.float32,
      )
      n = split.trial_lengths[i]
      assert abs(len(ann) - n) <= 2  # preprocessing's alignment tolerance
      m = min(len(ann), n)
      valid = np.all(ann[:m] != -5, 1)
      np.testing.assert_array_equal(masks[i][:m, 0], valid.astype(float))
      np.testing.assert_array_equal(labels[i][:m][valid], ann[:m][valid])
      checked += int(valid.sum())
  assert checked > 100
  assert pipeline.load_split(c, paths, "test").trial_names
