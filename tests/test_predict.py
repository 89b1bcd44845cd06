"""Tests of affjax.predict on generated videos with untrained checkpoints.

The checkpoints are written directly (random weights of `configs/test.py`'s
model, no training); the end-to-end accuracy test with a trained model is in
test_predict_e2e.py.
"""

import json
import os
import warnings

import av
import jax
import numpy as np
import pytest

from affjax import checkpoints, ensemble, face, predict, sharding, train_state
from affjax.data.preprocess import audio
from affjax.data.preprocess import video as video_lib
from affjax.face import tracking
from configs import test as test_config

TRIAL = "1-25-256x192"  # 154 frames at 25 fps; the face leaves for 27
STATS_MEAN, STATS_STD = 0.5, 2.0


def _config(arg=None, **changes):
  config = test_config.get_config(arg)
  config.unlock()
  for key, value in changes.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config.lock()


def _save_checkpoint(workdir, config, seed, metadata=None):
  """A checkpoint of random weights, written without compiling anything."""
  mesh = sharding.make_mesh((("data", 1),), devices=jax.devices()[:1])
  setup = train_state.build_setup(config, mesh)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "batch_stats" in name and "var" in name:
      value = np.ones(leaf.shape, leaf.dtype)
    elif "params" in name and "opt_state" not in name:
      value = (0.3 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
    else:
      value = np.zeros(leaf.shape, leaf.dtype)
    return jax.device_put(value, leaf.sharding)

  state = jax.tree_util.tree_map_with_path(fill, setup.abstract_state)
  if metadata is None:
    metadata = {
      "feature_stats": {
        n: {"mean": [STATS_MEAN] * d, "std": [STATS_STD] * d}
        for n, d in config.model.audio_features
      },
      "preprocess_settings": {"vggish_model": "tiny"},
    }
  manager = checkpoints.create_manager(workdir)
  checkpoints.save(manager, 1, state, config, metadata, 0.1)
  manager.wait_until_finished()
  return workdir


def _cut(src, dst, n_frames, with_audio=True):
  """Remuxes the first n_frames video frames (and that much audio)."""
  with av.open(src) as inp, av.open(dst, "w") as out:
    vin = inp.streams.video[0]
    vout = out.add_stream_from_template(vin)
    streams = [vin]
    aout = None
    if with_audio:
      ain = inp.streams.audio[0]
      aout = out.add_stream_from_template(ain)
      streams.append(ain)
    end = n_frames / float(vin.average_rate)
    count = 0
    for pkt in inp.demux(*streams):
      if pkt.dts is None:
        continue
      if pkt.stream.type == "video":
        if count >= n_frames:
          continue
        count += 1
        pkt.stream = vout
      else:
        if pkt.pts * pkt.time_base >= end + 0.1:
          continue
        pkt.stream = aout
      out.mux(pkt)


@pytest.fixture(scope="module")
def env(tmp_path_factory, video_raw):
  root = tmp_path_factory.mktemp("predict")
  raw = video_raw  # the session's (tests/conftest.py), read only
  video = os.path.join(raw, "videos", TRIAL + ".mp4")
  crops = video_lib.list_crops(os.path.join(raw, "cropped_aligned", TRIAL))
  _, has_crop = video_lib.load_frames(crops, 154, 48)
  absent = np.zeros(154, bool)
  for start, end in tracking._runs(~has_crop):
    if end - start >= 3:  # single missing crops are random detector misses
      absent[start:end] = True
  short = str(root / "short.mp4")
  _cut(video, short, 48)
  silent = str(root / "silent.mp4")
  _cut(video, silent, 48, with_audio=False)
  a = _save_checkpoint(str(root / "run_a"), _config(), 0)
  b = _save_checkpoint(str(root / "run_b"), _config(), 1)
  c = _save_checkpoint(str(root / "run_c"), _config(), 2)
  return {
    "root": root,
    "raw": raw,
    "video": video,
    "absent": absent,
    "short": short,
    "silent": silent,
    "a": a,
    "b": b,
    "models": {
      k: predict.load_model(w) for k, w in (("a", a), ("b", b), ("c", c))
    },
  }


@pytest.fixture(scope="module")
def full_run(env):
  out = str(env["root"] / "out")
  return predict.run(env["a"], env["video"], out_dir=out), out


# ----------------------------------------------------------------- errors


def test_missing_file(env, tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.mp4 does not exist"):
    predict.run(env["a"], str(tmp_path / "nope.mp4"))


def test_not_a_video(env, tmp_path):
  path = tmp_path / "notes.mp4"
  path.write_text("these are notes, not a video\n" * 20)
  with pytest.raises(ValueError, match="notes.mp4 is not a readable video"):
    predict.run(env["a"], str(path))
  with pytest.raises(ValueError, match="is not a file"):
    predict.run(env["a"], str(tmp_path))


def test_zero_length_videos(env, tmp_path):
  empty = tmp_path / "empty.mp4"
  empty.write_bytes(b"")
  with pytest.raises(ValueError, match="zero-length"):
    predict.run(env["a"], str(empty))
  for ext, codec in (("mp4", "libx264"), ("avi", "mpeg4")):
    path = str(tmp_path / f"zero.{ext}")  # header written, no frame
    with av.open(path, "w") as container:
      stream = container.add_stream(codec, rate=25)
      stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
      container.start_encoding()
    with pytest.raises(ValueError, match="zero-length"):
      predict.run(env["a"], path)


def test_checkpoint_dir_without_checkpoint(env, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    predict.run(str(tmp_path / "missing"), env["short"])
  with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
    predict.run(str(tmp_path), env["short"])
  os.makedirs(tmp_path / "checkpoints")
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    predict.run(str(tmp_path), env["short"])


def test_config_must_match_the_checkpoint(env):
  with pytest.raises(ValueError, match="model.kernel_size: checkpoint 3"):
    predict.load_model(env["a"], config=_config(**{"model.kernel_size": 5}))
  # Keys that do not change the model may differ.
  model = predict.load_model(
    env["a"], config=_config(**{"train.max_epochs": 7})
  )
  assert model.step == 1 and model.emotions == ("valence", "arousal")


def test_folds_must_predict_the_same_emotions(env, tmp_path):
  config = _config(**{"data.emotions": ("arousal",), "model.num_outputs": 1})
  other = _save_checkpoint(str(tmp_path / "arousal"), config, 2)
  with pytest.raises(ValueError, match="different emotions"):
    predict.load_models([env["a"], other])
  with pytest.raises(ValueError, match="single workdir"):
    predict.load_models([env["a"], env["b"]], step=1)


def test_missing_normalisation_stats_is_an_error(tmp_path):
  workdir = _save_checkpoint(
    str(tmp_path / "nostats"),
    _config(),
    0,
    metadata={"feature_stats": {"mfcc": {"mean": [0.0], "std": [1.0]}}},
  )
  with pytest.raises(ValueError, match=r"statistics of \['vggish'\]"):
    predict.load_model(workdir)


# ----------------------------------------------------------------- outputs


def test_csv_has_one_row_per_frame_and_face_flags(env, full_run):
  prediction, out = full_run
  assert sorted(os.listdir(out)) == [
    f"{TRIAL}.{k}" for k in ("csv", "json", "png")
  ]
  with open(os.path.join(out, TRIAL + ".csv")) as f:
    lines = f.read().splitlines()
  assert lines[0] == "frame,time_s,valence,arousal,face_found"
  assert len(lines) == 1 + 154
  rows = [line.split(",") for line in lines[1:]]
  np.testing.assert_array_equal([int(r[0]) for r in rows], np.arange(154))
  np.testing.assert_allclose(
    [float(r[1]) for r in rows], np.arange(154) / 25.0, atol=5e-5
  )
  found = np.array([r[4] == "true" for r in rows])
  assert {r[4] for r in rows} == {"true", "false"}
  np.testing.assert_array_equal(found, ~env["absent"])
  values = np.array([[float(r[2]), float(r[3])] for r in rows])
  assert np.all(np.abs(values) <= 1.0)
  np.testing.assert_allclose(values, prediction.values, atol=5e-5)
  emotions, read_values, read_found = predict.read_csv(
    os.path.join(out, TRIAL + ".csv")
  )
  assert emotions == ["valence", "arousal"]
  np.testing.assert_array_equal(read_found, found)
  np.testing.assert_allclose(read_values, values)


def test_plot_and_summary(env, full_run):
  prediction, out = full_run
  with open(os.path.join(out, TRIAL + ".png"), "rb") as f:
    png = f.read()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
  with open(os.path.join(out, TRIAL + ".json")) as f:
    summary = json.load(f)
  assert summary["n_frames"] == 154 and summary["fps"] == 25.0
  assert summary["frames_with_face"] == int((~env["absent"]).sum())
  assert summary["used_audio"] is True
  assert summary["models"] == [{"workdir": env["a"], "step": 1}]
  assert (summary["width"], summary["height"]) == (256, 192)
  # A synthetic-data model: YuNet boxes, square crops, and the warning.
  assert summary["detector"]["landmarks"] is False
  assert (
    summary["trained_on_synthetic"] is True and "not emotion" in summary["note"]
  )
  assert prediction.paths["csv"] == os.path.join(out, TRIAL + ".csv")


def test_single_emotion_csv_and_default_out_dir():
  p = predict.Prediction(
    video="/x/clip.mp4",
    fps=30.0,
    emotions=("arousal",),
    values=np.array([[0.25], [-0.125]], np.float32),
    face_found=np.array([True, False]),
    used_audio=False,
    models=[],
  )
  assert predict.csv_text(p) == (
    "frame,time_s,arousal,face_found\n"
    "0,0.0000,0.2500,true\n"
    "1,0.0333,-0.1250,false\n"
  )


# ---------------------------------------------------------- the computation


def test_predictions_equal_an_independent_computation(env):
  # Faces cropped with the face module, features with the audio module,
  # normalised and windowed by hand; 48 frames = 3 windows of 16.
  model = env["models"]["a"]
  frames = np.stack(list(predict.iter_frames(env["short"])))
  detector = face.make_detector(drawn_faces=True)
  boxes, found = face.track_faces([detector.detect(f) for f in frames])
  faces = np.zeros((48, 48, 48, 3), np.uint8)
  for i in np.flatnonzero(found):
    faces[i] = face.crop_face(frames[i], boxes[i], scale=1.53, y_shift=-0.10)
  x = (faces[:, 4:44, 4:44].astype(np.float32) / 255 - 0.5) / 0.5
  wave = audio.load_audio(env["short"], 16000)
  from affjax.models import vggish

  feats = {
    "mfcc": audio.mfcc_features(wave, 16000, 48, 25.0),
    "vggish": audio.vggish_features(
      wave, 16000, 48, 25.0, params=vggish.init_params(0, tiny=True)
    ),
  }
  batch = {"frames": x.reshape(3, 16, 40, 40, 3)}
  for k, v in feats.items():
    batch[k] = ((v - STATS_MEAN) / STATS_STD).reshape(3, 16, -1)
  expected = np.asarray(model.apply(batch)).reshape(48, 2)
  got = predict.predict_video(env["short"], [model])
  np.testing.assert_array_equal(got.face_found, found)
  np.testing.assert_allclose(got.values, np.clip(expected, -1, 1), atol=2e-5)
  assert got.used_audio and got.n_frames == 48


def test_folds_are_merged_by_ccc_centering(env):
  folds = [env["models"][k] for k in "abc"]
  merged = predict.predict_video(env["short"], folds)
  # Each fold's unclipped stitched predictions, from the same inputs.
  faces = predict.extract_faces(
    env["short"], detector=face.make_detector(drawn_faces=True)
  )
  raw = predict.audio_features(
    env["short"], ["mfcc", "vggish"], 48, 25.0, folds[0].settings
  )
  preds = np.stack(
    [
      predict.predict_windows(m, predict.model_inputs(m, faces.frames, raw))
      for m in folds
    ]
  ).astype(np.float32)
  expected = ensemble.merge_folds(preds)
  np.testing.assert_allclose(merged.values, expected, atol=1e-5)
  # With 3 folds the agreement weights differ: not the plain clipped mean.
  assert not np.allclose(
    merged.values, np.clip(preds.mean(0), -1, 1), atol=1e-3
  )
  assert np.abs(merged.values).max() <= 1.0
  assert [m["workdir"] for m in merged.models] == [
    env["models"][k].workdir for k in "abc"
  ]


def test_video_without_audio(env):
  model = env["models"]["a"]
  with pytest.raises(ValueError, match="no audio track"):
    predict.predict_video(env["silent"], [model], allow_missing_audio=False)
  with pytest.warns(UserWarning, match="no audio track"):
    got = predict.predict_video(env["silent"], [model])
  assert not got.used_audio and got.n_frames == 48
  # Audio inputs at the training mean: same as zeros after normalisation.
  faces = predict.extract_faces(
    env["silent"], detector=face.make_detector(drawn_faces=True)
  )
  inputs = predict.model_inputs(model, faces.frames, None)
  assert not inputs["mfcc"].any() and inputs["vggish"].shape == (48, 128)
  expected = predict.predict_windows(model, inputs)
  np.testing.assert_allclose(got.values, np.clip(expected, -1, 1), atol=1e-6)


# ------------------------------------------------------------- pure helpers


class _FakeModel:
  """LoadedModel stand-in: output = position inside the window."""

  def __init__(self, window, hop):
    self.config = _config(
      **{"data.window_length": window, "data.hop_length": hop}
    )
    self.batches = []

  def apply(self, batch):
    self.batches.append({k: v.copy() for k, v in batch.items()})
    b, t = batch["frames"].shape[:2]
    return np.broadcast_to(
      np.arange(t, dtype=np.float32)[None, :, None], (b, t, 2)
    )


def test_predict_windows_averages_overlaps():
  fake = _FakeModel(window=4, hop=3)
  inputs = {"frames": np.zeros((10, 2, 2, 3), np.float32)}
  out = predict.predict_windows(fake, inputs, batch_size=2)
  # Windows start at 0, 3, 6: frame 3 is position 3 of the first window and
  # position 0 of the second, and so on.
  expected = [0, 1, 2, 1.5, 1, 2, 1.5, 1, 2, 3]
  np.testing.assert_allclose(out[:, 0], expected)
  assert [len(b["frames"]) for b in fake.batches] == [2, 2]  # padded row


def test_predict_windows_pads_a_short_video():
  fake = _FakeModel(window=8, hop=4)
  inputs = {
    "frames": np.ones((5, 2, 2, 3), np.float32),
    "mfcc": np.ones((5, 39), np.float32),
  }
  out = predict.predict_windows(fake, inputs)
  np.testing.assert_allclose(out[:, 1], np.arange(5))
  (batch,) = fake.batches
  assert batch["frames"].shape == (1, 8, 2, 2, 3)
  assert np.all(batch["frames"][0, 5:] == -1.0)  # padding as the pipeline
  assert np.all(batch["mfcc"][0, 5:] == 0.0)


def test_model_inputs_crop_and_normalisation(env):
  model = env["models"]["a"]
  faces = np.zeros((2, 48, 48, 3), np.uint8)
  faces[0, 4, 4] = 255  # the first pixel of the centre 40x40
  faces[0, 3, 3] = 255  # outside it
  raw = {
    "mfcc": np.full((2, 39), 4.5, np.float32),
    "vggish": np.zeros((2, 128), np.float32),
  }
  inputs = predict.model_inputs(model, faces, raw)
  assert inputs["frames"].shape == (2, 40, 40, 3)
  assert inputs["frames"][0, 0, 0, 0] == 1.0
  assert np.sum(inputs["frames"] == 1.0) == 3  # one pixel, three channels
  assert np.all(inputs["frames"][1] == -1.0)
  np.testing.assert_allclose(inputs["mfcc"], 2.0)  # (4.5 - 0.5) / 2
  np.testing.assert_allclose(inputs["vggish"], -0.25)


def test_shift_time_delay():
  pred = np.arange(5.0)[:, None]
  np.testing.assert_array_equal(predict.shift_time_delay(pred, 0), pred)
  np.testing.assert_array_equal(
    predict.shift_time_delay(pred, 2)[:, 0], [0, 0, 0, 1, 2]
  )


def test_preprocess_settings_sources(tmp_path):
  config = _config()
  # 1. the checkpoint metadata
  s = predict.preprocess_settings(
    config, {"preprocess_settings": {"vggish_hop_seconds": 0.96}}, "w"
  )
  assert s.vggish_hop_seconds == 0.96 and s.vggish_model == "full"
  # 3. the config (configs/test.py asks for the tiny VGGish)
  config.unlock()
  config.data.cache_dir = str(tmp_path)
  config.lock()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    s = predict.preprocess_settings(config, {}, str(tmp_path))
  assert s.vggish_model == "tiny"
  # 2. the cache manifest
  with open(tmp_path / "manifest.json", "w") as f:
    json.dump({"settings": {"vggish_model": "full", "frame_size": 64}}, f)
  s = predict.preprocess_settings(config, {}, str(tmp_path))
  assert (s.vggish_model, s.frame_size) == ("full", 64)
  with pytest.raises(ValueError, match="unknown preprocessing settings"):
    predict.preprocess_settings(
      config, {"preprocess_settings": {"bogus": 1}}, "w"
    )
