r"""Frames/s of each stage of `--mode=predict` and end to end, on one video.

  python -m benchmarks.predict_speed --video=FILE [--workdir=W] \
      [--frames=300] [--conv_chunk=64] [--repeats=2]

Stages, each timed on the same video (its first `--frames` frames):

* decode: PyAV decoding to RGB frames (`affjax.predict.iter_frames`);
* detect+align: the default face detector per frame (YuNet), tracking,
  landmark-aligned 48x48 crops (`affjax.face`);
* audio features: the paper's VGGish + MFCC rows per video frame
  (`affjax.predict.audio_features`, default cache settings); skipped for a
  video without audio;
* model: whole-trial causal inference (`affjax.inference`, backbone once
  per frame, TCNs + fusion over the trial) for the demo model (the
  checkpoint of `--workdir`, else `configs/demo.py`'s model with random
  weights) and the paper's model (IR-50 + TCNs + leader-follower fusion,
  random weights, `--conv_chunk` as `config.model.backbone.conv_chunk`);
  the paper's model part also through its PyTorch transcription
  (`tests/torch_reference/`, same weights) at its best: every thread count
  from 1 to the cores, contiguous (NCHW) and channels-last tensors, 256
  frames per backbone call; its output is compared with affjax's.

End to end is the stages run one after another (1 / sum of seconds per
frame); the stages are independent, so a pipeline that overlaps them would
be bounded by the slowest. The model stages are timed in alternation
(medians of `--repeats`), the others once after a warm-up. jemalloc: run
the whole benchmark under `LD_PRELOAD=/usr/lib/x86_64-linux-gnu/
libjemalloc.so.2` (Debian's `libjemalloc2`) to time PyTorch with it; the
header says whether it is loaded. Nothing is asserted: the machine is
shared, only ratios within one run mean something.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import numpy as np

from benchmarks import harness


def _timed(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def decode(video: str, frames: int) -> list[np.ndarray]:
  from affjax import predict  # pylint: disable=g-import-not-at-top

  return list(itertools.islice(predict.iter_frames(video), frames))


def detect_and_align(frames: list[np.ndarray]) -> tuple[np.ndarray, int]:
  """48x48 crops `[T, 48, 48, 3]` and the number of frames with a face."""
  from affjax import face  # pylint: disable=g-import-not-at-top

  detector = face.make_detector()
  track = face.track([detector.detect(f) for f in frames])
  crops = np.zeros((len(frames), 48, 48, 3), np.uint8)
  for i in np.flatnonzero(track.found):
    crops[i] = face.crop_face(
      frames[i],
      track.boxes[i],
      track.landmarks[i],
      scale=detector.settings.crop_scale,
      y_shift=detector.settings.crop_y_shift,
    )
  return crops, int(track.found.sum())


def model_inputs(crops: np.ndarray, audio: dict[str, np.ndarray]):
  """The trial dict of the models: centre 40x40 in [-1, 1], audio rows."""
  x = crops[:, 4:44, 4:44].astype(np.float32) / 127.5 - 1.0
  trial = {"frames": x}
  for name, dim in harness.AUDIO:
    rows = audio.get(name)
    trial[name] = (
      np.asarray(rows, np.float32)
      if rows is not None
      else np.zeros((len(x), dim), np.float32)
    )
  return trial


def trial_predictor(model, variables, length: int):
  """Whole-trial causal inference of one `length`-frame trial."""
  from affjax import inference  # pylint: disable=g-import-not-at-top

  return inference.make_trial_predictor(
    model, variables, chunk_length=length, batch_size=1
  )


def demo_model(workdir: str, length: int):
  """(predictor, trial keys) of the demo model, random weights.

  The model of `workdir`'s checkpoint config if given (trained weights
  take the same time), else `configs/demo.py`'s.
  """
  from affjax import inference  # pylint: disable=g-import-not-at-top
  from affjax.models import build_model  # pylint: disable=g-import-not-at-top

  if workdir:
    from affjax import predict  # pylint: disable=g-import-not-at-top

    config = predict.load_model(workdir).config
  else:
    from configs import demo  # pylint: disable=g-import-not-at-top

    config = demo.get_config()
  model = build_model(config.model)
  keys = inference.input_keys(model)
  dims = dict(config.model.get("audio_features", ()))
  small = {
    k: np.zeros((1, 8, 40, 40, 3) if k == "frames" else (1, 8, dims[k]))
    for k in keys
  }
  key = jax.random.key(0)
  variables = model.init({"params": key, "dropout": key}, small, train=False)
  return trial_predictor(model, variables, length), keys


def torch_best(net, trial, threads: list[int], repeats: int):
  """Median seconds of the PyTorch model part per (threads, layout)."""
  import torch  # pylint: disable=g-import-not-at-top

  frames = torch.from_numpy(
    np.ascontiguousarray(trial["frames"].transpose(0, 3, 1, 2))
  )
  audio = [torch.from_numpy(trial[name])[None] for name, _ in harness.AUDIO]

  def run(layout):
    spatial = net.spatial
    x = frames.contiguous(memory_format=layout)
    with torch.no_grad():
      emb = torch.cat([spatial(x[i : i + 256]) for i in range(0, len(x), 256)])[
        None
      ]
      net.spatial = None
      try:
        out = net(emb, *audio)
      finally:
        net.spatial = spatial
    return out[0].numpy()

  results = {}
  outputs = None
  for n in threads:
    torch.set_num_threads(n)
    for name, layout in (
      ("NCHW", torch.contiguous_format),
      ("channels-last", torch.channels_last),
    ):
      net.spatial.to(memory_format=layout)
      outputs = run(layout)  # warm-up
      times = []
      for _ in range(repeats):
        start = time.perf_counter()
        run(layout)
        times.append(time.perf_counter() - start)
      results[(n, name)] = float(np.median(times))
      print(
        f"PyTorch {n} thread(s) {name}: {results[(n, name)]:.2f} s", flush=True
      )
  net.spatial.to(memory_format=torch.contiguous_format)
  return results, outputs


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--video", required=True)
  parser.add_argument("--workdir", default="")
  parser.add_argument("--frames", type=int, default=300)
  parser.add_argument("--conv_chunk", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--no_torch", action="store_true")
  args = parser.parse_args(argv)
  from affjax import predict  # pylint: disable=g-import-not-at-top
  from affjax.data.preprocess import cache  # pylint: disable=g-import-not-at-top

  preload = os.environ.get("LD_PRELOAD", "")
  print(
    f"jax {jax.__version__}, load average {harness.load_average()}, "
    f"jemalloc {'loaded' if 'jemalloc' in preload else 'not loaded'}",
    flush=True,
  )
  fps, has_audio = predict.probe(args.video)
  decode(args.video, 8)  # warm-up (codec, file cache)
  frames, t_decode = _timed(lambda: decode(args.video, args.frames))
  n = len(frames)
  h, w = frames[0].shape[:2]
  print(f"{args.video}: {n} frames {w}x{h} at {fps:.2f} fps", flush=True)
  print(f"decode: {t_decode:.2f} s, {n / t_decode:.1f} frames/s", flush=True)
  detect_and_align(frames[:4])  # warm-up (detector load)
  (crops, found), t_detect = _timed(lambda: detect_and_align(frames))
  print(
    f"detect+align: {t_detect:.2f} s, {n / t_detect:.1f} frames/s", flush=True
  )
  audio, t_audio = {}, 0.0
  if has_audio:
    settings = cache.PreprocessSettings()
    names = [name for name, _ in harness.AUDIO]
    predict.audio_features(args.video, names, min(n, 16), fps, settings)
    audio, t_audio = _timed(
      lambda: predict.audio_features(args.video, names, n, fps, settings)
    )
    print(f"audio: {t_audio:.2f} s, {n / t_audio:.1f} frames/s", flush=True)
  trial = model_inputs(crops, audio)

  demo, demo_keys = demo_model(args.workdir, n)
  demo_trial = {k: trial[k] for k in demo_keys}
  torch_net, paper, variables = harness.twin_models(
    "frames", conv_chunk=args.conv_chunk
  )
  paper_predict = trial_predictor(paper, variables, n)
  paper_trial = {k: trial[k] for k in ("frames", "vggish", "mfcc")}
  ours = paper_predict([paper_trial])[0]  # compiles
  demo([demo_trial])  # compiles
  cases = [
    harness.Case("demo", lambda: demo([demo_trial])),
    harness.Case("paper", lambda: paper_predict([paper_trial])),
  ]
  harness.alternate(cases, args.repeats, warmup=0)
  t_demo, t_paper = (c.median for c in cases)
  print(f"models: demo {t_demo:.2f} s, paper {t_paper:.2f} s", flush=True)

  torch_rows = {}
  if not args.no_torch:
    threads = list(range(1, (os.cpu_count() or 1) + 1))
    torch_rows, theirs = torch_best(torch_net, trial, threads, args.repeats)
    diff = float(np.abs(np.asarray(ours) - theirs).max())

  def rate(seconds):
    return f"{n / seconds:.1f}" if seconds > 0 else "-"

  def e2e(model_seconds):
    return rate(t_decode + t_detect + t_audio + model_seconds)

  print(f"\nload average after: {harness.load_average()}")
  print(f"face found on {found} of {n} frames")
  print("| stage | seconds | frames/s |")
  print("|---|---|---|")
  rows = [
    ("decode", t_decode),
    ("detect+align (YuNet, track, aligned crops)", t_detect),
    ("audio features (VGGish + MFCC)", t_audio),
    ("model: demo (whole trial)", t_demo),
    (f"model: paper, affjax (conv_chunk={args.conv_chunk})", t_paper),
  ]
  for (threads, layout), seconds in sorted(torch_rows.items()):
    rows.append(
      (f"model: paper, PyTorch {threads} thread(s), {layout}", seconds)
    )
  for name, seconds in rows:
    if name.startswith("audio") and not has_audio:
      print(f"| {name} | - (no audio track) | - |")
      continue
    print(f"| {name} | {seconds:.2f} | {rate(seconds)} |")
  print(f"| **end to end, demo model** | | **{e2e(t_demo)}** |")
  print(f"| **end to end, paper's model (affjax)** | | **{e2e(t_paper)}** |")
  if torch_rows:
    best = min(torch_rows.values())
    print(f"| end to end, paper's model (best PyTorch) | | {e2e(best)} |")
    print(
      f"\nPyTorch best / affjax model part: {best / t_paper:.2f}x; "
      f"max abs difference of the outputs: {diff:.1e}"
    )


if __name__ == "__main__":
  main()
