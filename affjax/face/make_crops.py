r"""`cropped_aligned` face crops for a raw dataset that ships only videos.

  python -m affjax.face.make_crops --raw=DIR [--trials=A,B]

Preprocessing (`affjax.data.preprocess`) reads each trial's face crops from
`<raw>/cropped_aligned/<trial>/NNNNN.jpg` (1-based frame numbers, a missing
file = no face), as Aff-Wild2 ships them. For a dataset in the same layout
without that folder, this writes it from the videos the way prediction
crops faces: YuNet per frame, one face tracked per trial, crops aligned on
the five landmarks to the ArcFace 112x112 template (`affjax.face`). A trial
`<video>_left` / `<video>_right` (two people in one video) keeps the faces
whose centre is in that half of the frame.

Trials whose crop folder exists are left alone. A trial's folder is written
under a `.tmp-` name and renamed when complete, so an interrupted run never
leaves a partial folder that looks finished.
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Sequence

import numpy as np
from PIL import Image

from affjax.face import crop as crop_lib
from affjax.face import detector as detector_lib
from affjax.face import tracking


def _side_filter(
  dets: detector_lib.Detections, side: str, width: int
) -> detector_lib.Detections:
  """Keeps the detections whose box centre is in the `side` half."""
  centre = (dets.boxes[:, 0] + dets.boxes[:, 2]) / 2
  keep = centre < width / 2 if side == "left" else centre >= width / 2
  marks = None if dets.landmarks is None else dets.landmarks[keep]
  return detector_lib.Detections(dets.boxes[keep], dets.scores[keep], marks)


def trial_crops(
  video_path: str, side: str | None = None, detector=None
) -> tuple[list[int], list[np.ndarray]]:
  """Aligned 112x112 crops of one trial.

  Args:
    video_path: the trial's video.
    side: 'left' / 'right' for one of two people, None for the only face.
    detector: default `make_detector()`.

  Returns:
    0-based frame indices with a face and their uint8 `[112, 112, 3]` crops.
  """
  from affjax import predict  # pylint: disable=g-import-not-at-top

  detector = detector or detector_lib.make_detector()
  detections = []
  for frame in predict.iter_frames(video_path):
    dets = detector.detect(frame)
    if side is not None:
      dets = _side_filter(dets, side, frame.shape[1])
    detections.append(dets)
  track = tracking.track(detections)
  geometry = detector.settings
  indices, crops = [], []
  for i, frame in enumerate(predict.iter_frames(video_path)):
    if i < len(track.found) and track.found[i]:
      indices.append(i)
      crops.append(
        crop_lib.crop_face(
          frame,
          track.boxes[i],
          track.landmarks[i],
          scale=geometry.crop_scale,
          y_shift=geometry.crop_y_shift,
          size=crop_lib.ALIGNED_SIZE,
        )
      )
  return indices, crops


def make_crops(
  raw_dir: str, trials: Sequence[str] | None = None, detector=None
) -> dict[str, int]:
  """Writes the missing `cropped_aligned/<trial>/` folders.

  Returns:
    {trial: number of frames with a face} of the trials written.
  """
  from affjax.data.preprocess import layout  # pylint: disable=g-import-not-at-top

  detector = detector or detector_lib.make_detector()
  written = {}
  for source in layout.find_trials(raw_dir, trials=trials):
    if os.path.isdir(source.crop_dir):
      continue
    side = None
    for suffix in ("left", "right"):
      if source.name.endswith("_" + suffix):
        side = suffix
    indices, crops = trial_crops(source.video_path, side, detector)
    parent, name = os.path.split(source.crop_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for i, image in zip(indices, crops):
      Image.fromarray(image).save(
        os.path.join(tmp, f"{i + 1:05d}.jpg"), quality=95
      )
    os.replace(tmp, source.crop_dir)
    written[source.name] = len(indices)
  return written


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--raw", required=True, help="raw dataset root")
  parser.add_argument("--trials", default="", help="comma-separated names")
  args = parser.parse_args(argv)
  trials = [t for t in args.trials.split(",") if t] or None
  for trial, n in make_crops(args.raw, trials).items():
    print(f"{trial}: {n} face crops")


if __name__ == "__main__":
  main()
