"""Preprocessing a tiny synthetic dataset: cache content, manifest, resume."""

import json
import os
import shutil

import av
import numpy as np
import pytest
from PIL import Image

from affjax.data import synthetic
from affjax.data.preprocess import cache, run
from affjax.data.preprocess.cache import PreprocessSettings

SETTINGS = PreprocessSettings(vggish_model="tiny")
_LABEL_DIRS = {
  "train": "annotations/VA_Set/Train_Set",
  "validation": "annotations/VA_Set/Validation_Set",
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("pre")
  raw, out = str(root / "raw"), str(root / "cache")
  synthetic.generate(
    raw, num_trials=4, seed=1, min_seconds=3.0, max_seconds=4.0
  )
  # Two spawn workers: the multiprocess path is the one users run.
  manifest = run.preprocess(raw, out, SETTINGS, num_workers=2)
  return raw, out, manifest


def _summary(raw):
  with open(os.path.join(raw, synthetic.SUMMARY)) as f:
    return json.load(f)["trials"]


def _frame_count(path):
  with av.open(path) as c:
    return sum(1 for p in c.demux(c.streams.video[0]) if p.size)


def test_manifest_lists_every_trial_with_settings(built):
  raw, out, manifest = built
  summary = _summary(raw)
  assert manifest == cache.read_json(os.path.join(out, cache.MANIFEST))
  assert manifest["version"] == 1 and manifest["skipped"] == {}
  assert manifest["settings"] == SETTINGS.to_dict()
  assert manifest["raw_dir"] == os.path.abspath(raw)
  assert sorted(manifest["trials"]) == sorted(summary)
  for name, entry in manifest["trials"].items():
    assert entry["partition"] == summary[name]["partition"]
    assert entry["fps"] == summary[name]["fps"]
    assert entry["video"] == summary[name]["video"]
  assert cache.finished_trials(out) == sorted(summary)


def test_shapes_and_frame_counts_follow_the_video(built):
  raw, out, manifest = built
  for name, entry in manifest["trials"].items():
    t = cache.read_trial(out, name)
    n = _frame_count(os.path.join(raw, "videos", entry["video"] + ".mp4"))
    assert entry["n_frames"] == t["meta"]["n_frames"] == n
    expected = {
      "frames": ((n, 48, 48, 3), np.uint8),
      "face_mask": ((n,), np.bool_),
      "labels": ((n, 2), np.float32),
      "mfcc": ((n, 39), np.float32),
      "egemaps": ((n, 23), np.float32),
      "vggish": ((n, 128), np.float32),
    }
    for key, (shape, dtype) in expected.items():
      assert t[key].shape == shape and t[key].dtype == dtype, (name, key)
    for key in ("mfcc", "egemaps", "vggish"):
      assert np.isfinite(t[key]).all()
      assert t[key].std(axis=0).max() > 0  # not constant over time
    meta = t["meta"]
    assert meta["trial"] == name and meta["partition"] == entry["partition"]


def test_labels_equal_annotation_rows(built):
  raw, out, manifest = built
  for name, entry in manifest["trials"].items():
    labels = cache.read_trial(out, name)["labels"]
    if entry["partition"] == "test":
      assert (labels == -5).all()
      continue
    path = os.path.join(raw, _LABEL_DIRS[entry["partition"]], name + ".txt")
    rows = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float32)
    np.testing.assert_array_equal(labels, rows)
    assert entry["n_valid_labels"] == int((rows != -5).all(axis=1).sum())
    assert 0 < entry["n_valid_labels"] < len(rows)


def test_face_mask_and_frames_match_the_crops(built):
  raw, out, manifest = built
  for name in manifest["trials"]:
    t = cache.read_trial(out, name)
    crop_dir = os.path.join(raw, "cropped_aligned", name)
    present = np.array(
      [
        os.path.exists(os.path.join(crop_dir, f"{i + 1:05d}.jpg"))
        for i in range(len(t["face_mask"]))
      ]
    )
    np.testing.assert_array_equal(t["face_mask"], present)
    assert not present.all() and present.any()
    assert not t["frames"][~present].any()  # zeros where no face
    for i in np.flatnonzero(present)[:: max(1, present.sum() // 5)]:
      with Image.open(os.path.join(crop_dir, f"{i + 1:05d}.jpg")) as im:
        want = np.asarray(im.convert("RGB").resize((48, 48), Image.BICUBIC))
      np.testing.assert_array_equal(t["frames"][i], want)


def test_feature_sums_cover_labelled_frames(built):
  _, out, manifest = built
  for name, entry in manifest["trials"].items():
    t = cache.read_trial(out, name)
    if entry["partition"] == "test":
      frames = np.ones(entry["n_frames"], bool)
    else:
      frames = (t["labels"] != -5).all(axis=1)
    for key, dim in cache.FEATURE_DIMS.items():
      sums = t["meta"]["feature_sums"][key]
      x = t[key][frames].astype(np.float64)
      assert sums["count"] == frames.sum() and len(sums["sum"]) == dim
      np.testing.assert_allclose(sums["sum"], x.sum(0), rtol=1e-9, atol=1e-6)
      np.testing.assert_allclose(sums["sumsq"], (x**2).sum(0), rtol=1e-9)


def test_resume_redoes_only_the_missing_trial(built, monkeypatch):
  raw, out, _ = built
  names = cache.finished_trials(out)
  meta = {n: os.path.join(cache.trial_dir(out, n), cache.META) for n in names}
  before = {n: os.stat(p).st_mtime_ns for n, p in meta.items()}
  victim, unlisted = names[0], names[1]
  shutil.rmtree(cache.trial_dir(out, victim))
  # A leftover of a killed run, and a finished trial the manifest missed.
  os.makedirs(os.path.join(out, "trials", ".tmp-x-123"))
  manifest_path = os.path.join(out, cache.MANIFEST)
  manifest = cache.read_json(manifest_path)
  del manifest["trials"][unlisted]
  cache.atomic_write_json(manifest_path, manifest)

  built_names = []
  original = run._build_trial

  def counting(job, *args):
    built_names.append(job.source.name)
    return original(job, *args)

  monkeypatch.setattr(run, "_build_trial", counting)
  manifest = run.preprocess(raw, out, SETTINGS, num_workers=1)
  assert built_names == [victim]
  assert sorted(manifest["trials"]) == names
  assert not os.path.exists(os.path.join(out, "trials", ".tmp-x-123"))
  for n in names:
    changed = os.stat(meta[n]).st_mtime_ns != before[n]
    assert changed == (n == victim), n
  # Nothing left to do: a rerun builds nothing.
  built_names.clear()
  run.preprocess(raw, out, SETTINGS, num_workers=2)
  assert built_names == []


def test_settings_mismatch_is_refused(built):
  raw, out, _ = built
  other = PreprocessSettings(vggish_model="tiny", frame_size=32)
  with pytest.raises(ValueError, match=r"frame_size: cache has 48") as info:
    run.preprocess(raw, out, other)
  assert os.path.join(out, cache.MANIFEST) in str(info.value)
