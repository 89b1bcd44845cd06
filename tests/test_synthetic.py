"""Tests for the synthetic mini-Aff-Wild2 generator (affjax.data.synthetic)."""

import hashlib
import json
import os

import av
import numpy as np
import pytest
from PIL import Image

from affjax.data import synthetic

_ARGS = {"num_trials": 4, "seed": 3, "min_seconds": 6.0, "max_seconds": 8.0}
_PARTITION_DIRS = {
  "train": "annotations/VA_Set/Train_Set",
  "validation": "annotations/VA_Set/Validation_Set",
  "test": "test_annotations",
}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("synth") / "raw")
  synthetic.generate(out, **_ARGS)
  return out


def _summary(raw):
  with open(os.path.join(raw, synthetic.SUMMARY)) as f:
    return json.load(f)["trials"]


def _labels(raw, trial, partition):
  path = os.path.join(raw, _PARTITION_DIRS[partition], trial + ".txt")
  with open(path) as f:
    assert f.readline().strip() == "valence,arousal"
  return np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)


def _tree_digest(root):
  digest = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        digest[os.path.relpath(path, root)] = hashlib.md5(f.read()).hexdigest()
  return digest


def test_layout_partitions_and_two_subject_video(raw):
  trials = _summary(raw)
  parts = {t: info["partition"] for t, info in trials.items()}
  assert sorted(parts.values()) == ["test", "train", "train", "validation"]
  # The two training trials are the two subjects of one video.
  train = sorted(t for t, p in parts.items() if p == "train")
  video = trials[train[0]]["video"]
  assert train == [video + "_left", video + "_right"]
  assert {info["fps"] for info in trials.values()} == {25, 30}
  with open(os.path.join(raw, synthetic.TEST_LIST)) as f:
    test_names = f.read().split()
  assert test_names == [t for t, p in parts.items() if p == "test"]
  for trial, info in trials.items():
    annotated = (
      os.path.join(raw, "annotations", "VA_Set", "Train_Set", trial + ".txt"),
      os.path.join(
        raw, "annotations", "VA_Set", "Validation_Set", trial + ".txt"
      ),
    )
    expected = {"train": (True, False), "validation": (False, True)}.get(
      info["partition"], (False, False)
    )
    assert tuple(os.path.isfile(p) for p in annotated) == expected, trial
    assert os.path.isfile(os.path.join(raw, "videos", info["video"] + ".mp4"))


def test_videos_frames_fps_and_audio(raw):
  for trial, info in _summary(raw).items():
    path = os.path.join(raw, "videos", info["video"] + ".mp4")
    with av.open(path) as container:
      stream = container.streams.video[0]
      assert stream.codec_context.name == "h264"
      assert float(stream.average_rate) == info["fps"]
      n = sum(1 for p in container.demux(stream) if p.size)
      assert len(container.streams.audio) == 1
    assert n == info["n_frames"], trial
    assert len(_labels(raw, trial, info["partition"])) == n


def test_annotations_and_crops(raw):
  for trial, info in _summary(raw).items():
    y = _labels(raw, trial, info["partition"])
    invalid = (y == -5).all(axis=1)
    assert invalid.sum() == info["n_unlabelled"] > 0
    assert np.all(np.abs(y[~invalid]) <= 1) and not np.any(y[~invalid] == -5)
    assert y[~invalid].std(axis=0).min() > 0.1  # the curves move
    crop_dir = os.path.join(raw, "cropped_aligned", trial)
    names = sorted(os.listdir(crop_dir))
    frames = [int(n[:5]) for n in names]
    assert all(len(n) == 9 and n.endswith(".jpg") for n in names)
    assert min(frames) >= 1 and max(frames) <= info["n_frames"]
    assert info["n_frames"] - len(names) == info["n_missing_crops"] > 0
    with Image.open(os.path.join(crop_dir, names[0])) as im:
      assert im.size == (112, 112) and im.mode == "RGB"
  absent = [i["n_absent_in_video"] for i in _summary(raw).values()]
  assert max(absent) > 0


def test_faces_show_labels_and_audio_follows_arousal(raw):
  """Valence is linearly readable from crops; audio loudness tracks arousal."""
  trials = _summary(raw)

  def crops_and_labels(trial):
    y = _labels(raw, trial, trials[trial]["partition"])
    xs, ys = [], []
    for i, row in enumerate(y):
      path = os.path.join(raw, "cropped_aligned", trial, f"{i + 1:05d}.jpg")
      if row[0] != -5 and os.path.exists(path):
        with Image.open(path) as im:
          small = im.convert("L").resize((24, 24), Image.BILINEAR)
        xs.append(np.asarray(small, np.float64).ravel() / 255)
        ys.append(row)
    return np.array(xs), np.array(ys)

  fit = [
    crops_and_labels(t) for t, i in trials.items() if i["partition"] == "train"
  ]
  held = [
    crops_and_labels(t) for t, i in trials.items() if i["partition"] != "train"
  ]
  x, y = (np.concatenate(a) for a in zip(*fit))
  xt, yt = (np.concatenate(a) for a in zip(*held))
  mu = x.mean(0)
  w = np.linalg.solve(
    (x - mu).T @ (x - mu) + 10 * np.eye(x.shape[1]),
    (x - mu).T @ (y - y.mean(0)),
  )
  pred = (xt - mu) @ w + y.mean(0)
  assert np.corrcoef(pred[:, 0], yt[:, 0])[0, 1] > 0.6  # valence

  single = next(t for t, i in trials.items() if i["partition"] == "validation")
  info = trials[single]
  resampler = av.AudioResampler(format="flt", layout="mono", rate=16000)
  with av.open(os.path.join(raw, "videos", info["video"] + ".mp4")) as c:
    wave = np.concatenate(
      [
        r.to_ndarray().ravel()
        for f in c.decode(audio=0)
        for r in resampler.resample(f)
      ]
    )
  y = _labels(raw, single, info["partition"])
  hop = 16000 / info["fps"]
  # Loudness over a half-second window centred on each frame.
  rms = np.array(
    [
      np.sqrt(
        np.mean(wave[max(0, int(i * hop) - 4000) : int(i * hop) + 4000] ** 2)
      )
      for i in range(len(y))
    ]
  )
  ok = y[:, 1] != -5
  assert np.corrcoef(np.log(rms[ok] + 1e-6), y[ok, 1])[0, 1] > 0.3


def test_deterministic_and_idempotent(raw, tmp_path):
  again = str(tmp_path / "again")
  synthetic.generate(again, **_ARGS)
  assert _tree_digest(again) == _tree_digest(raw)
  # Same arguments again: a no-op. Other arguments: refused.
  stamp = os.path.getmtime(os.path.join(again, synthetic.SUMMARY))
  synthetic.generate(again, **_ARGS)
  assert os.path.getmtime(os.path.join(again, synthetic.SUMMARY)) == stamp
  with pytest.raises(ValueError, match="generated with"):
    synthetic.generate(again, **{**_ARGS, "seed": 4})


def test_other_seed_differs_and_bad_targets(tmp_path):
  other = str(tmp_path / "other")
  synthetic.generate(other, **{**_ARGS, "seed": 4, "max_seconds": 6.5})
  first = min(os.listdir(os.path.join(other, "annotations/VA_Set/Train_Set")))
  y = np.loadtxt(
    os.path.join(other, "annotations/VA_Set/Train_Set", first),
    delimiter=",",
    skiprows=1,
  )
  assert len(y) >= 6 * 25 and np.abs(y[y[:, 0] != -5]).max() <= 1
  busy = tmp_path / "busy"
  busy.mkdir()
  (busy / "x.txt").write_text("x")
  with pytest.raises(ValueError, match="not empty"):
    synthetic.generate(str(busy), **_ARGS)
  with pytest.raises(ValueError, match="num_trials"):
    synthetic.generate(str(tmp_path / "few"), **{**_ARGS, "num_trials": 2})
  assert not os.path.exists(tmp_path / "few")
  with pytest.raises(ValueError, match="min_seconds <= max_seconds"):
    synthetic.generate(str(tmp_path / "x"), min_seconds=3, max_seconds=2)
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".synthetic-")]


def test_command_line(tmp_path, capsys):
  out = str(tmp_path / "cli")
  synthetic.main(
    [f"--out={out}", "--num_trials=3", "--min_seconds=1", "--max_seconds=1.5"]
  )
  assert "3 trials" in capsys.readouterr().out
  trials = _summary(out)
  assert sorted(i["partition"] for i in trials.values()) == [
    "test",
    "train",
    "validation",
  ]
  assert all(25 <= i["n_frames"] <= 1.5 * 30 for i in trials.values())
