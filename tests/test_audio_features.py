"""Tests for affjax.data.preprocess.audio: decoding, MFCC, eGeMAPS, VGGish."""

import warnings

import av
import numpy as np
import pytest

from affjax.data.preprocess import audio, vggish_input
from affjax.models import vggish

SR = 16000


def _tone(freq, seconds, amp=0.3, sr=SR):
  t = np.arange(round(seconds * sr)) / sr
  return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _write_video(
  path,
  *,
  seconds=1.0,
  fps=25,
  audio_hz=440.0,
  audio_rate=44100,
  with_audio=True,
):
  """Writes a small mp4 (64x48 gray frames, optional stereo AAC tone)."""
  with av.open(str(path), "w") as out:
    vs = out.add_stream("libx264", rate=fps)
    vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
    if with_audio:
      aus = out.add_stream("aac", rate=audio_rate, layout="stereo")
    n_video = round(seconds * fps)
    for i in range(n_video):
      img = np.full((48, 64, 3), (i * 5) % 255, np.uint8)
      frame = av.VideoFrame.from_ndarray(img, format="rgb24")
      out.mux(vs.encode(frame))
    out.mux(vs.encode(None))
    if with_audio:
      t = np.arange(int(seconds * audio_rate)) / audio_rate
      x = (0.5 * np.sin(2 * np.pi * audio_hz * t)).astype(np.float32)
      block = 1024
      for start in range(0, x.size, block):
        chunk = np.stack([x[start : start + block]] * 2)
        frame = av.AudioFrame.from_ndarray(
          np.ascontiguousarray(chunk), format="fltp", layout="stereo"
        )
        frame.sample_rate = audio_rate
        frame.pts = start
        out.mux(aus.encode(frame))
      out.mux(aus.encode(None))


def _htk_mfcc(wave):
  """Independent numpy HTK MFCC_0 (c0..c12), 25 ms / 10 ms, 26 bands."""
  x = np.round(wave.astype(np.float64) * 32768)
  n, hop = 400, 160
  frames = np.stack(
    [x[i * hop : i * hop + n] for i in range(1 + (x.size - n) // hop)]
  )
  pe = frames.copy()
  pe[:, 1:] -= 0.97 * frames[:, :-1]
  pe[:, 0] *= 1 - 0.97
  window = 0.54 - 0.46 * np.cos(2 * np.pi * np.arange(n) / (n - 1))
  power = np.abs(np.fft.rfft(pe * window, 512)) ** 2
  mel = lambda f: 1127 * np.log(1 + f / 700)
  bins = mel(np.arange(257) * SR / 512)
  edges = np.linspace(mel(0), mel(8000), 28)
  fb = np.zeros((257, 26))
  for j in range(26):
    lo, c, hi = edges[j : j + 3]
    fb[:, j] = np.maximum(
      0, np.minimum((bins - lo) / (c - lo), (hi - bins) / (hi - c))
    )
  fb[0] = 0
  logmel = np.log(np.maximum(power @ fb, 1e-10))
  i = np.arange(13)[:, None]
  j = np.arange(1, 27)[None]
  dct = np.sqrt(2 / 26) * np.cos(np.pi * i * (j - 0.5) / 26)
  cep = logmel @ dct.T
  return cep * (1 + 11 * np.sin(np.pi * np.arange(13) / 22))


def _regression(x):
  """HTK delta with window 2, edges repeated."""
  p = np.pad(x, ((2, 2), (0, 0)), mode="edge")
  t = x.shape[0]
  return (
    sum(k * (p[2 + k : 2 + k + t] - p[2 - k : 2 - k + t]) for k in (1, 2))
    / 10.0
  )


def _chirp(seconds):
  t = np.arange(int(seconds * SR)) / SR
  return (0.3 * np.sin(2 * np.pi * 150 * t * (1 + 0.1 * t))).astype(np.float32)


def test_frame_rows_mirror_reference_rounding():
  # Reference: int(round(i * 1 / fps / 0.01)), clamped to the last row.
  for fps in (25, 30, 29.97):
    rows = audio.frame_rows(100, fps, 0.01, 250)
    expected = [min(round(i * 1 / fps / 0.01), 249) for i in range(100)]
    np.testing.assert_array_equal(rows, expected)
  np.testing.assert_array_equal(audio.frame_rows(4, 30, 0.01, 5), [0, 3, 4, 4])


def test_mfcc_matches_independent_htk_mfcc():
  wave = _chirp(2.0)
  n = 1 + (wave.size - 400) // 160
  # fps=100 makes video frame i take LLD row i, exposing all rows in order.
  feats = audio.mfcc_features(wave, SR, n, 100)
  assert feats.shape == (n, 39) and feats.dtype == np.float32
  ref = _htk_mfcc(wave)
  # openSMILE's HTK order puts c0 last: [c1..c12, c0].
  ref = np.concatenate([ref[:, 1:], ref[:, :1]], axis=1)
  for k in range(13):
    assert np.corrcoef(ref[:, k], feats[:, k])[0, 1] > 0.99, k
  np.testing.assert_allclose(feats[:, :13], ref, atol=1.5)
  # Deltas are the window-2 regression of the statics; delta-deltas of the
  # deltas (openSMILE's last two delta-delta rows use a different edge).
  np.testing.assert_allclose(
    feats[:, 13:26], _regression(feats[:, :13]), atol=1e-3
  )
  np.testing.assert_allclose(
    feats[:-2, 26:], _regression(feats[:, 13:26])[:-2], atol=1e-3
  )


@pytest.mark.parametrize("fps", [25, 30])
def test_mfcc_alignment_to_video_frames(fps):
  wave = _chirp(2.0)
  n_frames = 2 * fps
  feats = audio.mfcc_features(wave, SR, n_frames, fps)
  full = audio.mfcc_features(wave, SR, 1 + (wave.size - 400) // 160, 100)
  assert feats.shape == (n_frames, 39)
  for i in (0, 1, 7, n_frames - 1):
    np.testing.assert_array_equal(
      feats[i], full[min(round(i / fps / 0.01), full.shape[0] - 1)]
    )


@pytest.mark.parametrize("fps", [25, 30])
def test_egemaps_f0_of_150hz_tone(fps):
  t = np.arange(2 * SR) / SR
  wave = sum(
    a * np.sin(2 * np.pi * 150 * h * t)
    for h, a in ((1, 0.3), (2, 0.1), (3, 0.05))
  ).astype(np.float32)
  feats = audio.egemaps_features(wave, SR, 2 * fps, fps)
  assert feats.shape == (2 * fps, 23) and feats.dtype == np.float32
  f0 = feats[:, audio.EGEMAPS_COLUMNS.index("F0semitoneFrom27.5Hz_sma3nz")]
  expected = 12 * np.log2(150 / 27.5)  # 29.37 semitones.
  voiced = f0[10:-10]
  assert np.all(np.abs(voiced - expected) < 0.3), voiced


def test_egemaps_v02_selects_same_columns():
  wave = _chirp(1.0)
  a = audio.egemaps_features(wave, SR, 25, 25)
  b = audio.egemaps_features(wave, SR, 25, 25, feature_set="eGeMAPSv02")
  assert b.shape == (25, 23)
  loud = audio.EGEMAPS_COLUMNS.index("Loudness_sma3")
  np.testing.assert_allclose(a[:, loud], b[:, loud], rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="eGeMAPSv9"):
    audio.egemaps_features(wave, SR, 25, 25, feature_set="eGeMAPSv9")


def test_short_audio_pads_with_warning_or_raises():
  wave = _chirp(1.0)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    audio.mfcc_features(wave, SR, 26, 25)  # 40 ms short: within one frame.
  with pytest.warns(UserWarning, match="shorter than the video"):
    feats = audio.mfcc_features(wave, SR, 35, 25)  # 0.4 s short.
  np.testing.assert_array_equal(feats[-1], feats[-5])
  with pytest.raises(ValueError, match="3 frames.*missing|missing"):
    audio.mfcc_features(wave, SR, 75, 25)  # 2 s short.
  with pytest.raises(ValueError, match="16000 Hz"):
    audio.mfcc_features(wave, 8000, 10, 25)
  with pytest.raises(ValueError, match="mono"):
    audio.mfcc_features(np.stack([wave, wave]), SR, 10, 25)


def test_load_audio_from_generated_mp4(tmp_path):
  path = tmp_path / "clip.mp4"
  _write_video(path, seconds=1.0, audio_hz=440.0)
  wave = audio.load_audio(path)
  assert wave.dtype == np.float32 and wave.ndim == 1
  assert abs(wave.size - SR) < 0.1 * SR
  spectrum = np.abs(np.fft.rfft(wave[2000:-2000]))
  peak_hz = np.argmax(spectrum) * SR / (wave.size - 4000)
  assert abs(peak_hz - 440) < 5
  # FFmpeg downmixes identical stereo channels to mono at -3 dB each side:
  # 0.5 * (2 / sqrt(2)) = 0.707 peak (the reference's `ffmpeg -ac 1` too).
  np.testing.assert_allclose(
    np.abs(wave[2000:-2000]).max(), 0.5 * np.sqrt(2), rtol=0.05
  )
  wave8k = audio.load_audio(path, sample_rate=8000)
  assert abs(wave8k.size - 8000) < 800


def test_load_audio_errors_name_the_file(tmp_path):
  missing = tmp_path / "missing.mp4"
  with pytest.raises(FileNotFoundError, match="missing.mp4"):
    audio.load_audio(missing)
  text = tmp_path / "notes.mp4"
  text.write_text("this is not a video\n" * 10)
  with pytest.raises(ValueError, match="notes.mp4"):
    audio.load_audio(text)
  good = tmp_path / "good.mp4"
  _write_video(good)
  truncated = tmp_path / "truncated.mp4"
  truncated.write_bytes(good.read_bytes()[:2000])  # moov atom cut off.
  with pytest.raises(ValueError, match="truncated.mp4"):
    audio.load_audio(truncated)
  silent = tmp_path / "silent.mp4"
  _write_video(silent, with_audio=False)
  with pytest.raises(ValueError, match="silent.mp4.*no audio stream"):
    audio.load_audio(silent)


@pytest.mark.parametrize("fps", [25, 30])
def test_vggish_features_alignment(fps):
  params = vggish.init_params(seed=1, tiny=True)
  wave = _chirp(2.0)
  n_frames = 2 * fps
  hop = 0.24
  feats = audio.vggish_features(
    wave, SR, n_frames, fps, params=params, hop_seconds=hop, batch_size=8
  )
  assert feats.shape == (n_frames, 128) and feats.dtype == np.float32
  # Independent path: pad 1 s of edge values, build examples, embed them.
  examples = vggish_input.waveform_to_examples(
    np.pad(wave, (0, SR), mode="edge"), SR, hop_seconds=hop
  )
  emb = np.asarray(
    vggish.module_from_params(params).apply(
      {"params": params}, examples[..., None], train=False
    )
  )
  for i in range(n_frames):
    k = min(round(i / fps / hop), emb.shape[0] - 1)
    np.testing.assert_allclose(feats[i], emb[k], rtol=1e-4, atol=1e-5)
  # hop_seconds=None: one example per video frame, frame i -> example i.
  exact = audio.vggish_features(
    wave, SR, 10, fps, params=params, hop_seconds=None, batch_size=8
  )
  examples = vggish_input.waveform_to_examples(
    np.pad(wave, (0, SR), mode="edge"), SR, hop_seconds=1 / fps
  )
  emb = np.asarray(
    vggish.module_from_params(params).apply(
      {"params": params}, examples[:10, ..., None], train=False
    )
  )
  np.testing.assert_allclose(exact, emb, rtol=1e-4, atol=1e-5)
