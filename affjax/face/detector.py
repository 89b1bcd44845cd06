"""Face detectors whose weights ship inside their wheels, and the factory.

`make_detector()` gives YuNet (`YuNetFaceDetector`, boxes and five
landmarks), chosen on real footage (`benchmarks/face_detectors.py`, table in
benchmarks/README.md: every real face found, 176x144 included, none in
face-less footage, 5.8x the Haar cascade's frames/s), or OpenCV's Haar
cascade (`HaarFaceDetector`) where `yuface` has no wheel.

The Haar cascade, the earlier default, was chosen on the synthetic drawn
faces only: `opencv-python-headless` 4.x ships the Haar cascade XML
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
import os
from typing import Any

import numpy as np
from absl import logging

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
    crop_scale, crop_y_shift: the square crop around a box
      (`affjax.face.crop.square_box`), fitted on the synthetic generator's
      crops (see `affjax.face.crop`).
  """

  cascade: str = CASCADE
  scale_factor: float = 1.08
  min_neighbors: int = 4
  min_face_fraction: float = 0.08
  max_side: int = 480
  crop_scale: float = 1.16
  crop_y_shift: float = -0.06

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
    scores: float32 `[n]` detector confidences (higher = more certain; the
      scale is the detector's own).
    landmarks: float32 `[n, 5, 2]` (x, y) of the eye centres, nose tip and
      mouth corners in the frame's pixels, in the ArcFace template's order
      (image-left eye, image-right eye, nose, image-left and image-right
      mouth corner), or None when the detector gives none.
  """

  boxes: np.ndarray
  scores: np.ndarray
  landmarks: np.ndarray | None = None

  @classmethod
  def empty(cls) -> Detections:
    return cls(
      np.zeros((0, 4), np.float32),
      np.zeros((0,), np.float32),
      np.zeros((0, 5, 2), np.float32),
    )

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


@dataclasses.dataclass(frozen=True)
class YuNetSettings:
  """YuNet (libfacedetection) settings.

  Attributes:
    min_score: detections below this confidence (0-1) are dropped. Real
      faces of `benchmarks/face_detectors.py` scored >= 0.80 (rotated,
      blurred, half-hidden, 176x144), a cartoon rabbit 0.50-0.75: 0.8
      keeps every real face and drops the cartoon. The synthetic drawn
      faces score from 0.2 (partly outside the picture) to 0.95 and need
      0.2 (`make_detector(drawn_faces=True)`; no false detection on the
      face-less frames of the synthetic videos there).
    max_side: frames are downscaled to at most this many pixels on their
      longer side before detection (0 = never). The network's cost grows
      with the frame's area, and it finds faces from about 10 pixels wide,
      so 320 keeps every face wider than 3% of the frame.
    landmarks: return the five landmarks, so that crops are aligned on
      them; False gives boxes only, and square crops around them (for a
      model trained on the synthetic generator's square crops).
    crop_scale, crop_y_shift: the square crop around a YuNet box when there
      are no landmarks (`affjax.face.crop.square_box`): fitted on the
      synthetic generator's crops (mean absolute difference of the 48x48
      frames 10.8 over 76 frames, as the Haar cascade's 10.9).
  """

  min_score: float = 0.8
  max_side: int = 320
  landmarks: bool = True
  crop_scale: float = 1.53
  crop_y_shift: float = -0.10

  def __post_init__(self):
    if not 0 <= self.min_score < 1 or self.max_side < 0:
      raise ValueError(f"invalid YuNet settings {self}")


def _import_yuface() -> Any:
  """Imports `yuface` with its OpenMP pool limited to one thread.

  The wheel bundles its own OpenMP runtime, which reads OMP_NUM_THREADS
  once, when it is loaded. With one thread per core its workers spin while
  waiting, and on a busy machine (the model runs beside detection) a frame
  took 16x longer with 2 threads than with 1 on 2 cores. The variable is
  set only while importing, so libraries loaded later keep their defaults;
  a value the user set is kept.
  """
  user_set = "OMP_NUM_THREADS" in os.environ
  if not user_set:
    os.environ["OMP_NUM_THREADS"] = "1"
  try:
    import yuface  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
      "the YuNet face detector needs yuface: pip install 'affjax[preprocess]'"
    ) from e
  finally:
    if not user_set:
      del os.environ["OMP_NUM_THREADS"]
  return yuface


class YuNetFaceDetector:
  """`detect(frame) -> Detections` (boxes and 5 landmarks) with YuNet.

  YuNet is libfacedetection's small CNN detector; the `yuface` wheel
  compiles its weights into the library, so nothing is downloaded at run
  time. It finds faces from about 10 pixels wide, turned up to about 45
  degrees, blurred or partly hidden, and gives the eye centres, nose tip
  and mouth corners used for the aligned crop (`affjax.face.crop`). On the
  measurements of `benchmarks/face_detectors.py` (table in
  benchmarks/README.md) it found more real faces than OpenCV's Haar
  cascade, dlib's HOG, MTCNN and BlazeFace, at a fraction of their cost.
  """

  def __init__(self, settings: YuNetSettings | None = None):
    self._yuface = _import_yuface()
    self._cv2 = _import_cv2()
    self.settings = settings or YuNetSettings()

  def detect(self, frame: np.ndarray) -> Detections:
    """Finds faces.

    Args:
      frame: uint8 `[H, W, 3]` RGB or `[H, W]` grey image.

    Returns:
      The faces, best first (by confidence), with landmarks.
    """
    cv2, s = self._cv2, self.settings
    frame = np.asarray(frame)
    if frame.ndim == 2:
      bgr = cv2.cvtColor(
        np.ascontiguousarray(frame, np.uint8), cv2.COLOR_GRAY2BGR
      )
    elif frame.ndim == 3 and frame.shape[2] == 3:
      bgr = np.ascontiguousarray(frame[:, :, ::-1], np.uint8)
    else:
      raise ValueError(
        f"frame must be [H, W, 3] or [H, W], got shape {frame.shape}"
      )
    h, w = bgr.shape[:2]
    scale = 1.0
    if s.max_side and max(h, w) > s.max_side:
      scale = s.max_side / max(h, w)
      bgr = cv2.resize(
        bgr,
        (max(1, round(w * scale)), max(1, round(h * scale))),
        interpolation=cv2.INTER_AREA,
      )
    # The library returns one int16 row per face: confidence (0-100), box
    # (x, y, w, h), 5 landmarks (x, y) and a trailing field.
    rows = np.asarray(self._yuface.c_detect(bgr), np.float32).reshape(-1, 16)
    rows = rows[rows[:, 0] >= 100 * s.min_score]
    if not len(rows):
      return Detections.empty()
    rows = rows[np.argsort(-rows[:, 0], kind="stable")]
    boxes = rows[:, 1:5].copy()
    boxes[:, 2:] += boxes[:, :2]
    landmarks = rows[:, 5:15].reshape(-1, 5, 2)
    landmarks = (landmarks / scale).astype(np.float32) if s.landmarks else None
    return Detections(boxes / scale, rows[:, 0] / 100, landmarks)


DETECTORS = ("yunet", "haar")


def make_detector(
  name: str | None = None, *, drawn_faces: bool = False
) -> HaarFaceDetector | YuNetFaceDetector:
  """The face detector `name` ('yunet' or 'haar') with default settings.

  Without a name: YuNet, or the Haar cascade with a warning where `yuface`
  cannot be installed (its wheels are for CPython <= 3.11 on x86-64 Linux
  and Windows). `drawn_faces=True` sets YuNet up for a model trained on the
  synthetic drawn faces: no landmarks, so crops are squares around its
  boxes as the generator's crops are, and the lower score drawn faces get.
  (The Haar cascade never gives landmarks.)
  """
  if name is None:
    try:
      _import_yuface()
      name = "yunet"
    except ImportError as e:
      logging.warning("%s; using the Haar cascade, which finds fewer faces", e)
      name = "haar"
  if name == "yunet":
    if drawn_faces:
      return YuNetFaceDetector(YuNetSettings(min_score=0.2, landmarks=False))
    return YuNetFaceDetector()
  if name == "haar":
    return HaarFaceDetector()
  raise ValueError(
    f"unknown face detector {name!r}, expected one of {DETECTORS}"
  )
