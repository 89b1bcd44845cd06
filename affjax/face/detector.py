"""Frontal face detector: OpenCV's Haar cascade bundled in its wheel.

Why this detector (measured on this project's machine, see the predict
issue's report): `opencv-python-headless` 4.x ships the Haar cascade XML
files in `cv2.data.haarcascades` (the 5.x wheels no longer do); `mtcnn`
1.0.0 ships its weights too but found only 12% of the synthetic faces at
~0.3 s per frame; `mediapipe` 1.x ships no face model in its wheel. On
synthetic videos of `affjax.data.synthetic` the `frontalface_alt2` cascade
with the settings below found 1364 of 1373 drawn faces (no miss longer than
3 frames, bridged by `tracking`) and nothing in 165 face-less frames; on a
real photograph it finds the face with ~50 neighbours while clutter reaches
at most ~4, hence `min_neighbors=4` and the neighbour count as the score.

The cascade works on grey levels without histogram equalisation
(equalisation lowered the recall on the drawn faces from 99% to 60-80%).
Frames are downscaled so that their longer side is at most `max_side`
pixels before detection, which bounds the cost per frame whatever the
video's resolution; boxes are returned in the input frame's pixels.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

CASCADE = "haarcascade_frontalface_alt2.xml"


@dataclasses.dataclass(frozen=True)
class DetectorSettings:
  """Haar cascade settings.

  Attributes:
    cascade: file name inside `cv2.data.haarcascades`, or a path to an XML.
    scale_factor: image pyramid step (smaller = slower, finds more).
    min_neighbors: overlapping raw detections a face needs to be kept.
    min_face_fraction: smallest face side as a fraction of the frame's
      shorter side.
    max_side: frames are downscaled to at most this many pixels on their
      longer side before detection (0 = never).
  """

  cascade: str = CASCADE
  scale_factor: float = 1.08
  min_neighbors: int = 4
  min_face_fraction: float = 0.08
  max_side: int = 480

  def __post_init__(self):
    if self.scale_factor <= 1.0:
      raise ValueError(f"scale_factor must be > 1, got {self.scale_factor}")
    if self.min_neighbors < 0 or not 0 <= self.min_face_fraction < 1:
      raise ValueError(f"invalid detector settings {self}")


@dataclasses.dataclass(frozen=True)
class Detections:
  """Faces found in one frame.

  Attributes:
    boxes: float32 `[n, 4]` (x0, y0, x1, y1) in the frame's pixels.
    scores: float32 `[n]` neighbour counts (higher = more certain).
  """

  boxes: np.ndarray
  scores: np.ndarray

  @classmethod
  def empty(cls) -> Detections:
    return cls(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32))

  def __len__(self) -> int:
    return len(self.scores)


def _import_cv2() -> Any:
  try:
    import cv2  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
      "face detection needs OpenCV: pip install 'affjax[preprocess]' "
      "(opencv-python-headless<5)"
    ) from e
  return cv2


class HaarFaceDetector:
  """`detect(frame) -> Detections` with a bundled OpenCV Haar cascade."""

  def __init__(self, settings: DetectorSettings | None = None):
    cv2 = _import_cv2()
    self.settings = settings or DetectorSettings()
    path = self.settings.cascade
    if "/" not in path:
      path = cv2.data.haarcascades + path if hasattr(cv2, "data") else path
    self._cascade = cv2.CascadeClassifier(path)
    if self._cascade.empty():
      raise FileNotFoundError(
        f"Haar cascade {path} could not be loaded (OpenCV "
        f"{cv2.__version__}); opencv-python-headless 5.x wheels no longer "
        "ship the cascades, install opencv-python-headless<5"
      )
    self._cv2 = cv2

  def detect(self, frame: np.ndarray) -> Detections:
    """Finds frontal faces.

    Args:
      frame: uint8 `[H, W, 3]` RGB or `[H, W]` grey image.

    Returns:
      The faces, best first (by neighbour count).
    """
    cv2, s = self._cv2, self.settings
    frame = np.asarray(frame)
    if frame.ndim == 3:
      gray = cv2.cvtColor(
        np.ascontiguousarray(frame, np.uint8), cv2.COLOR_RGB2GRAY
      )
    elif frame.ndim == 2:
      gray = np.ascontiguousarray(frame, np.uint8)
    else:
      raise ValueError(
        f"frame must be [H, W, 3] or [H, W], got shape {frame.shape}"
      )
    h, w = gray.shape
    scale = 1.0
    if s.max_side and max(h, w) > s.max_side:
      scale = s.max_side / max(h, w)
      gray = cv2.resize(
        gray,
        (max(1, round(w * scale)), max(1, round(h * scale))),
        interpolation=cv2.INTER_AREA,
      )
    min_side = max(12, int(s.min_face_fraction * min(gray.shape)))
    boxes, neighbours = self._cascade.detectMultiScale2(
      gray,
      scaleFactor=s.scale_factor,
      minNeighbors=s.min_neighbors,
      minSize=(min_side, min_side),
    )
    if len(boxes) == 0:
      return Detections.empty()
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.asarray(neighbours, np.float32).reshape(-1)
    boxes[:, 2:] += boxes[:, :2]
    boxes /= scale
    order = np.lexsort((-(boxes[:, 2] - boxes[:, 0]), -scores))
    return Detections(boxes[order], scores[order])
