"""Video probing (PyAV) and cropped-aligned face frames.

A trial's length is the number of frames of its video. It is read from the
container's frame count (the mp4 sample table / avi header, as the reference
read OpenCV's `CAP_PROP_FRAME_COUNT`), or by counting the demuxed video
packets when the container does not record it. No pixel is decoded: the face
frames come from the `cropped_aligned` images.
"""

import dataclasses
import os
import re

import numpy as np
from PIL import Image

_CROP_NAME = re.compile(r"^(\d+)\.(jpg|jpeg|png)$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  n_frames: int
  fps: float
  has_audio: bool


def probe_video(path: str) -> VideoInfo:
  """Frame count, frame rate and audio presence of a video file.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: the file cannot be opened or demuxed, has no video stream,
      no frames or no frame rate; the message names the file.
  """
  import av  # pylint: disable=g-import-not-at-top

  if not os.path.isfile(path):
    raise FileNotFoundError(f"video {path} does not exist")
  try:
    with av.open(path) as container:
      if not container.streams.video:
        raise ValueError(f"{path}: the file has no video stream")
      stream = container.streams.video[0]
      rate = stream.average_rate or stream.guessed_rate or stream.base_rate
      n_frames = int(stream.frames or 0)
      if n_frames <= 0:
        n_frames = sum(1 for p in container.demux(stream) if p.size)
      has_audio = bool(container.streams.audio)
  except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
    raise ValueError(
      f"{path}: unreadable or corrupt video ({type(e).__name__}: {e})"
    ) from e
  if n_frames <= 0 or not rate or float(rate) <= 0:
    raise ValueError(
      f"{path}: corrupt video (found {n_frames} frames at frame rate {rate})"
    )
  return VideoInfo(n_frames=n_frames, fps=float(rate), has_audio=has_audio)


def list_crops(crop_dir: str) -> dict[int, str]:
  """Face-crop files of a trial: {0-based frame index: path}.

  Files are named by 1-based frame number (`00001.jpg`); other files are
  ignored.

  Raises:
    FileNotFoundError: `crop_dir` does not exist.
  """
  if not os.path.isdir(crop_dir):
    raise FileNotFoundError(f"face-crop directory {crop_dir} does not exist")
  crops = {}
  for name in os.listdir(crop_dir):
    match = _CROP_NAME.match(name)
    if match and int(match.group(1)) >= 1:
      crops[int(match.group(1)) - 1] = os.path.join(crop_dir, name)
  return crops


def load_frames(
  crops: dict[int, str], n_frames: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
  """Loads the face crops of frames 0..n_frames-1, resized to `size`.

  Args:
    crops: from `list_crops`; crops beyond `n_frames` are ignored.
    n_frames: trial length.
    size: output side in pixels (48 for the reference's cache).

  Returns:
    frames `[n_frames, size, size, 3]` uint8 (zeros where no crop) and
    face_mask `[n_frames]` bool (True where a crop exists).

  Raises:
    ValueError: a crop cannot be decoded (names the file).
  """
  frames = np.zeros((n_frames, size, size, 3), np.uint8)
  mask = np.zeros(n_frames, bool)
  for index, path in crops.items():
    if index >= n_frames:
      continue
    try:
      with Image.open(path) as image:
        image = image.convert("RGB")
        if image.size != (size, size):
          # Bicubic: Pillow's default `resize`, which the reference used.
          image = image.resize((size, size), Image.BICUBIC)
        frames[index] = np.asarray(image)
    except OSError as e:
      raise ValueError(f"{path}: unreadable face crop ({e})") from e
    mask[index] = True
  return frames, mask
