"""Face detection, tracking and cropping for prediction on arbitrary videos.

Training reads the face crops of the dataset (`cropped_aligned`); a user's
video has none, so `affjax.predict` finds the face itself:

* `detector`: OpenCV's Haar cascade `haarcascade_frontalface_alt2` (its
  weights ship inside the `opencv-python-headless` 4.x wheel, so nothing is
  downloaded at run time);
* `tracking`: one face track per video (continuity by overlap), short
  detection gaps bridged by interpolation, isolated detections dropped,
  boxes smoothed over time;
* `crop`: the square, `cropped_aligned`-like crop around a detection, resized
  as the feature cache was (112x112 bilinear, then 48x48 bicubic).
"""

from affjax.face.crop import CROP_SCALE, CROP_Y_SHIFT, crop_face, square_box
from affjax.face.detector import Detections, DetectorSettings, HaarFaceDetector
from affjax.face.tracking import TrackSettings, track_faces

__all__ = [
  "CROP_SCALE",
  "CROP_Y_SHIFT",
  "Detections",
  "DetectorSettings",
  "HaarFaceDetector",
  "TrackSettings",
  "crop_face",
  "square_box",
  "track_faces",
]
