"""Tests of affjax.face: Haar detector, tracking and crop geometry."""

import os

import av
import numpy as np
import pytest

from affjax import face
from affjax.data.preprocess import video as video_lib
from affjax.face import crop as crop_lib
from affjax.face import tracking

TRIAL = "1-25-256x192"  # 154 frames, the face leaves the picture 27 of them


def _missing_runs(mask, min_len):
  """Bool [T]: frames in runs of >= min_len consecutive False of `mask`."""
  out = np.zeros(len(mask), bool)
  for start, end in tracking._runs(~mask):
    if end - start >= min_len:
      out[start:end] = True
  return out


@pytest.fixture(scope="module")
def synthetic_video(video_raw):
  """Frames, detections and the generator's face crops of one trial."""
  root = video_raw  # the session's (tests/conftest.py)
  with av.open(os.path.join(root, "videos", TRIAL + ".mp4")) as container:
    frames = np.stack(
      [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    )
  crops = video_lib.list_crops(os.path.join(root, "cropped_aligned", TRIAL))
  reference, has_crop = video_lib.load_frames(crops, len(frames), 48)
  detector = face.HaarFaceDetector()
  detections = [detector.detect(f) for f in frames]
  # The generator leaves out the crop where the face is absent (runs of
  # >= 10 frames) and, at random, in 2% of single frames where it is drawn.
  absent = _missing_runs(has_crop, 3)
  return {
    "frames": frames,
    "reference": reference,
    "has_crop": has_crop,
    "absent": absent,
    "detections": detections,
  }


def test_detector_finds_drawn_faces_and_nothing_else(synthetic_video):
  v = synthetic_video
  found = np.array([len(d) > 0 for d in v["detections"]])
  assert v["absent"].sum() >= 20  # the fixture really has face-less frames
  assert not found[v["absent"]].any()
  present = ~v["absent"]
  assert found[present].mean() >= 0.97
  # At most one face per frame (one subject drawn), best first by score.
  assert max(len(d) for d in v["detections"]) == 1


def test_detector_boxes_match_the_generator_crops(synthetic_video):
  # Our crop of a detected face vs the generator's crop of the same frame
  # (both 48x48): close, and much closer than a crop shifted by 10%.
  v = synthetic_video
  boxes, found = face.track_faces(v["detections"])
  both = np.flatnonzero(found & v["has_crop"])
  assert len(both) >= 100
  ours, shifted = [], []
  for i in both[::4]:
    ref = v["reference"][i].astype(np.float64)
    ours.append(np.abs(face.crop_face(v["frames"][i], boxes[i]) - ref).mean())
    moved = boxes[i] + np.array([1, 0, 1, 0]) * 0.1 * (
      boxes[i, 2] - boxes[i, 0]
    )
    shifted.append(np.abs(face.crop_face(v["frames"][i], moved) - ref).mean())
  assert np.mean(ours) < 14.0, np.mean(ours)
  assert np.mean(shifted) > 1.5 * np.mean(ours)


def test_tracking_marks_exactly_the_absent_frames(synthetic_video):
  v = synthetic_video
  _, found = face.track_faces(v["detections"])
  np.testing.assert_array_equal(found, ~v["absent"])


def test_detector_rejects_non_faces_and_bad_input():
  detector = face.HaarFaceDetector()
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 256, (192, 256, 3), dtype=np.uint8)
  assert len(detector.detect(noise)) == 0
  assert len(detector.detect(np.zeros((120, 160), np.uint8))) == 0
  with pytest.raises(ValueError, match="frame must be"):
    detector.detect(np.zeros((4, 4, 4, 3), np.uint8))


def test_detector_downscales_and_returns_input_pixels(synthetic_video):
  # A 4x upscaled frame is detected on a <= 480 px copy; the box comes back
  # in the large frame's pixels, 4x the box found in the original.
  v = synthetic_video
  i = int(np.flatnonzero(~v["absent"])[0])
  small = v["detections"][i].boxes[0]
  big_frame = np.kron(v["frames"][i], np.ones((4, 4, 1), np.uint8))
  settings = face.DetectorSettings(max_side=256)
  big = face.HaarFaceDetector(settings).detect(big_frame)
  assert len(big) == 1
  np.testing.assert_allclose(big.boxes[0] / 4, small, atol=4.0)


def test_missing_cascade_is_a_clear_error(tmp_path):
  path = str(tmp_path / "nope.xml")
  with pytest.raises(FileNotFoundError, match="nope.xml"):
    face.HaarFaceDetector(face.DetectorSettings(cascade=path))


# ---------------------------------------------------------------- geometry


def test_square_box_hand_computed():
  # Box 100 wide centred (60, 70): side 116, centre moved up 6 px.
  box = np.array([10.0, 20.0, 110.0, 120.0])
  np.testing.assert_allclose(face.square_box(box), [2.0, 6.0, 118.0, 122.0])
  np.testing.assert_allclose(face.square_box(box, scale=1.0, y_shift=0.0), box)
  assert (face.CROP_SCALE, face.CROP_Y_SHIFT) == (1.16, -0.06)


def test_crop_face_is_the_slice_and_zero_outside():
  rng = np.random.default_rng(1)
  frame = rng.integers(1, 256, (90, 120, 3), dtype=np.uint8)
  inside = np.array([30.0, 20.0, 70.0, 60.0])  # 40x40, no resize at 40
  out = face.crop_face(
    frame, inside, scale=1.0, y_shift=0.0, aligned_size=40, size=40
  )
  np.testing.assert_array_equal(out, frame[20:60, 30:70])
  # Half outside the top-left corner: that quarter is zeros.
  corner = np.array([-20.0, -20.0, 20.0, 20.0])
  out = face.crop_face(
    frame, corner, scale=1.0, y_shift=0.0, aligned_size=40, size=40
  )
  assert not out[:20, :].any() and not out[:, :20].any()
  np.testing.assert_array_equal(out[20:, 20:], frame[:20, :20])


def test_crop_face_resizes_like_the_cache():
  # 112 bilinear, then 48 bicubic: same as resizing a generator crop.
  from PIL import Image

  rng = np.random.default_rng(2)
  frame = rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)
  box = np.array([50.0, 60.0, 250.0, 260.0])
  out = face.crop_face(frame, box, scale=1.0, y_shift=0.0)
  assert out.shape == (48, 48, 3) and out.dtype == np.uint8
  expected = (
    Image.fromarray(frame[60:260, 50:250])
    .resize((112, 112), Image.BILINEAR)
    .resize((48, 48), Image.BICUBIC)
  )
  np.testing.assert_array_equal(out, np.asarray(expected))
  with pytest.raises(ValueError, match="empty face box"):
    face.crop_face(frame, np.array([5.0, 5.0, 5.0, 9.0]))
  assert crop_lib.FRAME_SIZE == 48 and crop_lib.ALIGNED_SIZE == 112


# ---------------------------------------------------------------- tracking


def _det(*boxes_scores):
  if not boxes_scores:
    return face.Detections.empty()
  boxes = np.array([b for b, _ in boxes_scores], np.float32)
  scores = np.array([s for _, s in boxes_scores], np.float32)
  return face.Detections(boxes, scores)


def test_iou_hand_computed():
  a = np.array([0.0, 0.0, 10.0, 10.0])
  b = np.array([5.0, 0.0, 15.0, 10.0])
  assert tracking.iou(a, b) == pytest.approx(50 / 150)
  assert tracking.iou(a, a + 20) == 0.0


def test_selection_follows_the_track_not_the_best_score():
  a = [0, 0, 10, 10]
  far = [50, 50, 60, 60]
  dets = [_det((a, 10)), _det((far, 30), ([1, 0, 11, 10], 5)), _det((far, 9))]
  boxes, found = tracking.select_boxes(dets, iou_threshold=0.3)
  np.testing.assert_array_equal(found, [True, True, True])
  np.testing.assert_array_equal(boxes[1], [1, 0, 11, 10])  # continuity
  np.testing.assert_array_equal(boxes[2], far)  # lost: best detection


def test_bridge_gaps_interpolates_short_gaps_only():
  boxes = np.zeros((12, 4))
  found = np.zeros(12, bool)
  boxes[0], boxes[4] = [0, 0, 10, 10], [4, 0, 14, 10]
  found[[0, 4]] = True
  boxes[5], boxes[11] = [4, 0, 14, 10], [4, 0, 14, 10]
  found[[5, 11]] = True  # gap 6..10 is 5 frames long
  out, f = tracking.bridge_gaps(boxes, found, max_gap=4)
  np.testing.assert_array_equal(f, [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1])
  np.testing.assert_allclose(out[1:4, 0], [1, 2, 3])
  np.testing.assert_allclose(out[1:4, 2], [11, 12, 13])
  # A face that jumps is not bridged.
  boxes[4] = boxes[5] = [100, 100, 110, 110]
  _, f = tracking.bridge_gaps(boxes, found, max_gap=4)
  assert not f[1:4].any()


def test_short_runs_are_dropped_and_smoothing():
  found = np.array([1, 0, 0, 0, 1, 1, 1, 1, 1, 0], bool)
  boxes = np.zeros((10, 4))
  boxes[found] = [10, 10, 20, 20]
  _, f = tracking.drop_short_runs(boxes, found, min_run=3)
  np.testing.assert_array_equal(f, [0, 0, 0, 0, 1, 1, 1, 1, 1, 0])
  # Linear motion is unchanged; alternating jitter is averaged out.
  found = np.ones(7, bool)
  x = np.array([0, 2, 0, 2, 0, 2, 0], np.float64)
  boxes = np.stack([x, x, x + 10, x + 10], 1)
  out = tracking.smooth_boxes(boxes, found, window=3)
  np.testing.assert_allclose(out[1:-1, 0], [2 / 3, 4 / 3, 2 / 3, 4 / 3, 2 / 3])
  np.testing.assert_allclose(out[[0, -1], 0], [0, 0])  # run ends kept
  lin = np.arange(7.0)
  boxes = np.stack([lin, lin, lin + 10, lin + 10], 1)
  np.testing.assert_allclose(tracking.smooth_boxes(boxes, found, 5), boxes)


def test_track_faces_end_to_end_on_hand_detections():
  box = [10, 10, 30, 30]
  dets = (
    [_det((box, 10))] * 5
    + [_det()] * 2
    + [_det((box, 10))] * 5
    + [_det()] * 10
    + [_det(([100, 100, 120, 120], 4))]
    + [_det()] * 3
  )
  boxes, found = face.track_faces(dets, face.TrackSettings(max_gap=3))
  expected = np.zeros(26, bool)
  expected[:12] = True  # the 2-frame gap bridged, the lone detection dropped
  np.testing.assert_array_equal(found, expected)
  np.testing.assert_allclose(boxes[:12], np.tile(box, (12, 1)))
  assert not boxes[12:].any() and boxes.dtype == np.float32
  with pytest.raises(ValueError, match="invalid track settings"):
    face.TrackSettings(min_run=0)
