r"""How well `--mode=predict` tracks the labels of unseen synthetic videos.

Runs the whole prediction path (decode, Haar face tracking, audio features,
windowed inference; `affjax.predict.run`) of a trained workdir on the
synthetic dataset's single-subject *test* videos, which neither training nor
model selection saw, and prints per video the CCC of the predicted curves
against the generator's hidden labels (`test_annotations/`, -5 frames
excluded) and the number of frames without a face (predicted vs. absent
from the video), then the CCC over all those videos' frames.

  python -m affjax.main --config=configs/demo.py --workdir=/tmp/affjax_demo
  python -m benchmarks.predict_demo --workdir=/tmp/affjax_demo

`--raw` defaults to `<workdir>/data/raw` (where the demo generates it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from affjax import metrics, predict
from affjax.data import synthetic
from affjax.data.preprocess import labels as labels_lib


def _test_videos(raw: str) -> list[tuple[str, str, dict]]:
  """(trial, video path, summary) of the single-subject test trials."""
  with open(os.path.join(raw, synthetic.SUMMARY)) as f:
    trials = json.load(f)["trials"]
  per_video: dict[str, list[str]] = {}
  for name, info in trials.items():
    per_video.setdefault(info["video"], []).append(name)
  out = []
  for name, info in sorted(trials.items()):
    if info["partition"] == "test" and len(per_video[info["video"]]) == 1:
      path = os.path.join(raw, "videos", info["video"] + ".mp4")
      out.append((name, path, info))
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.predict_demo")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--raw", default=None)
  parser.add_argument("--out", default=None, help="default <workdir>/predict")
  args = parser.parse_args(argv)
  raw = args.raw or os.path.join(args.workdir, "data", "raw")
  videos = _test_videos(raw)
  if not videos:
    sys.exit(f"no single-subject test videos in {raw}")
  preds, targets, masks = [], [], []
  print(f"{'trial':>18} {'frames':>6} {'no face':>7} {'absent':>6}  CCC")
  for trial, path, info in videos:
    result = predict.run(args.workdir, path, out_dir=args.out)
    label = labels_lib.read_annotation(
      os.path.join(raw, "test_annotations", trial + ".txt")
    )
    cols = [("valence", "arousal").index(e) for e in result.emotions]
    label = np.asarray(label, np.float64)[:, cols]
    if len(label) != len(result.values):
      sys.exit(
        f"{trial}: {len(result.values)} predicted frames, {len(label)} labels"
      )
    mask = label > -5
    ccc = np.asarray(metrics.ccc(result.values, label, mask))
    scores = ", ".join(
      f"{e} {c:.3f}" for e, c in zip(result.emotions, ccc, strict=True)
    )
    print(
      f"{trial:>18} {len(label):>6} {int((~result.face_found).sum()):>7} "
      f"{info['n_absent_in_video']:>6}  {scores}"
    )
    preds.append(result.values)
    targets.append(label)
    masks.append(mask)
  overall = np.asarray(
    metrics.ccc(
      np.concatenate(preds), np.concatenate(targets), np.concatenate(masks)
    )
  )
  print(
    "all test videos: "
    + ", ".join(
      f"{e} CCC {c:.3f}" for e, c in zip(result.emotions, overall, strict=True)
    )
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
