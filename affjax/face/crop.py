"""`cropped_aligned`-like face crops, resized as the feature cache.

With landmarks (`YuNetFaceDetector`) the crop is aligned like Aff-Wild2's:
the five landmarks mapped onto the ArcFace 112x112 template by a similarity
transform (`affjax.face.align`). Without them (the Haar cascade, or a
bridged gap whose ends lack landmarks) it falls back to the square box crop
below.

The training frames are the dataset's 112x112 face crops resized to 48x48
(bicubic, `affjax.data.preprocess.video.load_frames`); the model then sees
the centre 40x40. Here a detector box becomes such a crop: a square of side
`CROP_SCALE` x the box width, centred `CROP_Y_SHIFT` x the width above the
box centre, cut out of the frame (zero pixels outside it), resized to
112x112 (bilinear, as the synthetic generator's crops) and then to 48x48
(bicubic, as the cache).

The two constants were fitted on the synthetic generator's videos, whose
exact crop boxes are known: over 472 frames the `frontalface_alt2` box width
relates to the crop as side = 1.162 (sd 0.047) x width and centre offset
-0.063 (sd 0.016) x width. For a real face the same geometry gives the
usual aligned crop (forehead to chin, ears at the edges), close to the
112x112 ArcFace-style crops of Aff-Wild2. There is no in-plane rotation
alignment in this fallback (a box has no orientation).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from affjax.face import align

CROP_SCALE = 1.16
CROP_Y_SHIFT = -0.06
ALIGNED_SIZE = 112  # side of Aff-Wild2's cropped_aligned images
FRAME_SIZE = 48  # side of the feature cache's frames


def square_box(
  box: np.ndarray, scale: float = CROP_SCALE, y_shift: float = CROP_Y_SHIFT
) -> np.ndarray:
  """Detector box(es) `[..., 4]` (x0, y0, x1, y1) -> square crop box(es).

  The square has side `scale * width` and its centre is the box centre moved
  by `y_shift * width` vertically (negative = up).
  """
  box = np.asarray(box, np.float64)
  w = box[..., 2] - box[..., 0]
  cx = (box[..., 0] + box[..., 2]) / 2
  cy = (box[..., 1] + box[..., 3]) / 2 + y_shift * w
  half = scale * w / 2
  return np.stack([cx - half, cy - half, cx + half, cy + half], -1)


def crop_face(
  frame: np.ndarray,
  box: np.ndarray,
  landmarks: np.ndarray | None = None,
  *,
  scale: float = CROP_SCALE,
  y_shift: float = CROP_Y_SHIFT,
  aligned_size: int = ALIGNED_SIZE,
  size: int = FRAME_SIZE,
) -> np.ndarray:
  """The cache-like face frame for one detector box.

  Args:
    frame: uint8 `[H, W, 3]` RGB video frame.
    box: `[4]` detector box (x0, y0, x1, y1) in frame pixels.
    landmarks: optional `[5, 2]` (x, y) eye centres, nose tip and mouth
      corners (`Detections.landmarks` order); if given and all finite, the
      crop is aligned on them and `box`, `scale`, `y_shift` are unused.
    scale, y_shift: box crop geometry (see `square_box`).
    aligned_size: intermediate crop side (the dataset's crop size).
    size: output side (the cache's frame size).

  Returns:
    uint8 `[size, size, 3]`.
  """
  if landmarks is not None and np.isfinite(landmarks).all():
    matrix = align.alignment_matrix(landmarks, aligned_size)
    crop = Image.fromarray(align.warp_affine(frame, matrix, aligned_size))
    if size != aligned_size:
      crop = crop.resize((size, size), Image.BICUBIC)
    return np.asarray(crop, np.uint8)
  square = np.round(square_box(box, scale, y_shift)).astype(int)
  if square[2] <= square[0] or square[3] <= square[1]:
    raise ValueError(f"empty face box {np.asarray(box).tolist()}")
  # PIL fills the part of the crop outside the frame with zeros.
  crop = Image.fromarray(np.asarray(frame, np.uint8)).crop(tuple(square))
  crop = crop.resize((aligned_size, aligned_size), Image.BILINEAR)
  if size != aligned_size:
    crop = crop.resize((size, size), Image.BICUBIC)
  return np.asarray(crop, np.uint8)
