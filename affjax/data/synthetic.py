"""Synthetic mini-Aff-Wild2: a small, learnable dataset in the raw layout.

Aff-Wild2 is licensed, so tests and the CPU demo run on this stand-in. It is
written in the raw Aff-Wild2 layout, so it goes through exactly the same
preprocessing as the real data:

```
videos/<video>.mp4                 H.264 video + AAC audio track
cropped_aligned/<trial>/NNNNN.jpg  112x112 face crops, 1-based frame
                                   numbers; missing = no face detected
annotations/VA_Set/{Train_Set,Validation_Set}/<trial>.txt
                                   "valence,arousal" header, one row per
                                   video frame, -5 = not annotated
va_test_set.txt                    test trial names, one a line
test_annotations/<trial>.txt       hidden test labels (for demo scoring)
synthetic.json                     arguments + per-trial summary
```

Labels are learnable: a smooth random valence/arousal curve per subject drives
a drawn face (mouth curvature ~ valence, eye and brow opening ~ arousal, mouth
opening ~ arousal) and a voiced audio signal (pitch, loudness and syllable rate
~ arousal), with expression, pixel, lighting, position and audio noise. So
valence is mostly visible in the face and arousal is partly audible. One video
has two subjects (`_left`/`_right` trials); frame rates alternate 25/30 fps;
some trials lose the face for a few frames (absent from the video and from
`cropped_aligned`), and random single crops are missing (detector misses).

Everything is deterministic from `seed`; the dataset is built in a temporary
sibling directory and renamed into place, so a partial dataset never looks
finished. Concurrent calls on one directory take turns (a lock file beside
it, see `affjax.data.dirlock`).
"""

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from affjax.data import dirlock

# Weight of the label in what each modality expresses (the rest is nuisance):
# valence is mostly visible, arousal is half visible and mostly audible.
_FACE_VALENCE = 0.85
_FACE_AROUSAL = 0.5
_VOICE_AROUSAL = 0.65
TEST_LIST = "va_test_set.txt"
SUMMARY = "synthetic.json"
CROP_SIZE = 112  # Aff-Wild2 cropped_aligned images are 112x112.
_PARTITION_DIRS = {"train": "Train_Set", "validation": "Validation_Set"}


@dataclasses.dataclass(frozen=True)
class _Subject:
  trial: str
  partition: str  # 'train' | 'validation' | 'test'
  centre_x: float  # face centre in the video frame, pixels
  skin: tuple[int, int, int]
  hair: tuple[int, int, int]
  base_pitch: float  # Hz


def _smooth_curve(rng, n, fps, *, lo_hz=0.02, hi_hz=0.25, n_waves=4):
  """A smooth random series in (-1, 1): [n] float64."""
  t = np.arange(n) / fps
  x = np.zeros(n)
  for _ in range(n_waves):
    f = rng.uniform(lo_hz, hi_hz)
    x += rng.uniform(0.4, 1.0) * np.sin(2 * np.pi * f * t + rng.uniform(0, 6.3))
  x += rng.uniform(-0.6, 0.6) * x.std()  # a per-subject offset
  return np.tanh(1.4 * x / (x.std() + 1e-8))


def _runs(rng, n, count, min_len, max_len):
  """Boolean [n] mask with `count` random runs of min_len..max_len frames."""
  mask = np.zeros(n, bool)
  max_len = max(1, min(max_len, n // 8))
  min_len = max(1, min(min_len, max_len))
  for _ in range(count):
    length = int(rng.integers(min_len, max_len + 1))
    start = int(rng.integers(0, n - length + 1))
    mask[start : start + length] = True
  return mask


def _draw_face(draw, cx, cy, s, valence, arousal, subject):
  """Draws one face centred at (cx, cy) with scale s (1.0 ~ 112 px crop)."""
  a01 = (arousal + 1) / 2
  draw.ellipse(
    [cx - 44 * s, cy - 56 * s, cx + 44 * s, cy + 40 * s], fill=subject.hair
  )
  draw.ellipse(
    [cx - 38 * s, cy - 46 * s, cx + 38 * s, cy + 50 * s], fill=subject.skin
  )
  eye_h = (1.0 + 6.0 * a01) * s
  for side in (-1, 1):
    ex, ey = cx + side * 16 * s, cy - 8 * s
    draw.ellipse(
      [ex - 9 * s, ey - eye_h, ex + 9 * s, ey + eye_h],
      fill=(245, 245, 245),
      outline=(40, 30, 30),
    )
    pr = min(3.5 * s, eye_h)
    draw.ellipse([ex - pr, ey - pr, ex + pr, ey + pr], fill=(20, 20, 30))
    by = ey - 10 * s - 9 * s * a01
    draw.line(
      [ex - 10 * s, by, ex + 10 * s, by],
      fill=(50, 35, 25),
      width=max(2, round(3 * s)),
    )
  # Mouth: corners rise with valence (a smile), lips part with arousal.
  xs = np.linspace(-1, 1, 11)
  curve = 11 * s * valence
  y0 = cy + 24 * s
  upper = y0 + curve * (1 - xs**2) - curve / 2
  lower = upper + (1.0 + 8.0 * a01) * s * (1 - xs**2)
  px = cx + 18 * s * xs
  poly = list(zip(px, upper)) + list(zip(px[::-1], lower[::-1]))
  draw.polygon(poly, fill=(120, 30, 40), outline=(70, 15, 20))


def _voice(rng, arousal, fps, n_samples, sr, base_pitch):
  """A voiced signal whose pitch, loudness and syllable rate follow arousal.

  Args:
    arousal: [n_frames] per-frame expressed arousal in [-1, 1].

  Returns:
    [n_samples] float64 waveform.
  """
  t = np.arange(n_samples) / sr
  a = np.interp(t, np.arange(len(arousal)) / fps, arousal)
  semitones = 5.0 * a + 0.3 * np.sin(2 * np.pi * 5.0 * t)
  knots = np.arange(0, t[-1] + 0.5, 0.25)  # slow random intonation
  semitones += np.interp(t, knots, rng.normal(0, 0.6, len(knots)))
  f0 = base_pitch * 2.0 ** (semitones / 12)
  phase = 2 * np.pi * np.cumsum(f0) / sr
  wave = sum(np.sin(k * phase) / k**1.2 for k in range(1, 9))
  syllables = np.cumsum(3.0 + 1.6 * a) / sr  # syllables per second
  gate = (0.5 - 0.5 * np.cos(2 * np.pi * syllables)) ** 0.7
  # Phrases of 1-4 s separated by 0.2-0.8 s pauses.
  speaking = np.zeros(n_samples, bool)
  pos = 0
  while pos < n_samples:
    length = int(rng.uniform(1.0, 4.0) * sr)
    speaking[pos : pos + length] = True
    pos += length + int(rng.uniform(0.2, 0.8) * sr)
  loud = 0.12 * 10 ** (9.0 * a / 20)
  return loud * gate * speaking * wave


def _plan(
  num_trials,
  rng,
  min_seconds,
  max_seconds,
  fps_choices,
  two_subject_videos,
  validation_fraction,
  test_fraction,
):
  """Decides videos, subjects and partitions: list of video dicts."""
  if num_trials < 3:
    raise ValueError(
      f"num_trials must be >= 3 (train, validation, test); got {num_trials}"
    )
  n_test = max(1, round(num_trials * test_fraction))
  n_val = max(1, round(num_trials * validation_fraction))
  n_train = num_trials - n_test - n_val
  if n_train < 1:
    raise ValueError(f"num_trials={num_trials} leaves no training trial")
  partitions = ["train"] * n_train + ["validation"] * n_val + ["test"] * n_test
  n_pairs = min(two_subject_videos, n_train // 2)
  videos = []
  i = 0
  while i < num_trials:
    two = len(videos) < n_pairs
    fps = fps_choices[len(videos) % len(fps_choices)]
    width, height = (320, 192) if two else (256, 192)
    name = f"{len(videos) + 1}-{fps}-{width}x{height}"
    seconds = rng.uniform(min_seconds, max_seconds)
    if two:
      trials = [(f"{name}_left", width * 0.25), (f"{name}_right", width * 0.75)]
    else:
      trials = [(name, width * 0.5)]
    subjects = []
    for trial, cx in trials:
      subjects.append(
        _Subject(
          trial=trial,
          partition=partitions[i],
          centre_x=cx,
          skin=tuple(
            int(c) for c in rng.integers([170, 120, 90], [240, 190, 160])
          ),
          hair=tuple(int(c) for c in rng.integers(20, 110, 3)),
          base_pitch=float(rng.uniform(100, 220)),
        )
      )
      i += 1
    videos.append(
      {
        "name": name,
        "fps": int(fps),
        "width": width,
        "height": height,
        "n_frames": round(float(seconds) * fps),
        "subjects": subjects,
      }
    )
  return videos


def _subject_series(rng, n, fps):
  """Per-frame labels and nuisance series of one subject."""
  valence = np.round(_smooth_curve(rng, n, fps), 3)
  arousal = np.round(_smooth_curve(rng, n, fps), 3)
  unlabelled = _runs(rng, n, int(rng.integers(1, 3)), 20, 80)
  absent = (
    _runs(rng, n, int(rng.integers(1, 3)), 10, 40)
    if rng.random() < 0.6
    else np.zeros(n, bool)
  )
  missed = rng.random(n) < 0.02  # face visible, crop missing
  # What the face and the voice express: the label mixed with independent
  # smooth nuisance curves, so each modality alone is imperfect.
  nuisance = [_smooth_curve(rng, n, fps, lo_hz=0.05, hi_hz=0.4) for _ in "vaw"]
  face = np.stack(
    [
      _FACE_VALENCE * valence + (1 - _FACE_VALENCE) * nuisance[0],
      _FACE_AROUSAL * arousal + (1 - _FACE_AROUSAL) * nuisance[1],
    ]
  )
  face = np.clip(face + rng.normal(0, 0.06, (2, n)), -1, 1)
  voice = _VOICE_AROUSAL * arousal + (1 - _VOICE_AROUSAL) * nuisance[2]
  drift = np.stack(
    [_smooth_curve(rng, n, fps, lo_hz=0.05, hi_hz=0.3) for _ in range(3)]
  )
  return {
    "valence": valence,
    "arousal": arousal,
    "unlabelled": unlabelled,
    "absent": absent,
    "missed": missed & ~absent,
    "drift": drift,
    "face": face,
    "voice": voice,
  }


def _render_video(out_dir, video, series, rng, audio_rate, crf):
  """Draws frames, saves crops, encodes the mp4 with its audio track."""
  import av  # pylint: disable=g-import-not-at-top

  w, h = video["width"], video["height"]
  fps, n = video["fps"], video["n_frames"]
  # Background: a tinted gradient with a static 8x8-pixel block texture.
  yy, xx = np.mgrid[0:h, 0:w]
  blocks = rng.normal(0, 10, (h // 8 + 1, w // 8 + 1, 3))
  blocks = blocks.repeat(8, 0).repeat(8, 1)[:h, :w]
  gradient = 40 * np.sin(xx / w * 3 + yy / h * 2)[..., None]
  background = rng.integers(60, 200, 3) + gradient + blocks
  background = np.clip(background, 0, 255).astype(np.uint8)
  noise = rng.normal(0, 3.0, (16, h, w, 3)).astype(np.float32)
  light = 1.0 + 0.2 * _smooth_curve(rng, n, fps, lo_hz=0.03, hi_hz=0.2)
  choice = rng.integers(0, len(noise), n)
  flicker = rng.normal(0, 0.02, n)

  n_samples = round(n / fps * audio_rate)
  audio = sum(
    _voice(
      rng, series[s.trial]["voice"], fps, n_samples, audio_rate, s.base_pitch
    )
    for s in video["subjects"]
  )
  audio = audio + rng.normal(0, 0.01, n_samples)
  audio = (0.9 * audio / max(1.0, np.abs(audio).max())).astype(np.float32)

  for s in video["subjects"]:
    os.makedirs(os.path.join(out_dir, "cropped_aligned", s.trial))
  path = os.path.join(out_dir, "videos", video["name"] + ".mp4")
  with av.open(path, "w") as container:
    vs = container.add_stream(
      "libx264", rate=fps, options={"preset": "ultrafast", "crf": str(crf)}
    )
    vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
    vs.codec_context.thread_count = 1  # byte-identical output across machines
    aus = container.add_stream("aac", rate=audio_rate, layout="mono")
    apos = 0
    for i in range(n):
      img = Image.fromarray(background)
      draw = ImageDraw.Draw(img)
      boxes = []
      for s in video["subjects"]:
        ser = series[s.trial]
        if ser["absent"][i]:
          continue
        cx = s.centre_x + 12 * ser["drift"][0, i]
        cy = h / 2 + 6 + 8 * ser["drift"][1, i]
        scale = 1.0 + 0.06 * ser["drift"][2, i]
        v, a = ser["face"][:, i]
        _draw_face(draw, cx, cy, scale, v, a, s)
        if not ser["missed"][i]:
          half, top = 56 * scale, cy - 4 * scale
          boxes.append(
            (s.trial, (cx - half, top - half, cx + half, top + half))
          )
      frame = np.asarray(img, np.float32) * (light[i] + flicker[i])
      frame += noise[choice[i]]
      frame = np.clip(frame, 0, 255).astype(np.uint8)
      img = Image.fromarray(frame)
      for trial, box in boxes:
        crop = img.crop(tuple(round(float(b)) for b in box))
        crop = crop.resize((CROP_SIZE, CROP_SIZE), Image.BILINEAR)
        crop.save(
          os.path.join(out_dir, "cropped_aligned", trial, f"{i + 1:05d}.jpg"),
          quality=80,
        )
      vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
      vf.pts = i
      for packet in vs.encode(vf):
        container.mux(packet)
      while apos < min((i + 1) / fps * audio_rate, n_samples):
        chunk = audio[apos : apos + 1024]
        af = av.AudioFrame.from_ndarray(
          chunk[None], format="fltp", layout="mono"
        )
        af.sample_rate, af.pts = audio_rate, apos
        for packet in aus.encode(af):
          container.mux(packet)
        apos += len(chunk)
    for stream in (vs, aus):
      for packet in stream.encode():
        container.mux(packet)


def _write_labels(path, valence, arousal, unlabelled):
  rows = ["valence,arousal"]
  for v, a, u in zip(valence, arousal, unlabelled):
    rows.append("-5,-5" if u else f"{v:.3f},{a:.3f}")
  with open(path, "w") as f:
    f.write("\n".join(rows) + "\n")


def generate(
  out_dir: str,
  *,
  num_trials: int = 14,
  seed: int = 0,
  min_seconds: float = 20.0,
  max_seconds: float = 40.0,
  fps_choices: tuple[int, ...] = (25, 30),
  two_subject_videos: int = 1,
  validation_fraction: float = 0.2,
  test_fraction: float = 0.2,
  audio_rate: int = 22050,
  crf: int = 28,
) -> None:
  """Writes a synthetic Aff-Wild2-like raw dataset to `out_dir`.

  Does nothing if `out_dir` already holds a dataset generated with the same
  arguments; raises if it holds anything else.

  Args:
    out_dir: destination directory (created; must not exist or be empty).
    num_trials: number of annotated+test trials (a two-subject video counts
      twice). At least 3.
    seed: everything (labels, faces, audio, noise) is a function of it.
    min_seconds, max_seconds: range of video durations, seconds.
    fps_choices: frame rates, assigned to videos in turn.
    two_subject_videos: training videos with a `_left` and a `_right` subject.
    validation_fraction, test_fraction: shares of trials per partition (at
      least one trial each).
    audio_rate: sample rate of the AAC track, Hz (preprocessing resamples).
    crf: x264 quality (lower = larger files).
  """
  args = {
    "num_trials": num_trials,
    "seed": seed,
    "min_seconds": min_seconds,
    "max_seconds": max_seconds,
    "fps_choices": list(fps_choices),
    "two_subject_videos": two_subject_videos,
    "validation_fraction": validation_fraction,
    "test_fraction": test_fraction,
    "audio_rate": audio_rate,
    "crf": crf,
  }
  if not 0 < min_seconds <= max_seconds:
    raise ValueError(
      f"need 0 < min_seconds <= max_seconds, got {min_seconds}, {max_seconds}"
    )
  out_dir = os.path.abspath(out_dir)
  # Beside, not inside: the dataset directory appears by a rename. A second
  # run (a parallel fold sweep) waits, then finds the dataset made.
  with dirlock.hold(dirlock.beside(out_dir), f"synthetic dataset {out_dir}"):
    _generate_once(out_dir, args)


def _generate_once(out_dir: str, args: dict[str, Any]) -> None:
  """`generate` holding the lock of `out_dir`."""
  summary_path = os.path.join(out_dir, SUMMARY)
  if os.path.isfile(summary_path):
    with open(summary_path) as f:
      existing = json.load(f)["arguments"]
    if existing == args:
      return
    raise ValueError(
      f"{out_dir} holds a synthetic dataset generated with "
      f"{existing}, not {args}; use another directory"
    )
  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise ValueError(
      f"{out_dir} exists, is not empty and holds no {SUMMARY}; "
      "refusing to generate into it"
    )
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".synthetic-", dir=parent)
  try:
    _generate_into(tmp, args)
    os.chmod(tmp, 0o755)  # mkdtemp creates 0700
    if os.path.exists(out_dir):
      os.rmdir(out_dir)  # empty, checked above
    os.replace(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _generate_into(out_dir: str, args: dict[str, Any]) -> None:
  rng = np.random.default_rng(args["seed"])
  videos = _plan(
    args["num_trials"],
    rng,
    args["min_seconds"],
    args["max_seconds"],
    tuple(args["fps_choices"]),
    args["two_subject_videos"],
    args["validation_fraction"],
    args["test_fraction"],
  )
  for d in (
    "videos",
    "cropped_aligned",
    "test_annotations",
    *(
      os.path.join("annotations", "VA_Set", p) for p in _PARTITION_DIRS.values()
    ),
  ):
    os.makedirs(os.path.join(out_dir, d))
  trials, test_names = {}, []
  for vi, video in enumerate(videos):
    # One generator per video: a video's content does not depend on others.
    vrng = np.random.default_rng([args["seed"], vi + 1])
    series = {
      s.trial: _subject_series(vrng, video["n_frames"], video["fps"])
      for s in video["subjects"]
    }
    _render_video(out_dir, video, series, vrng, args["audio_rate"], args["crf"])
    for s in video["subjects"]:
      ser = series[s.trial]
      if s.partition == "test":
        test_names.append(s.trial)
        label_path = os.path.join(out_dir, "test_annotations", s.trial + ".txt")
      else:
        label_path = os.path.join(
          out_dir,
          "annotations",
          "VA_Set",
          _PARTITION_DIRS[s.partition],
          s.trial + ".txt",
        )
      _write_labels(
        label_path, ser["valence"], ser["arousal"], ser["unlabelled"]
      )
      trials[s.trial] = {
        "video": video["name"],
        "partition": s.partition,
        "fps": video["fps"],
        "n_frames": video["n_frames"],
        "n_unlabelled": int(ser["unlabelled"].sum()),
        "n_missing_crops": int((ser["absent"] | ser["missed"]).sum()),
        "n_absent_in_video": int(ser["absent"].sum()),
      }
  with open(os.path.join(out_dir, TEST_LIST), "w") as f:
    f.write("".join(name + "\n" for name in test_names))
  with open(os.path.join(out_dir, SUMMARY), "w") as f:
    json.dump({"arguments": args, "trials": trials}, f, indent=1)


def main(argv: list[str] | None = None) -> None:
  """`python -m affjax.data.synthetic --out=DIR [--num_trials=N --seed=S]`."""
  import argparse  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(prog="python -m affjax.data.synthetic")
  parser.add_argument("--out", required=True)
  parser.add_argument("--num_trials", type=int, default=14)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--min_seconds", type=float, default=20.0)
  parser.add_argument("--max_seconds", type=float, default=40.0)
  args = parser.parse_args(argv)
  generate(
    args.out,
    num_trials=args.num_trials,
    seed=args.seed,
    min_seconds=args.min_seconds,
    max_seconds=args.max_seconds,
  )
  print(f"synthetic Aff-Wild2 ({args.num_trials} trials) in {args.out}")


if __name__ == "__main__":
  main()
