r"""Per-frame valence/arousal for any video, offline: `--mode=predict`.

  python -m affjax.main --mode=predict --workdir=DIR --video=clip.mp4 \
      [--out=OUT]

or in Python `affjax.predict.run(workdir, video, out_dir=None)`. `workdir`
may name several fold runs (a list, or comma-separated): their predictions
are merged by CCC centering (`affjax.ensemble.merge_folds`).

What happens to the video (nothing is downloaded; the checkpoint's workdir
is all that is needed):

1. Decoding (PyAV), any container / frame rate / resolution. Frame i is at
   `time_s = i / fps` (`fps` = the stream's average rate), the same clock the
   audio features are aligned to.
2. Faces: OpenCV's bundled Haar cascade per frame (`affjax.face.detector`),
   one face tracked through the video, gaps of <= 5 frames bridged, boxes
   smoothed (`affjax.face.tracking`), cropped like the dataset's
   `cropped_aligned` images and resized to the cache's 48x48
   (`affjax.face.crop`). Frames without a face get zero pixels, exactly like
   the training cache, and `face_found = false` in the output.
3. Audio: the checkpoint's features (MFCC / eGeMAPS / VGGish) with the
   training cache's settings (`affjax.data.preprocess.audio`), one row per
   video frame, normalised with the fold's training statistics stored in the
   checkpoint metadata. A video without an audio track: a visual-only model
   needs none; an audio-visual model gets its audio inputs set to the
   training mean (0 after normalisation) with a warning, or raises when
   `allow_missing_audio=False`.
4. The model (best checkpoint of each workdir) over windows of
   `config.data.window_length` frames every `hop_length` frames, overlaps
   averaged (`affjax.data.stitch`), as in evaluation. With
   `config.data.time_delay = d` the output at frame t estimates the label of
   frame t + d (training shifted labels d frames earlier), so predictions are
   moved d frames later (the first d frames repeat the first output).
5. Several folds: CCC centering, then the reference's clip to [-1, 1]; a
   single model's predictions are clipped to [-1, 1] too.

Files written to `out_dir` (default `<workdir>/predict`), atomically:
  <video stem>.csv   frame,time_s,<emotions...>,face_found  (one row per
                     frame; only the emotions the model predicts, in its
                     order, e.g. `frame,time_s,arousal,face_found`)
  <video stem>.png   the predicted curves over time; face-less spans shaded
  <video stem>.json  what was used: models (workdir, step), video info,
                     detector settings, whether audio was used
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging
from flax import traverse_util

from affjax import checkpoints
from affjax import face as face_lib

AUDIO_FEATURES = ("vggish", "mfcc", "egemaps")
# Config keys that must agree between a given config and the checkpoint's:
# the ones that change what the model computes from a video.
_MODEL_KEYS = (
  "model",
  "data.emotions",
  "data.features",
  "data.window_length",
  "data.hop_length",
  "data.crop_size",
  "data.time_delay",
)
_IGNORED_MODEL_KEYS = ("model.backbone_checkpoint", "model.backbone.conv_chunk")


# ----------------------------------------------------------------------------
# Video decoding.


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  """A decoded video. `n_frames` counts decoded frames (not the header's)."""

  path: str
  n_frames: int
  fps: float
  width: int
  height: int
  has_audio: bool


def _open_video(path: str):
  """Opens `path` with PyAV; returns (container, video stream)."""
  import av  # pylint: disable=g-import-not-at-top

  if not os.path.exists(path):
    raise FileNotFoundError(f"video {path} does not exist")
  if not os.path.isfile(path):
    raise ValueError(f"video {path} is not a file")
  if os.path.getsize(path) == 0:
    raise ValueError(f"video {path} is empty (0 bytes): a zero-length video")
  try:
    container = av.open(path)
  except av.EOFError as e:
    raise ValueError(
      f"{path} ends before any frame: a zero-length or truncated video ({e})"
    ) from e
  except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
    raise ValueError(
      f"{path} is not a readable video ({type(e).__name__}: {e})"
    ) from e
  if not container.streams.video:
    kinds = [s.type for s in container.streams]
    container.close()
    if not kinds:
      raise ValueError(
        f"{path} holds no stream at all: an empty (zero-length) video"
      )
    raise ValueError(f"{path} has no video stream (streams found: {kinds})")
  return container, container.streams.video[0]


def _frame_rate(path: str, stream: Any) -> float:
  rate = stream.average_rate or stream.guessed_rate or stream.base_rate
  if not rate or float(rate) <= 0:
    raise ValueError(f"{path}: the video stream has no frame rate")
  return float(rate)


def iter_frames(path: str) -> Iterator[np.ndarray]:
  """Decoded RGB frames of the first video stream, uint8 `[H, W, 3]`.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: not a video, no video stream, or a decoding error (naming
      the file and the frame).
  """
  import av  # pylint: disable=g-import-not-at-top

  container, stream = _open_video(path)
  with container:
    stream.thread_type = "AUTO"
    index = 0
    try:
      for frame in container.decode(stream):
        yield frame.to_ndarray(format="rgb24")
        index += 1
    except (av.FFmpegError, OSError) as e:
      raise ValueError(f"{path}: decoding failed at frame {index} ({e})") from e


def probe(path: str) -> tuple[float, bool]:
  """(frame rate, has an audio track) of a video, without decoding.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: not a video, no video stream, no frame (zero-length video)
      or no frame rate.
  """
  import av  # pylint: disable=g-import-not-at-top

  container, stream = _open_video(path)
  with container:
    n_frames = int(stream.frames or 0)
    if n_frames <= 0:  # not in the header: count the demuxed packets
      try:
        n_frames = sum(1 for p in container.demux(stream) if p.size)
      except (av.FFmpegError, OSError) as e:
        raise ValueError(f"{path}: unreadable video stream ({e})") from e
    if n_frames <= 0:
      raise ValueError(f"{path}: the video has no frames (zero-length video)")
    return _frame_rate(path, stream), bool(container.streams.audio)


# ----------------------------------------------------------------------------
# Faces.


@dataclasses.dataclass
class FaceTrack:
  """Face frames of a video, as the feature cache stores them.

  Attributes:
    frames: uint8 `[T, size, size, 3]`, zeros where no face.
    found: bool `[T]`.
    boxes: float32 `[T, 4]` tracked detector boxes (x0, y0, x1, y1), zeros
      where no face.
    width, height: frame size, pixels.
  """

  frames: np.ndarray
  found: np.ndarray
  boxes: np.ndarray
  width: int
  height: int


def extract_faces(
  path: str,
  *,
  detector: face_lib.HaarFaceDetector | None = None,
  track_settings: face_lib.TrackSettings | None = None,
  size: int = 48,
) -> FaceTrack:
  """Detects, tracks and crops the face of every frame (two decoding passes).

  The first pass detects; boxes are then tracked over the whole video
  (bridging and smoothing look ahead); the second pass crops. No frame is
  kept in memory between the passes, so long videos fit.

  Raises:
    ValueError: zero-length video, or the two passes disagree.
  """
  detector = detector or face_lib.HaarFaceDetector()
  detections, shape = [], None
  for frame in iter_frames(path):
    shape = frame.shape
    detections.append(detector.detect(frame))
  if not detections:
    raise ValueError(f"{path}: the video has no frames (zero-length video)")
  boxes, found = face_lib.track_faces(detections, track_settings)
  frames = np.zeros((len(found), size, size, 3), np.uint8)
  n = 0
  for n, frame in enumerate(iter_frames(path), start=1):
    if n <= len(found) and found[n - 1]:
      frames[n - 1] = face_lib.crop_face(frame, boxes[n - 1], size=size)
  if n != len(found):
    raise ValueError(f"{path}: decoded {len(found)} frames, then {n}")
  return FaceTrack(
    frames=frames,
    found=found,
    boxes=boxes,
    width=int(shape[1]),
    height=int(shape[0]),
  )


# ----------------------------------------------------------------------------
# Checkpoints.


@dataclasses.dataclass
class LoadedModel:
  """One restored run: what its predictions need.

  Attributes:
    workdir: the run directory.
    step: checkpoint step (finished epochs).
    config: the run's config (from the checkpoint).
    metadata: the checkpoint metadata (normalisation statistics, ...).
    settings: preprocessing settings of the run's feature cache.
    apply: jitted `(batch) -> [B, T, n_outputs]` in eval mode.
  """

  workdir: str
  step: int
  config: Any
  metadata: dict[str, Any]
  settings: Any
  apply: Callable[[Mapping[str, np.ndarray]], Any]

  @property
  def emotions(self) -> tuple[str, ...]:
    return tuple(self.config.data.emotions)

  @property
  def audio_features(self) -> tuple[str, ...]:
    if self.config.model.name != "av_leader_follower":
      return ()
    return tuple(name for name, _ in self.config.model.audio_features)


def _check_same_model(
  saved: Mapping[str, Any], config: Any, where: str
) -> None:
  """Raises if `config` computes something else than the checkpoint."""
  diffs = [
    k
    for k in checkpoints.config_differences(
      saved, config, ignore=_IGNORED_MODEL_KEYS
    )
    if any(k == p or k.startswith(p + ".") for p in _MODEL_KEYS)
  ]
  if diffs:
    a = traverse_util.flatten_dict(saved, sep=".")
    b = traverse_util.flatten_dict(checkpoints.config_to_json(config), sep=".")
    lines = "; ".join(
      f"{k}: checkpoint {a.get(k, '<missing>')!r}, given "
      f"{b.get(k, '<missing>')!r}"
      for k in diffs
    )
    raise ValueError(
      f"--config does not match the checkpoint in {where}: "
      f"{lines}. Predict without --config (the checkpoint "
      "carries its own) or with the run's config."
    )


def preprocess_settings(
  config: Any, metadata: Mapping[str, Any], workdir: str
) -> Any:
  """The feature-cache settings the run was trained with.

  Looked up in the checkpoint metadata (`preprocess_settings`), else in the
  run's cache manifest, else derived from the config's
  `data.synthetic` / `data.preprocess` options (as `prepare` does).
  """
  # pylint: disable=g-import-not-at-top
  from affjax.data import prepare
  from affjax.data.preprocess import cache

  # pylint: enable=g-import-not-at-top
  fields = {f.name for f in dataclasses.fields(cache.PreprocessSettings)}

  def build(values, where):
    unknown = sorted(set(values) - fields)
    if unknown:
      raise ValueError(f"{where}: unknown preprocessing settings {unknown}")
    return cache.PreprocessSettings(**values)

  if metadata.get("preprocess_settings"):
    return build(
      dict(metadata["preprocess_settings"]), f"checkpoint metadata of {workdir}"
    )
  manifest = os.path.join(
    prepare.resolve_paths(config.data, workdir).cache_dir, cache.MANIFEST
  )
  if os.path.isfile(manifest):
    return build(dict(cache.read_json(manifest)["settings"]), manifest)
  _, values, _ = prepare._split_options(config.data)  # pylint: disable=protected-access
  logging.warning(
    "No preprocessing settings in the checkpoint of %s and no cache "
    "manifest at %s: using the settings its config implies (%s).",
    workdir,
    manifest,
    values,
  )
  return build(values, f"config of {workdir}")


def load_model(
  workdir: str, *, step: int | None = None, config: Any | None = None
) -> LoadedModel:
  """Restores the best (or a given) checkpoint of a run on one device.

  Args:
    workdir: the run directory (holding `checkpoints/`).
    step: a checkpoint step; None = the best (else the latest).
    config: optional config to check against the checkpoint's (model keys
      only); the checkpoint's own config is what is used.

  Raises:
    FileNotFoundError: no checkpoint directory or no checkpoint in it.
    ValueError: `config` disagrees with the checkpoint; unsupported model.
  """
  # pylint: disable=g-import-not-at-top
  import jax
  import ml_collections

  from affjax import sharding, train_state

  # pylint: enable=g-import-not-at-top
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"workdir {workdir} does not exist")
  manager = checkpoints.create_manager(workdir, read_only=True)
  if step is None:
    step = manager.best_step()
    if step is None:
      step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(
      f"no checkpoint in {manager.directory}: train first "
      f"(python -m affjax.main --config=... --workdir={workdir})"
    )
  saved = checkpoints.restore(manager, step)
  if config is not None:
    _check_same_model(saved.config, config, manager.directory)
  cfg = ml_collections.ConfigDict(saved.config)
  if cfg.model.input != "frames":
    raise ValueError(
      f"{workdir}: config.model.input={cfg.model.input!r}; prediction on "
      "videos needs a model that reads face frames ('frames')"
    )
  stats = saved.metadata.get("feature_stats", {})
  missing = [f for f in _audio_names(cfg) if f not in stats]
  if missing:
    raise ValueError(
      f"checkpoint {step} in {manager.directory}: metadata lacks the "
      f"normalisation statistics of {missing} (feature_stats has "
      f"{sorted(stats)})"
    )
  mesh = sharding.make_mesh((("data", 1),), devices=jax.devices()[:1])
  setup = train_state.build_setup(cfg, mesh)
  state = checkpoints.restore(manager, step, setup.abstract_state).state
  variables = state.variables()
  apply = _jitted_apply(setup.model)
  return LoadedModel(
    workdir=workdir,
    step=int(step),
    config=cfg,
    metadata=dict(saved.metadata),
    settings=preprocess_settings(cfg, saved.metadata, workdir),
    apply=lambda batch: apply(variables, batch),
  )


@functools.lru_cache(maxsize=8)
def _jitted_apply(model: Any) -> Callable[..., Any]:
  """One jitted eval apply per distinct model (folds of a run share it)."""
  import jax  # pylint: disable=g-import-not-at-top

  return jax.jit(functools.partial(model.apply, train=False))


def _audio_names(cfg: Any) -> tuple[str, ...]:
  if cfg.model.name != "av_leader_follower":
    return ()
  return tuple(name for name, _ in cfg.model.audio_features)


# ----------------------------------------------------------------------------
# Audio.


def audio_features(
  path: str, names: Sequence[str], n_frames: int, fps: float, settings: Any
) -> dict[str, np.ndarray]:
  """Raw (unnormalised) audio features, `[n_frames, D]` float32 each.

  Same functions and settings as the feature cache; audio shorter than the
  video is tolerated (the last row repeats) with a warning.
  """
  # pylint: disable=g-import-not-at-top
  from affjax.data.preprocess import audio
  from affjax.data.preprocess import run as preprocess_run

  # pylint: enable=g-import-not-at-top
  unknown = [n for n in names if n not in AUDIO_FEATURES]
  if unknown:
    raise ValueError(
      f"unknown audio features {unknown}; known: {AUDIO_FEATURES}"
    )
  sr = settings.sample_rate
  wave = audio.load_audio(path, sr)
  shortfall = n_frames / fps - wave.size / sr
  if shortfall > settings.max_audio_shortfall_seconds:
    warnings.warn(
      f"{path}: the audio track ({wave.size / sr:.2f} s) is {shortfall:.2f}"
      f" s shorter than the video ({n_frames / fps:.2f} s); the last audio "
      "features are repeated to the end",
      stacklevel=2,
    )
  # Any shortfall is allowed here (warned above): a user's video is what it is.
  common = {"max_shortfall_seconds": float("inf")}
  out = {}
  for name in names:
    if name == "mfcc":
      out[name] = audio.mfcc_features(wave, sr, n_frames, fps, **common)
    elif name == "egemaps":
      out[name] = audio.egemaps_features(
        wave,
        sr,
        n_frames,
        fps,
        feature_set=settings.egemaps_feature_set,
        **common,
      )
    else:
      # The preprocessing's own VGGish weights for these settings.
      params = preprocess_run._vggish_params(  # pylint: disable=protected-access
        settings.vggish_model, settings.vggish_checkpoint
      )
      out[name] = audio.vggish_features(
        wave,
        sr,
        n_frames,
        fps,
        params=params,
        hop_seconds=settings.vggish_hop_seconds,
        **common,
      )
  return out


# ----------------------------------------------------------------------------
# Inference.


def model_inputs(
  model: LoadedModel,
  faces: np.ndarray,
  raw_audio: Mapping[str, np.ndarray] | None,
) -> dict[str, np.ndarray]:
  """Per-frame model inputs `[T, ...]`, transformed as the eval pipeline.

  Args:
    model: the restored run.
    faces: uint8 `[T, S, S, 3]` cache-like face frames.
    raw_audio: unnormalised audio features, or None (no audio track: the
      model's audio inputs are zeros, i.e. the training mean).

  Returns:
    `frames` float32 `[T, C, C, 3]` (centre crop, (x/255 - 0.5)/0.5) and the
    model's audio features float32 `[T, D]` ((x - mean) / std).
  """
  crop = int(model.config.data.crop_size)
  size = faces.shape[1]
  off = int(np.round((size - crop) / 2))  # torchvision CenterCrop offset
  frames = faces[:, off : off + crop, off : off + crop].astype(np.float32)
  inputs = {"frames": (frames / 255.0 - 0.5) / 0.5}
  dims = dict(model.config.model.audio_features)
  for name in model.audio_features:
    if raw_audio is None:
      inputs[name] = np.zeros((len(faces), int(dims[name])), np.float32)
      continue
    stats = model.metadata["feature_stats"][name]
    mean = np.asarray(stats["mean"], np.float32)
    std = np.asarray(stats["std"], np.float32)
    inputs[name] = ((raw_audio[name] - mean) / std).astype(np.float32)
  return inputs


def predict_windows(
  model: LoadedModel, inputs: Mapping[str, np.ndarray], batch_size: int = 2
) -> np.ndarray:
  """Windowed inference over one video, overlaps averaged.

  Windows follow `affjax.data.stitch.window_starts` (as evaluation); a video
  shorter than a window is padded like the pipeline pads (frames -1, audio
  0) and the padding's outputs are ignored.

  Returns:
    float64 `[T, n_outputs]`, before the time-delay shift.
  """
  from affjax.data import stitch  # pylint: disable=g-import-not-at-top

  length = len(inputs["frames"])
  window = int(model.config.data.window_length)
  hop = int(model.config.data.hop_length)
  starts = stitch.window_starts(length, window, hop)
  pad_value = {"frames": -1.0}
  windows = {
    k: np.full(
      (len(starts), window, *v.shape[1:]), pad_value.get(k, 0.0), np.float32
    )
    for k, v in inputs.items()
  }
  frame_index = np.full((len(starts), window), -1, np.int64)
  for i, s in enumerate(starts):
    n = min(window, length - s)
    for k, v in inputs.items():
      windows[k][i, :n] = v[s : s + n]
    frame_index[i, :n] = np.arange(s, s + n)
  batch_size = max(1, min(int(batch_size), len(starts)))
  outputs = []
  for lo in range(0, len(starts), batch_size):
    batch = {}
    for k, v in windows.items():
      part = v[lo : lo + batch_size]
      if len(part) < batch_size:  # one compiled shape
        part = np.concatenate(
          [
            part,
            np.zeros((batch_size - len(part), *part.shape[1:]), part.dtype),
          ]
        )
      batch[k] = part
    outputs.append(np.asarray(model.apply(batch), np.float32))
  preds = np.concatenate(outputs)[: len(starts)]
  return stitch.stitch_windows(
    preds, np.zeros(len(starts), np.int64), frame_index, [length]
  )[0]


def shift_time_delay(pred: np.ndarray, delay: int) -> np.ndarray:
  """Output at t estimates frame t + delay: `out[j] = pred[max(j - d, 0)]`."""
  if delay == 0:
    return pred
  idx = np.maximum(np.arange(len(pred)) - int(delay), 0)
  return pred[idx]


@dataclasses.dataclass
class Prediction:
  """Per-frame predictions of one video.

  Attributes:
    video: the video path.
    fps: frame rate used for `time_s`.
    emotions: names of the columns of `values`.
    values: float32 `[T, n_emotions]`, in [-1, 1].
    face_found: bool `[T]`.
    used_audio: whether audio features were computed (False: no audio
      track, or visual-only models).
    models: `[{"workdir", "step"}]` of the runs merged.
    paths: files written by `write_outputs` (name -> path).
  """

  video: str
  fps: float
  emotions: tuple[str, ...]
  values: np.ndarray
  face_found: np.ndarray
  used_audio: bool
  models: list[dict[str, Any]]
  width: int = 0
  height: int = 0
  paths: dict[str, str] = dataclasses.field(default_factory=dict)

  @property
  def n_frames(self) -> int:
    return len(self.face_found)

  @property
  def time_s(self) -> np.ndarray:
    """`[T]` float64 seconds: frame i is at i / fps."""
    return np.arange(self.n_frames) / self.fps


def load_models(
  workdirs: str | Sequence[str],
  *,
  step: int | None = None,
  config: Any | None = None,
) -> list[LoadedModel]:
  """Restores one run or several fold runs (all predicting the same emotions).

  Args:
    workdirs: a directory, a comma-separated list, or a sequence.
    step: checkpoint step (only with a single workdir); None = best.
    config: optional config to check the checkpoints against.
  """
  if isinstance(workdirs, str):
    workdirs = [w for w in workdirs.split(",") if w]
  workdirs = list(workdirs)
  if not workdirs:
    raise ValueError("no workdir given")
  if step is not None and len(workdirs) > 1:
    raise ValueError("step can only be given with a single workdir")
  models = [load_model(w, step=step, config=config) for w in workdirs]
  emotions = {m.emotions for m in models}
  if len(emotions) > 1:
    raise ValueError(
      "the runs predict different emotions and cannot be merged: "
      + "; ".join(f"{m.workdir}: {m.emotions}" for m in models)
    )
  return models


def predict_video(
  video: str,
  models: str | Sequence[str] | Sequence[LoadedModel],
  *,
  allow_missing_audio: bool = True,
  detector: face_lib.HaarFaceDetector | None = None,
  track_settings: face_lib.TrackSettings | None = None,
  batch_size: int = 2,
) -> Prediction:
  """Predicts per-frame emotions of a video (nothing is written).

  Args:
    video: path of the video file.
    models: restored runs (`load_models`) or their workdir(s).
    allow_missing_audio: for audio-visual models and a video without an
      audio track: True feeds the training mean as audio (with a warning),
      False raises.
    detector: face detector (default: `face.HaarFaceDetector()`).
    track_settings: face tracking settings.
    batch_size: windows per model call.

  Raises:
    FileNotFoundError: the video or a checkpoint is missing.
    ValueError: not a video, zero-length video, audio needed but missing
      (with `allow_missing_audio=False`).
  """
  video = os.fspath(video)
  fps, has_audio = probe(video)  # fails fast on a bad file, before restoring
  if not models or isinstance(models, str) or isinstance(models[0], str):
    models = load_models(models)
  needed = sorted({f for m in models for f in m.audio_features})
  if needed and not has_audio:
    if not allow_missing_audio:
      raise ValueError(
        f"{video} has no audio track but the model(s) read {needed}; "
        "pass allow_missing_audio=True to predict from the face alone "
        "(audio inputs set to the training mean)"
      )
    warnings.warn(
      f"{video} has no audio track: the audio inputs {needed} of the "
      "audio-visual model are set to the training mean; the predictions "
      "rely on the face alone",
      stacklevel=2,
    )
  sizes = {int(m.settings.frame_size) for m in models}
  if len(sizes) > 1:
    raise ValueError(f"the runs use different cached frame sizes {sizes}")
  faces = extract_faces(
    video, detector=detector, track_settings=track_settings, size=sizes.pop()
  )
  n_frames = len(faces.found)
  logging.info(
    "%s: %d frames at %.3f fps, face found in %d.",
    video,
    n_frames,
    fps,
    int(faces.found.sum()),
  )
  # Features computed once per distinct preprocessing settings.
  audio_cache: dict[Any, dict[str, np.ndarray]] = {}
  preds = []
  for m in models:
    raw = None
    if m.audio_features and has_audio:
      key = m.settings
      if key not in audio_cache:
        names = sorted(
          {f for o in models if o.settings == key for f in o.audio_features}
        )
        audio_cache[key] = audio_features(video, names, n_frames, fps, key)
      raw = audio_cache[key]
    inputs = model_inputs(m, faces.frames, raw)
    pred = predict_windows(m, inputs, batch_size)
    preds.append(shift_time_delay(pred, int(m.config.data.time_delay)))
  stacked = np.stack(preds).astype(np.float32)
  if len(preds) > 1 and n_frames >= 2:
    from affjax import ensemble  # pylint: disable=g-import-not-at-top

    values = np.asarray(ensemble.merge_folds(stacked), np.float32)
  else:
    values = np.clip(stacked.mean(0), -1.0, 1.0)
  return Prediction(
    video=os.path.abspath(video),
    fps=fps,
    emotions=models[0].emotions,
    values=values,
    face_found=faces.found,
    used_audio=bool(needed) and has_audio,
    models=[{"workdir": m.workdir, "step": m.step} for m in models],
    width=faces.width,
    height=faces.height,
  )


# ----------------------------------------------------------------------------
# Outputs.


def _atomic_write(
  path: str, write: Callable[[Any], None], mode: str = "w"
) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
  try:
    with os.fdopen(fd, mode) as f:
      write(f)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def csv_text(prediction: Prediction) -> str:
  """The CSV: `frame,time_s,<emotions>,face_found`, one row per frame."""
  header = ["frame", "time_s", *prediction.emotions, "face_found"]
  lines = [",".join(header)]
  for i, (t, row, found) in enumerate(
    zip(prediction.time_s, prediction.values, prediction.face_found)
  ):
    values = ",".join(f"{v:.4f}" for v in row)
    lines.append(f"{i},{t:.4f},{values},{'true' if found else 'false'}")
  return "\n".join(lines) + "\n"


def read_csv(path: str) -> tuple[list[str], np.ndarray, np.ndarray]:
  """Reads a prediction CSV: (emotions, values `[T, E]`, face_found `[T]`)."""
  with open(path) as f:
    header = f.readline().strip().split(",")
    rows = [line.strip().split(",") for line in f if line.strip()]
  if header[:2] != ["frame", "time_s"] or header[-1] != "face_found":
    raise ValueError(f"{path}: not a prediction CSV (header {header})")
  values = np.array(
    [[float(x) for x in r[2:-1]] for r in rows], np.float64
  ).reshape(len(rows), len(header) - 3)
  found = np.array([r[-1] == "true" for r in rows], bool)
  return header[2:-1], values, found


def plot(path: str, prediction: Prediction) -> None:
  """PNG of the predicted curves over time, face-less spans shaded."""
  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  # pylint: enable=g-import-not-at-top
  fig = Figure(figsize=(10, 3.2))
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  t = prediction.time_s
  colours = {"valence": "tab:blue", "arousal": "tab:red"}
  for j, emotion in enumerate(prediction.emotions):
    ax.plot(
      t,
      prediction.values[:, j],
      lw=1.0,
      label=emotion,
      color=colours.get(emotion),
    )
  missing = ~prediction.face_found
  if missing.any():
    edges = np.flatnonzero(np.diff(np.concatenate([[0], missing, [0]])))
    step = 1.0 / prediction.fps  # seconds per frame
    for k, (a, b) in enumerate(zip(edges[::2], edges[1::2])):
      ax.axvspan(
        a * step,
        b * step,
        color="0.85",
        lw=0,
        label="no face" if k == 0 else None,
      )
  ax.set_ylim(-1.05, 1.05)
  ax.set_xlim(0, max(float(t[-1]), 1.0 / prediction.fps))
  ax.axhline(0, color="0.6", lw=0.5)
  ax.set_xlabel("time (s)")
  ax.set_title(
    f"{os.path.basename(prediction.video)}: {len(prediction.models)} model(s)",
    fontsize=9,
  )
  ax.legend(loc="upper right", fontsize=8, framealpha=0.4)
  fig.tight_layout()
  _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90), "wb")


def write_outputs(
  prediction: Prediction, out_dir: str, detector_settings: Any = None
) -> dict[str, str]:
  """Writes `<stem>.csv`, `<stem>.png` and `<stem>.json` into `out_dir`."""
  os.makedirs(out_dir, exist_ok=True)
  stem = os.path.splitext(os.path.basename(prediction.video))[0]
  paths = {
    k: os.path.join(out_dir, f"{stem}.{k}") for k in ("csv", "png", "json")
  }
  text = csv_text(prediction)
  _atomic_write(paths["csv"], lambda f: f.write(text))
  plot(paths["png"], prediction)
  summary = {
    "video": prediction.video,
    "n_frames": prediction.n_frames,
    "fps": prediction.fps,
    "width": prediction.width,
    "height": prediction.height,
    "emotions": list(prediction.emotions),
    "frames_with_face": int(prediction.face_found.sum()),
    "used_audio": prediction.used_audio,
    "models": prediction.models,
    "detector": dataclasses.asdict(
      detector_settings or face_lib.DetectorSettings()
    ),
    "outputs": {k: os.path.basename(p) for k, p in paths.items()},
  }
  _atomic_write(paths["json"], lambda f: json.dump(summary, f, indent=1))
  prediction.paths = paths
  return paths


def run(
  workdir: str | Sequence[str],
  video: str,
  out_dir: str | None = None,
  *,
  config: Any | None = None,
  step: int | None = None,
  allow_missing_audio: bool = True,
  batch_size: int = 2,
) -> Prediction:
  """`--mode=predict`: restore, predict, write CSV + PNG + JSON.

  Args:
    workdir: run directory, or several fold runs (sequence or
      comma-separated) merged by CCC centering.
    video: the video file.
    out_dir: output directory (default `<first workdir>/predict`).
    config: optional; checked against the checkpoint (model keys only).
    step: checkpoint step of a single run (default: the best).
    allow_missing_audio: see `predict_video`.
    batch_size: windows per model call.

  Returns:
    The prediction, with `paths` of the files written.
  """
  video = os.fspath(video)
  probe(video)  # a bad video fails before any checkpoint is restored
  models = load_models(workdir, step=step, config=config)
  detector = face_lib.HaarFaceDetector()
  prediction = predict_video(
    video,
    models,
    allow_missing_audio=allow_missing_audio,
    detector=detector,
    batch_size=batch_size,
  )
  out_dir = out_dir or os.path.join(models[0].workdir, "predict")
  write_outputs(prediction, out_dir, detector.settings)
  logging.info("Wrote %s", ", ".join(prediction.paths.values()))
  return prediction
