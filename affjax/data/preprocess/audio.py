"""Audio track loading and frame-aligned audio features (MFCC, eGeMAPS, VGGish).

Every feature function returns one row per *video* frame, so audio features
line up with the face frames and labels of a trial. The alignment mirrors the
reference preprocessing (sucv/ABAW2 `preprocessing.py`):

* MFCC and eGeMAPS are openSMILE low-level descriptors on a 10 ms grid (row k
  is the frame starting at k * 10 ms). Video frame i (at time i / fps) takes
  row `round(i / fps / 0.01)` (Python/numpy round-half-to-even, as the
  reference), clamped to the last row.
* VGGish: the reference computed one 0.96 s example starting at every video
  frame (example hop 1 / fps) on the waveform padded by 1 s of edge values,
  and video frame i took embedding i. Here examples are computed on a grid
  of `hop_seconds` (a coarser grid keeps CPU cost low) and frame i takes the
  example whose start is nearest to i / fps; `hop_seconds=None` gives the
  reference's exact one-example-per-frame grid.

Audio that is shorter than the video by at most one video frame is used as
is (container durations are rounded); a shortfall up to
`max_shortfall_seconds` is tolerated with a warning (trailing frames reuse
the last feature row, as the reference does); a larger one raises.

openSMILE, PyAV and JAX are imported lazily so this module imports cheaply.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from affjax.data.preprocess import opensmile_preload

# openSMILE's MFCC/eGeMAPS frame step (s).
LLD_STEP_SECONDS = 0.01
# Largest audio-shorter-than-video gap handled by repeating the last row.
MAX_SHORTFALL_SECONDS = 1.0
# VGGish example grid used when none is given: 0.48 s keeps a 30 s clip at
# ~63 examples (~1 TFLOP less than one example per video frame); see
# `vggish_features`.
DEFAULT_VGGISH_HOP_SECONDS = 0.48
MFCC_DIM = 39
EGEMAPS_DIM = 23
VGGISH_DIM = 128
_MFCC_CONFIG = "mfcc_dd.conf"
# The reference used openSMILE 3.0's eGeMAPSv01a LLD CSV, columns 2..24 (all
# 23 LLDs after `name` and `frameTime`). v02 adds F2/F3 bandwidths; dropping
# them gives the same 23 names in the same order.
EGEMAPS_COLUMNS = (
  "Loudness_sma3",
  "alphaRatio_sma3",
  "hammarbergIndex_sma3",
  "slope0-500_sma3",
  "slope500-1500_sma3",
  "spectralFlux_sma3",
  "mfcc1_sma3",
  "mfcc2_sma3",
  "mfcc3_sma3",
  "mfcc4_sma3",
  "F0semitoneFrom27.5Hz_sma3nz",
  "jitterLocal_sma3nz",
  "shimmerLocaldB_sma3nz",
  "HNRdBACF_sma3nz",
  "logRelF0-H1-H2_sma3nz",
  "logRelF0-H1-A3_sma3nz",
  "F1frequency_sma3nz",
  "F1bandwidth_sma3nz",
  "F1amplitudeLogRelF0_sma3nz",
  "F2frequency_sma3nz",
  "F2amplitudeLogRelF0_sma3nz",
  "F3frequency_sma3nz",
  "F3amplitudeLogRelF0_sma3nz",
)


def load_audio(
  video_path: str | os.PathLike, sample_rate: int = 16000
) -> np.ndarray:
  """Decodes the first audio stream of a media file to mono float32.

  Args:
    video_path: video (or audio) file readable by FFmpeg through PyAV.
    sample_rate: output rate in Hz; FFmpeg's resampler converts the stream.

  Returns:
    `[n_samples]` float32 waveform, nominally in [-1, 1].

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: the file cannot be decoded, has no audio stream, or yields no
      samples. The message names the file.
  """
  import av  # pylint: disable=g-import-not-at-top

  path = os.fspath(video_path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Audio source {path!r} does not exist.")
  try:
    container = av.open(path)
  except (av.FFmpegError, OSError) as e:
    raise ValueError(f"Cannot open {path!r} as a media file: {e}") from e
  chunks = []
  with container:
    if not container.streams.audio:
      raise ValueError(
        f"{path!r} has no audio stream (streams found: "
        f"{[s.type for s in container.streams]})."
      )
    stream = container.streams.audio[0]
    resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
    try:
      for frame in container.decode(stream):
        for out in resampler.resample(frame):
          chunks.append(out.to_ndarray().reshape(-1))
      for out in resampler.resample(None):  # Flush buffered samples.
        chunks.append(out.to_ndarray().reshape(-1))
    except (av.FFmpegError, OSError) as e:
      raise ValueError(
        f"Decoding the audio stream of {path!r} failed: {e}"
      ) from e
  if not chunks or not sum(c.size for c in chunks):
    raise ValueError(f"The audio stream of {path!r} contains no samples.")
  return np.concatenate(chunks).astype(np.float32, copy=False)


def _check_inputs(
  wave: np.ndarray, sr: int, n_frames: int, fps: float
) -> np.ndarray:
  wave = np.asarray(wave)
  if wave.ndim != 1:
    raise ValueError(f"wave must be mono [n_samples], got shape {wave.shape}.")
  if n_frames < 0 or fps <= 0 or sr <= 0:
    raise ValueError(
      f"Need n_frames >= 0, fps > 0, sr > 0; got n_frames={n_frames}, "
      f"fps={fps}, sr={sr}."
    )
  return wave.astype(np.float32, copy=False)


def check_duration(
  n_samples: int,
  sr: int,
  n_frames: int,
  fps: float,
  max_shortfall_seconds: float = MAX_SHORTFALL_SECONDS,
) -> float:
  """Checks that audio covers the video; returns the shortfall in seconds.

  Raises:
    ValueError: the audio is shorter than the video by more than
      `max_shortfall_seconds`.
  """
  shortfall = n_frames / fps - n_samples / sr
  if shortfall > max_shortfall_seconds:
    raise ValueError(
      f"Audio is {n_samples / sr:.3f} s long but the video has {n_frames} "
      f"frames at {fps} fps ({n_frames / fps:.3f} s): {shortfall:.3f} s "
      f"missing, more than the tolerated {max_shortfall_seconds} s."
    )
  if shortfall > 1.0 / fps + 1e-6:  # One frame of container rounding is ok.
    warnings.warn(
      f"Audio ({n_samples / sr:.3f} s) is {shortfall:.3f} s shorter than "
      f"the video ({n_frames} frames at {fps} fps); the last feature row is "
      "repeated for the uncovered frames.",
      stacklevel=3,
    )
  return shortfall


def frame_rows(
  n_frames: int, fps: float, step_seconds: float, n_rows: int
) -> np.ndarray:
  """Feature-row index for each video frame, `[n_frames]` int.

  Frame i (time i / fps) takes row `round(i / fps / step_seconds)`, clamped
  to `n_rows - 1`; the expression and the rounding mode follow the reference.
  """
  if n_rows <= 0:
    raise ValueError(f"No feature rows to align to {n_frames} video frames.")
  rows = np.round(np.arange(n_frames) * 1 / fps / step_seconds)
  return np.minimum(rows.astype(np.int64), n_rows - 1)


def _to_int16_range(wave: np.ndarray) -> np.ndarray:
  # opensmile scales by 32768 and casts to int16 without clipping, so values
  # at or beyond full scale would wrap around; clip them first.
  return np.clip(wave, -1.0, 32767.0 / 32768.0).astype(np.float32)


@functools.cache
def _smile(feature_set: str, level: str) -> Any:
  opensmile_preload.ensure_safe()
  import opensmile  # pylint: disable=g-import-not-at-top

  with warnings.catch_warnings():
    # eGeMAPSv01a is deprecated upstream but is the reference's feature set.
    warnings.simplefilter("ignore", UserWarning)
    if feature_set == "mfcc":
      conf = importlib.resources.files(__package__) / _MFCC_CONFIG
      with importlib.resources.as_file(conf) as conf_path:
        return opensmile.Smile(feature_set=str(conf_path), feature_level=level)
    return opensmile.Smile(
      feature_set=getattr(opensmile.FeatureSet, feature_set),
      feature_level=getattr(opensmile.FeatureLevel, level),
    )


def _lld_frames(
  values: np.ndarray,
  name: str,
  wave_len: int,
  sr: int,
  n_frames: int,
  fps: float,
) -> np.ndarray:
  if values.shape[0] == 0 or not np.isfinite(values).all():
    raise ValueError(
      f"openSMILE {name} produced no usable rows for {wave_len} samples at "
      f"{sr} Hz (audio too short or invalid)."
    )
  rows = frame_rows(n_frames, fps, LLD_STEP_SECONDS, values.shape[0])
  return values[rows].astype(np.float32)


def mfcc_features(
  wave: np.ndarray,
  sr: int,
  n_frames: int,
  fps: float,
  *,
  max_shortfall_seconds: float = MAX_SHORTFALL_SECONDS,
) -> np.ndarray:
  """39-d MFCC + delta + delta-delta per video frame (openSMILE).

  openSMILE's HTK-compatible MFCC output puts c0 last, like the reference's
  MFCC12_0_D_A CSV, so the columns are `[c1..c12, c0, d1..d12, d0,
  dd1..dd12, dd0]`. 25 ms Hamming frames every 10 ms, 26 mel bands 0-8 kHz,
  lifter 22, regression window 2 (see `mfcc_dd.conf`).

  Args:
    wave: `[n_samples]` mono waveform in [-1, 1].
    sr: sample rate in Hz; must be 16000 (the mel bands reach 8 kHz).
    n_frames: number of video frames to produce rows for.
    fps: video frame rate.
    max_shortfall_seconds: see module docstring.

  Returns:
    `[n_frames, 39]` float32.
  """
  wave = _check_inputs(wave, sr, n_frames, fps)
  if sr != 16000:
    raise ValueError(f"mfcc_features needs 16000 Hz audio, got {sr} Hz.")
  check_duration(wave.size, sr, n_frames, fps, max_shortfall_seconds)
  if n_frames == 0:
    return np.zeros((0, MFCC_DIM), np.float32)
  df = _smile("mfcc", "lld").process_signal(_to_int16_range(wave), sr)
  values = df.to_numpy()
  if values.shape[1] != MFCC_DIM:
    raise ValueError(
      f"MFCC config gave {values.shape[1]} columns, expected {MFCC_DIM}."
    )
  return _lld_frames(values, "MFCC", wave.size, sr, n_frames, fps)


def egemaps_features(
  wave: np.ndarray,
  sr: int,
  n_frames: int,
  fps: float,
  *,
  feature_set: str = "eGeMAPSv01a",
  max_shortfall_seconds: float = MAX_SHORTFALL_SECONDS,
) -> np.ndarray:
  """23 eGeMAPS low-level descriptors per video frame (openSMILE).

  Columns are `EGEMAPS_COLUMNS` (the full eGeMAPSv01a LLD set, which the
  reference used). With `feature_set='eGeMAPSv02'` the same 23 columns are
  taken from v02's 25 (F2/F3 bandwidths dropped).

  Args:
    wave: `[n_samples]` mono waveform in [-1, 1].
    sr: sample rate in Hz.
    n_frames: number of video frames to produce rows for.
    fps: video frame rate.
    feature_set: 'eGeMAPSv01a' (reference) or 'eGeMAPSv02'.
    max_shortfall_seconds: see module docstring.

  Returns:
    `[n_frames, 23]` float32.
  """
  if feature_set not in ("eGeMAPSv01a", "eGeMAPSv02"):
    raise ValueError(
      f"feature_set must be eGeMAPSv01a or eGeMAPSv02, got {feature_set!r}."
    )
  wave = _check_inputs(wave, sr, n_frames, fps)
  check_duration(wave.size, sr, n_frames, fps, max_shortfall_seconds)
  if n_frames == 0:
    return np.zeros((0, EGEMAPS_DIM), np.float32)
  smile = _smile(feature_set, "LowLevelDescriptors")
  df = smile.process_signal(_to_int16_range(wave), sr)
  missing = [c for c in EGEMAPS_COLUMNS if c not in df.columns]
  if missing:
    raise ValueError(f"openSMILE {feature_set} output lacks columns {missing}.")
  values = df[list(EGEMAPS_COLUMNS)].to_numpy()
  return _lld_frames(values, feature_set, wave.size, sr, n_frames, fps)


def vggish_features(
  wave: np.ndarray,
  sr: int,
  n_frames: int,
  fps: float,
  params: Mapping[str, Any] | None = None,
  hop_seconds: float | None = DEFAULT_VGGISH_HOP_SECONDS,
  *,
  batch_size: int = 64,
  max_shortfall_seconds: float = MAX_SHORTFALL_SECONDS,
) -> np.ndarray:
  """128-d VGGish embedding per video frame (Flax VGGish, raw embedding).

  As in the reference, the waveform is padded with 1 s of its last value,
  cut into 0.96 s log-mel examples, and the embedding layer's output is used
  without PCA/quantisation. Examples start on a grid of `hop_seconds`; video
  frame i takes the example starting nearest to i / fps. Cost is ~1.7 GFLOP
  per example, i.e. `duration / hop_seconds` examples per clip.

  Args:
    wave: `[n_samples]` mono waveform in [-1, 1].
    sr: sample rate in Hz; must be 16000 (VGGish's rate).
    n_frames: number of video frames to produce rows for.
    fps: video frame rate.
    params: VGGish Flax params (e.g. from `affjax.models.vggish` converters);
      None uses the fixed-seed random weights of `vggish.default_params()`.
    hop_seconds: example grid in seconds; None → 1 / fps (the reference's
      one example per video frame, ~50x the default cost at 25 fps).
    batch_size: examples per jitted call (padded, so one compilation).
    max_shortfall_seconds: see module docstring.

  Returns:
    `[n_frames, 128]` float32.
  """
  # pylint: disable=g-import-not-at-top
  from affjax.data.preprocess import vggish_input
  from affjax.models import vggish

  # pylint: enable=g-import-not-at-top
  wave = _check_inputs(wave, sr, n_frames, fps)
  if sr != vggish_input.SAMPLE_RATE:
    raise ValueError(
      f"vggish_features needs {vggish_input.SAMPLE_RATE} Hz audio, got {sr} Hz."
    )
  check_duration(wave.size, sr, n_frames, fps, max_shortfall_seconds)
  if n_frames == 0:
    return np.zeros((0, VGGISH_DIM), np.float32)
  hop = 1.0 / fps if hop_seconds is None else float(hop_seconds)
  if hop <= 0:
    raise ValueError(f"hop_seconds must be > 0, got {hop_seconds}.")
  padded = np.pad(wave, (0, sr), mode="edge")
  examples = vggish_input.waveform_to_examples(padded, sr, hop_seconds=hop)
  if examples.shape[0] == 0:
    raise ValueError(f"{wave.size} samples give no VGGish example.")
  embeddings = vggish.embed(examples, params=params, batch_size=batch_size)
  rows = frame_rows(n_frames, fps, hop, examples.shape[0])
  return np.asarray(embeddings, np.float32)[rows]
