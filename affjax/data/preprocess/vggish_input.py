"""Waveform to VGGish log-mel examples (numpy only).

Reimplements the public VGGish front end: 16 kHz mono audio, 25 ms frames
every 10 ms with a periodic Hann window, 512-point FFT magnitude, 64 mel bands
between 125 and 7500 Hz on the HTK mel scale (triangles in mel, DC bin
dropped), `log(mel + 0.01)`, then examples of 96 consecutive frames (0.96 s).

The example hop is adjustable and may be fractional in frames, as in the
reference's variant of the framing (example k starts at frame
`round(k * hop_frames)`), so embeddings can be produced at a video frame rate
(hop 1 / fps) or any coarser grid.
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16000
STFT_WINDOW_SECONDS = 0.025
STFT_HOP_SECONDS = 0.010
NUM_MEL_BINS = 64
MEL_MIN_HZ = 125.0
MEL_MAX_HZ = 7500.0
LOG_OFFSET = 0.01
NUM_FRAMES = 96  # Log-mel frames per example: 0.96 s.
EXAMPLE_HOP_SECONDS = 0.96  # VGGish's own (non-overlapping) example hop.

# HTK mel scale: mel = 1127 ln(1 + f / 700).
_MEL_BREAK_HZ = 700.0
_MEL_Q = 1127.0


def periodic_hann(length: int) -> np.ndarray:
  """`[length]` Hann window of period `length` (last zero omitted)."""
  return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(length) / length)


def hertz_to_mel(hertz: np.ndarray | float) -> np.ndarray:
  """HTK mel value of frequencies in Hz."""
  return _MEL_Q * np.log1p(np.asarray(hertz, np.float64) / _MEL_BREAK_HZ)


def mel_matrix(
  num_mel_bins: int = NUM_MEL_BINS,
  num_spectrogram_bins: int = 257,
  sample_rate: int = SAMPLE_RATE,
  lower_hz: float = MEL_MIN_HZ,
  upper_hz: float = MEL_MAX_HZ,
) -> np.ndarray:
  """`[num_spectrogram_bins, num_mel_bins]` triangular mel weights.

  Band b spans mel edges b..b+2 of `num_mel_bins + 2` points evenly spaced in
  mel between `lower_hz` and `upper_hz`, peaking (weight 1) at edge b+1. The
  DC bin gets no weight.
  """
  nyquist = sample_rate / 2.0
  if not 0.0 <= lower_hz < upper_hz <= nyquist:
    raise ValueError(
      f"Need 0 <= lower_hz < upper_hz <= {nyquist} Hz, got "
      f"lower_hz={lower_hz}, upper_hz={upper_hz}."
    )
  bins_mel = hertz_to_mel(np.linspace(0.0, nyquist, num_spectrogram_bins))
  edges = np.linspace(
    hertz_to_mel(lower_hz), hertz_to_mel(upper_hz), num_mel_bins + 2
  )
  lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
  rising = (bins_mel[:, None] - lower) / (centre - lower)
  falling = (upper - bins_mel[:, None]) / (upper - centre)
  weights = np.maximum(0.0, np.minimum(rising, falling))
  weights[0, :] = 0.0
  return weights


def log_mel_spectrogram(
  wave: np.ndarray, sample_rate: int = SAMPLE_RATE
) -> np.ndarray:
  """`[n_frames, 64]` log mel magnitudes, one row per 10 ms frame.

  Only complete 25 ms frames are used: n_frames = 1 + (n - 400) // 160 at
  16 kHz (0 when shorter than one frame).
  """
  wave = np.asarray(wave, np.float64)
  window = round(sample_rate * STFT_WINDOW_SECONDS)
  hop = round(sample_rate * STFT_HOP_SECONDS)
  fft_length = 2 ** int(np.ceil(np.log2(window)))
  n_frames = 1 + (wave.size - window) // hop if wave.size >= window else 0
  if n_frames == 0:
    return np.zeros((0, NUM_MEL_BINS), np.float64)
  frames = np.lib.stride_tricks.as_strided(
    wave,
    shape=(n_frames, window),
    strides=(wave.strides[0] * hop, wave.strides[0]),
    writeable=False,
  )
  magnitude = np.abs(np.fft.rfft(frames * periodic_hann(window), fft_length))
  mel = magnitude @ mel_matrix(
    num_spectrogram_bins=magnitude.shape[1], sample_rate=sample_rate
  )
  return np.log(mel + LOG_OFFSET)


def frame_examples(
  log_mel: np.ndarray, hop_frames: float, num_frames: int = NUM_FRAMES
) -> np.ndarray:
  """Cuts `[n, bands]` into `[n_examples, num_frames, bands]` examples.

  Example k starts at frame `round(k * hop_frames)` (half to even); only
  complete examples are kept: n_examples = 1 + floor((n - num_frames) /
  hop_frames), or 0 when n < num_frames.
  """
  if hop_frames <= 0:
    raise ValueError(f"hop_frames must be > 0, got {hop_frames}.")
  n = log_mel.shape[0]
  if n < num_frames:
    return np.zeros((0, num_frames) + log_mel.shape[1:], log_mel.dtype)
  n_examples = 1 + int(np.floor((n - num_frames) / hop_frames))
  starts = np.round(np.arange(n_examples) * hop_frames).astype(np.int64)
  return log_mel[starts[:, None] + np.arange(num_frames)]


def waveform_to_examples(
  wave: np.ndarray,
  sample_rate: int = SAMPLE_RATE,
  hop_seconds: float = EXAMPLE_HOP_SECONDS,
) -> np.ndarray:
  """Waveform to VGGish input examples.

  Args:
    wave: `[n_samples]` mono or `[n_samples, channels]` (averaged) audio,
      nominally in [-1, 1].
    sample_rate: must be 16000 Hz (no resampler here; decode at 16 kHz).
    hop_seconds: start-to-start distance of examples in seconds (0.96 =
      VGGish's non-overlapping examples; 1 / fps = one per video frame).

  Returns:
    `[n_examples, 96, 64]` float32 log-mel patches; example k covers
    [t_k, t_k + 0.96 s) with t_k = round(k * hop_seconds * 100) / 100 s.
  """
  wave = np.asarray(wave)
  if wave.ndim == 2:
    wave = wave.mean(axis=1)
  if wave.ndim != 1:
    raise ValueError(f"wave must be [n] or [n, channels], got {wave.shape}.")
  if sample_rate != SAMPLE_RATE:
    raise ValueError(
      f"VGGish needs {SAMPLE_RATE} Hz audio, got {sample_rate} Hz."
    )
  log_mel = log_mel_spectrogram(wave, sample_rate)
  # Multiply by the frame rate (as the reference does) rather than divide by
  # the hop, so 0.96 s gives exactly 96.0 frames.
  examples = frame_examples(log_mel, hop_seconds * (1.0 / STFT_HOP_SECONDS))
  return examples.astype(np.float32)
