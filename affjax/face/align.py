"""Landmark-aligned face crops, as Aff-Wild2's `cropped_aligned` images.

Aff-Wild2's 112x112 crops (and ArcFace's training crops, whose IR-50 the
paper's backbone is) come from five facial landmarks mapped by a similarity
transform (rotation, uniform scale, translation) onto a fixed template: the
eye centres, the nose tip and the mouth corners land on the same pixels of
every crop, whatever the head's roll, size and position in the frame.

Here the landmarks come from the detector (`YuNetFaceDetector`); the
transform is the least-squares similarity (Umeyama's method, no
reflection), the crop is warped bilinearly with zeros outside the frame
and then resized as the feature cache was (48x48 bicubic). Coordinates
are pixel-centre coordinates: pixel (i, j) is the point x = j, y = i, as
in OpenCV.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# The ArcFace 112x112 template: (x, y) of the image-left eye centre,
# image-right eye centre, nose tip, image-left and image-right mouth corner.
TEMPLATE_112 = np.array(
  [
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
  ],
  np.float64,
)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """Least-squares similarity mapping points `src` onto `dst`.

  Args:
    src, dst: float `[n, 2]` (x, y) points, n >= 2, not all `src` equal.

  Returns:
    float64 `[2, 3]` matrix M with dst ~ M @ [x, y, 1], M = [s R | t],
    R a rotation (no reflection), s > 0.
  """
  src = np.asarray(src, np.float64)
  dst = np.asarray(dst, np.float64)
  if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2:
    raise ValueError(
      f"landmarks must be two [n, 2] arrays, got {src.shape} and {dst.shape}"
    )
  mu_src, mu_dst = src.mean(0), dst.mean(0)
  a, b = src - mu_src, dst - mu_dst
  var_src = (a**2).sum() / len(src)
  if not np.isfinite(var_src) or var_src <= 0:
    raise ValueError(f"degenerate landmarks {src.tolist()}")
  cov = b.T @ a / len(src)
  u, sv, vt = np.linalg.svd(cov)
  d = np.ones(2)
  if np.linalg.det(u) * np.linalg.det(vt) < 0:
    d[1] = -1.0  # the best orthogonal map would be a reflection
  rotation = u @ np.diag(d) @ vt
  scale = (sv * d).sum() / var_src
  shift = mu_dst - scale * rotation @ mu_src
  return np.concatenate([scale * rotation, shift[:, None]], 1)


def alignment_matrix(
  landmarks: np.ndarray, aligned_size: int = 112
) -> np.ndarray:
  """`[2, 3]` map from frame pixels to the aligned crop's pixels.

  Args:
    landmarks: `[5, 2]` (x, y) in the frame, in `TEMPLATE_112`'s order.
    aligned_size: side of the aligned crop (the template is scaled from 112).
  """
  template = TEMPLATE_112 * (aligned_size / 112)
  return similarity_transform(landmarks, template)


def warp_affine(frame: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
  """Bilinear `[size, size, 3]` crop: output pixel p = matrix @ frame point.

  Pixels whose source lies outside the frame are zero (as the box crop).
  """
  m = np.concatenate([np.asarray(matrix, np.float64), [[0, 0, 1]]])
  # Rounded to 1e-9 (far below a pixel): a map that is a whole-pixel shift
  # up to float error then copies pixels exactly instead of truncating
  # 105.99999 to 105.
  inv = np.round(np.linalg.inv(m)[:2], 9)
  # PIL maps output point (x + 0.5, y + 0.5) to the input by the given
  # coefficients and samples at pixel-corner coordinates: shift both ways
  # so that pixel centres are integer points, as in `matrix`.
  a, b, c = inv[0]
  d, e, f = inv[1]
  coefficients = (a, b, c + 0.5 * (1 - a - b), d, e, f + 0.5 * (1 - d - e))
  image = Image.fromarray(np.asarray(frame, np.uint8))
  out = image.transform(
    (size, size), Image.AFFINE, coefficients, resample=Image.BILINEAR
  )
  return np.asarray(out, np.uint8)
