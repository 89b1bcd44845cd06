"""Preprocessing bad inputs: each error names the offending file."""

import os
import re
import shutil

import av
import numpy as np
import pytest

from affjax.data import synthetic
from affjax.data.preprocess import __main__ as cli
from affjax.data.preprocess import cache, labels, run
from affjax.data.preprocess.cache import PreprocessSettings

SETTINGS = PreprocessSettings(vggish_model="tiny")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
  raw = str(tmp_path_factory.mktemp("err") / "raw")
  synthetic.generate(
    raw,
    num_trials=3,
    seed=2,
    min_seconds=2.0,
    max_seconds=2.5,
    two_subject_videos=0,
  )
  return raw


@pytest.fixture
def raw(pristine, tmp_path):
  """A private copy of the tiny dataset that a test may break."""
  copy = str(tmp_path / "raw")
  shutil.copytree(pristine, copy)
  return copy


def _trial(raw, partition):
  """(name, annotation path, video path) of the dataset's one trial."""
  sub = {"train": "Train_Set", "validation": "Validation_Set"}[partition]
  folder = os.path.join(raw, "annotations", "VA_Set", sub)
  name = os.listdir(folder)[0][:-4]
  return (
    name,
    os.path.join(folder, name + ".txt"),
    os.path.join(raw, "videos", name + ".mp4"),
  )


def _rewrite(path, edit):
  with open(path) as f:
    lines = f.read().splitlines()
  with open(path, "w") as f:
    f.write("\n".join(edit(lines)) + "\n")


def _preprocess(raw, tmp_path, **kwargs):
  return run.preprocess(raw, str(tmp_path / "cache"), SETTINGS, **kwargs)


def test_missing_raw_dir_and_annotation_folders(raw, tmp_path):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=re.escape(missing)):
    _preprocess(missing, tmp_path)
  shutil.rmtree(os.path.join(raw, "annotations", "VA_Set", "Validation_Set"))
  with pytest.raises(FileNotFoundError, match="Validation_Set does not exist"):
    _preprocess(raw, tmp_path)


def test_missing_annotation_for_requested_trial(raw, tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no annotation file.*'ghost'"):
    _preprocess(raw, tmp_path, trials=["ghost"])


def test_missing_video_and_crops(raw, tmp_path):
  name, _, video = _trial(raw, "validation")
  os.remove(video)
  with pytest.raises(FileNotFoundError, match=re.escape(f"{name}.mp4")):
    _preprocess(raw, tmp_path)
  train, _, _ = _trial(raw, "train")
  crops = os.path.join(raw, "cropped_aligned", train)
  shutil.rmtree(crops)
  with pytest.raises(FileNotFoundError, match=re.escape(crops)):
    _preprocess(raw, tmp_path, trials=[train])


def test_misaligned_row_count_names_the_annotation(raw, tmp_path):
  name, path, _ = _trial(raw, "validation")
  _rewrite(path, lambda lines: lines[:-3])  # 3 > tolerance of 2
  with pytest.raises(ValueError, match=re.escape(path) + ".*difference -3"):
    _preprocess(raw, tmp_path)
  assert not os.path.exists(cache.trial_dir(str(tmp_path / "cache"), name))


def test_row_count_within_tolerance_is_aligned(raw, tmp_path):
  name, path, _ = _trial(raw, "validation")
  with open(path) as f:
    original = np.loadtxt(f, delimiter=",", skiprows=1, dtype=np.float32)
  _rewrite(path, lambda lines: lines[:-2])  # two rows short
  manifest = _preprocess(raw, tmp_path, trials=[name])
  got = cache.read_trial(str(tmp_path / "cache"), name)["labels"]
  assert manifest["trials"][name]["n_frames"] == len(original) == len(got)
  np.testing.assert_array_equal(got[:-2], original[:-2])
  assert (got[-2:] == -5).all()
  # Surplus rows at the end are dropped.
  rows = labels.read_annotation(path)
  extra = np.concatenate([rows, [[0.5, 0.5]] * 4]).astype(np.float32)
  aligned = labels.align_labels(extra, len(rows) + 2, 2, path)
  np.testing.assert_array_equal(aligned, extra[: len(rows) + 2])


@pytest.mark.parametrize(
  "edit, message",
  [
    (lambda ls: ls[1:], r"expected the header 'valence,arousal' on line 1"),
    (lambda ls: ls[:3] + ["0.1,0.2,0.3"] + ls[4:], r"line 4 has 3 columns"),
    (lambda ls: ls[:5] + ["0.1,abc"] + ls[6:], r"line 6 is not numeric"),
    (lambda ls: ls[:7] + ["1.5,0.2"] + ls[8:], r"line 8 has 1.5"),
    (lambda ls: ls[:7] + ["0.2,-4"] + ls[8:], r"line 8 has -4.0"),
    (lambda ls: ls[:2] + [""] + ls[2:], r"line 3 is empty"),
  ],
)
def test_malformed_annotation(raw, tmp_path, edit, message):
  _, path, _ = _trial(raw, "train")
  _rewrite(path, edit)
  with pytest.raises(ValueError, match=re.escape(path) + ": " + message):
    _preprocess(raw, tmp_path)


def test_annotation_parsing_accepts_trailing_blank_lines(tmp_path):
  path = tmp_path / "a.txt"
  path.write_text("Valence,Arousal\n0.25,-1\n-5,-5\n\n\n")
  np.testing.assert_array_equal(
    labels.read_annotation(str(path)), [[0.25, -1], [-5, -5]]
  )


def test_corrupt_and_truncated_video(raw, tmp_path):
  _, _, video = _trial(raw, "validation")
  with open(video, "rb") as f:
    data = f.read()
  with open(video, "wb") as f:
    f.write(data[: len(data) // 2])  # the mp4 index is at the end
  with pytest.raises(ValueError, match=re.escape(video) + ": unreadable"):
    _preprocess(raw, tmp_path)
  with open(video, "wb") as f:
    f.write(b"this is not a video" * 100)
  with pytest.raises(ValueError, match=re.escape(video) + ": unreadable"):
    _preprocess(raw, tmp_path)


def test_video_without_audio(raw, tmp_path):
  _, path, video = _trial(raw, "validation")
  n = len(labels.read_annotation(path))
  with av.open(video, "w") as c:
    s = c.add_stream("libx264", rate=25)
    s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
    for i in range(n):
      frame = av.VideoFrame.from_ndarray(
        np.full((48, 64, 3), i % 200, np.uint8), format="rgb24"
      )
      for p in s.encode(frame):
        c.mux(p)
    for p in s.encode():
      c.mux(p)
  with pytest.raises(ValueError, match=re.escape(video) + ": .*no audio"):
    _preprocess(raw, tmp_path)


def test_all_problems_are_reported_together(raw, tmp_path):
  _, train_ann, _ = _trial(raw, "train")
  _, val_ann, _ = _trial(raw, "validation")
  for path in (train_ann, val_ann):
    _rewrite(path, lambda lines: lines[1:])
  with pytest.raises(ValueError, match="2 trials have bad inputs") as info:
    _preprocess(raw, tmp_path)
  assert train_ann in str(info.value) and val_ann in str(info.value)


def test_all_invalid_trial_is_skipped_with_a_warning(raw, tmp_path):
  name, path, _ = _trial(raw, "validation")
  _rewrite(path, lambda lines: lines[:1] + ["-5,-5"] * (len(lines) - 1))
  with pytest.warns(UserWarning, match=f"skipping trial {name}"):
    manifest = _preprocess(raw, tmp_path, trials=[name])
  assert manifest["trials"] == {}
  assert manifest["skipped"][name]["partition"] == "validation"
  assert path in manifest["skipped"][name]["reason"]
  assert not os.path.exists(cache.trial_dir(str(tmp_path / "cache"), name))
  saved = cache.read_json(str(tmp_path / "cache" / cache.MANIFEST))
  assert saved["skipped"] == manifest["skipped"]


def test_cli_reports_errors_and_builds(raw, tmp_path, capsys):
  name, path, _ = _trial(raw, "validation")
  out = str(tmp_path / "cli_cache")
  _rewrite(path, lambda lines: lines[1:])
  assert cli.main([f"--raw={raw}", f"--out={out}"]) == 2
  assert path in capsys.readouterr().err
  _rewrite(path, lambda lines: ["valence,arousal", *lines])
  code = cli.main(
    [
      f"--raw={raw}",
      f"--out={out}",
      f"--trials={name}",
      "--vggish_model=tiny",
      "--vggish_hop_seconds=0.96",
    ]
  )
  assert code == 0
  manifest = cache.read_json(os.path.join(out, cache.MANIFEST))
  assert list(manifest["trials"]) == [name]
  assert manifest["settings"]["vggish_hop_seconds"] == 0.96


def test_worker_errors_name_the_trial(raw, tmp_path):
  """A feature error inside a spawn worker surfaces with trial and video."""
  name, _, video = _trial(raw, "validation")
  with av.open(video) as src:
    n = src.streams.video[0].frames
  rate = 16000
  with av.open(video, "w") as c:  # full-length video, 0.5 s of audio
    vs = c.add_stream("libx264", rate=25)
    vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
    aus = c.add_stream("aac", rate=rate, layout="mono")
    tone = np.sin(np.arange(rate // 2) * 0.1).astype(np.float32)
    af = av.AudioFrame.from_ndarray(tone[None], format="fltp", layout="mono")
    af.sample_rate, af.pts = rate, 0
    for p in aus.encode(af):
      c.mux(p)
    for i in range(n):
      frame = av.VideoFrame.from_ndarray(
        np.full((48, 64, 3), i % 200, np.uint8), format="rgb24"
      )
      for p in vs.encode(frame):
        c.mux(p)
    for s in (vs, aus):
      for p in s.encode():
        c.mux(p)
  with pytest.raises(ValueError, match=f"trial {name} \\({re.escape(video)}"):
    _preprocess(raw, tmp_path, num_workers=2)
  # The other trials may or may not have finished; the broken one never did.
  assert not os.path.exists(cache.trial_dir(str(tmp_path / "cache"), name))
