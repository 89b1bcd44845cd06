"""Tests of the landmark detector, landmark tracking and the aligned crop."""

import os

import numpy as np
import pytest
from PIL import Image

from affjax import face
from affjax.face import align, tracking

# Eileen Collins' NASA portrait (public domain, as shipped by scikit-image),
# face region downscaled to 160x160.
ASTRONAUT = os.path.join(
  os.path.dirname(__file__), "data", "astronaut_face.jpg"
)


# ------------------------------------------------------------- transforms


def test_similarity_of_two_points_hand_computed():
  # (0,0)->(1,1) and (1,0)->(1,3): the unit x step becomes (0, 2), i.e.
  # scale 2, rotation +90 degrees, translation (1, 1).
  m = align.similarity_transform([[0, 0], [1, 0]], [[1, 1], [1, 3]])
  np.testing.assert_allclose(m, [[0, -2, 1], [2, 0, 1]], atol=1e-12)


def test_similarity_recovers_an_exact_map_of_the_template():
  # dst = 2 * rot90(src) + (10, 5), computed by hand on the template.
  src = align.TEMPLATE_112
  dst = np.stack([-2 * src[:, 1] + 10, 2 * src[:, 0] + 5], 1)
  m = align.similarity_transform(src, dst)
  np.testing.assert_allclose(m, [[0, -2, 10], [2, 0, 5]], atol=1e-9)
  np.testing.assert_allclose(
    align.similarity_transform(src, src), np.eye(2, 3), atol=1e-12
  )


def test_similarity_never_reflects():
  # A mirrored face: the best similarity is the identity-like rotation with
  # a positive determinant, not the mirror (det -1).
  src = align.TEMPLATE_112
  mirrored = src * [-1, 1] + [112, 0]
  m = align.similarity_transform(src, mirrored)
  assert np.linalg.det(m[:, :2]) > 0


def test_similarity_rejects_bad_landmarks():
  with pytest.raises(ValueError, match="degenerate"):
    align.similarity_transform(np.ones((5, 2)), align.TEMPLATE_112)
  with pytest.raises(ValueError, match=r"\[n, 2\]"):
    align.similarity_transform(np.ones((5, 3)), np.ones((5, 3)))


def test_alignment_matrix_of_a_half_size_face():
  # Landmarks = template at half size, offset (100, 50): the crop map
  # doubles and shifts back, x' = 2x - 200, y' = 2y - 100.
  marks = align.TEMPLATE_112 / 2 + [100, 50]
  np.testing.assert_allclose(
    align.alignment_matrix(marks), [[2, 0, -200], [0, 2, -100]], atol=1e-9
  )
  # For a 56-pixel crop the template halves too: a pure shift.
  np.testing.assert_allclose(
    align.alignment_matrix(marks, 56), [[1, 0, -100], [0, 1, -50]], atol=1e-9
  )


def test_warp_affine_shift_rotation_and_outside():
  rng = np.random.default_rng(0)
  frame = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
  shift = np.array([[1.0, 0, -5], [0, 1, -7]])
  np.testing.assert_array_equal(
    align.warp_affine(frame, shift, 20), frame[7:27, 5:25]
  )
  # Output (x', y') = (19 - y, x): a quarter turn clockwise.
  turn = np.array([[0.0, -1, 19], [1, 0, 0]])
  np.testing.assert_array_equal(
    align.warp_affine(frame[:20, :20], turn, 20), np.rot90(frame[:20, :20], -1)
  )
  # Shifted 10 pixels past the right edge: those columns are zero.
  out = align.warp_affine(frame, np.array([[1.0, 0, -70], [0, 1, 0]]), 20)
  np.testing.assert_array_equal(out[:, :10], frame[:20, 70:])
  assert not out[:, 10:].any()


def test_crop_face_aligns_on_landmarks_and_falls_back_to_the_box():
  rng = np.random.default_rng(1)
  frame = rng.integers(0, 256, (200, 240, 3), dtype=np.uint8)
  marks = align.TEMPLATE_112 + [30, 20]  # template-sized face at (30, 20)
  box = np.array([40.0, 40.0, 120.0, 120.0])
  aligned = face.crop_face(frame, box, marks, size=112)
  np.testing.assert_array_equal(aligned, frame[20:132, 30:142])
  small = face.crop_face(frame, box, marks)
  expected = Image.fromarray(frame[20:132, 30:142]).resize(
    (48, 48), Image.BICUBIC
  )
  np.testing.assert_array_equal(small, np.asarray(expected))
  # Missing (NaN) landmarks: the square box crop, as without landmarks.
  np.testing.assert_array_equal(
    face.crop_face(frame, box, np.full((5, 2), np.nan)),
    face.crop_face(frame, box),
  )


# ---------------------------------------------------------------- tracking


def _det(box, marks=None, score=1.0):
  landmarks = None if marks is None else np.float32(marks)[None]
  return face.Detections(np.float32([box]), np.float32([score]), landmarks)


def test_track_carries_bridges_and_smooths_landmarks():
  box = [10, 10, 50, 50]
  m0 = align.TEMPLATE_112 / 4
  step = np.array([1.0, 0.0])
  # Landmarks move 1 px right a frame; frames 3-4 are missed (bridged) and
  # frame 7 comes from a detector without landmarks.
  dets = []
  for t in range(10):
    if t in (3, 4):
      dets.append(face.Detections.empty())
    elif t == 7:
      dets.append(_det(box))
    else:
      dets.append(_det(box, m0 + t * step))
  dets += [face.Detections.empty()] * 10 + [_det([90, 90, 99, 99], m0)]
  result = face.track(dets, face.TrackSettings(max_gap=3, smooth=3))
  expected_found = np.zeros(21, bool)
  expected_found[:10] = True
  np.testing.assert_array_equal(result.found, expected_found)
  # Linear motion survives interpolation and smoothing: frame t = m0 + t.
  for t in (0, 1, 2, 3, 4, 5, 9):
    np.testing.assert_allclose(result.landmarks[t], m0 + t * step, atol=1e-5)
  # Frame 7 had none: still none; its neighbours average around it.
  assert np.isnan(result.landmarks[7]).all()
  np.testing.assert_allclose(result.landmarks[6], m0 + 5.5 * step, atol=1e-5)
  np.testing.assert_allclose(result.landmarks[8], m0 + 8.5 * step, atol=1e-5)
  assert np.isnan(result.landmarks[10:]).all()
  boxes, found = face.track_faces(dets, face.TrackSettings(max_gap=3, smooth=3))
  np.testing.assert_array_equal(boxes, result.boxes)
  np.testing.assert_array_equal(found, result.found)


def test_select_landmarks_follow_the_selected_detection():
  a, b = [0, 0, 10, 10], [1, 0, 11, 10]
  far = [50, 50, 60, 60]
  ma, mb, mf = (np.full((5, 2), v, np.float32) for v in (1.0, 2.0, 3.0))
  second = face.Detections(
    np.float32([far, b]), np.float32([9, 5]), np.stack([mf, mb])
  )
  dets = [
    _det(a, ma),
    second,
    face.Detections(np.float32([far]), np.float32([1])),
  ]
  picks = tracking.select_detections(dets, iou_threshold=0.3)
  np.testing.assert_array_equal(picks, [0, 1, 0])
  marks = tracking.select_landmarks(dets, picks)
  np.testing.assert_array_equal(marks[0], ma)
  np.testing.assert_array_equal(marks[1], mb)  # the continuing face's
  assert np.isnan(marks[2]).all()  # a detection without landmarks


# --------------------------------------------------------------- detector


def test_yunet_finds_a_real_face_with_its_landmarks():
  frame = np.asarray(Image.open(ASTRONAUT).convert("RGB"))
  det = face.make_detector("yunet").detect(frame)
  assert len(det) == 1
  # The face box and landmarks of the 512x512 original (YuNet on it, eyes
  # and mouth checked by eye), mapped to this 160x160 crop of
  # (96, 0)-(352, 256): x' = (x - 96) * 160 / 256, y' = y * 160 / 256.
  k = 160 / 256
  expected_box = (np.array([178, 63, 267, 175]) - [96, 0, 96, 0]) * k
  expected_marks = (
    np.array([[200, 101], [247, 102], [220, 124], [198, 142], [239, 143]])
    - [96, 0]
  ) * k
  np.testing.assert_allclose(det.boxes[0], expected_box, atol=3.0)
  np.testing.assert_allclose(det.landmarks[0], expected_marks, atol=3.0)
  assert 0.5 <= det.scores[0] <= 1.0
  # Grey input works; a downscaled copy gives boxes in the input's pixels.
  grey = np.asarray(Image.open(ASTRONAUT).convert("L"))
  assert len(face.make_detector("yunet").detect(grey)) == 1
  big = np.kron(frame, np.ones((3, 3, 1), np.uint8))
  det_big = face.YuNetFaceDetector(face.YuNetSettings(max_side=160)).detect(big)
  np.testing.assert_allclose(det_big.boxes[0] / 3, det.boxes[0], atol=1.0)
  np.testing.assert_allclose(
    det_big.landmarks[0] / 3, det.landmarks[0], atol=1.0
  )


def test_yunet_rejects_noise_and_bad_input():
  detector = face.make_detector("yunet")
  noise = np.random.default_rng(0).integers(0, 256, (144, 176, 3), np.uint8)
  empty = detector.detect(noise)
  assert len(empty) == 0 and empty.landmarks.shape == (0, 5, 2)
  with pytest.raises(ValueError, match="frame must be"):
    detector.detect(np.zeros((4, 4, 4), np.uint8))
  with pytest.raises(ValueError, match="unknown face detector 'nope'"):
    face.make_detector("nope")
  with pytest.raises(ValueError, match="invalid YuNet settings"):
    face.YuNetSettings(min_score=1.5)


def test_aligned_crop_of_a_real_face_is_upright_and_on_the_template():
  # The portrait's landmarks land within 3.5 px of the template (the
  # least-squares residual of a real face), and the aligned crop, framed by
  # a grey border for context, is again found as one upright face whose
  # eyes are level and above the nose, above the mouth.
  frame = np.asarray(Image.open(ASTRONAUT).convert("RGB"))
  det = face.make_detector("yunet").detect(frame)
  m = align.alignment_matrix(det.landmarks[0])
  mapped = det.landmarks[0] @ m[:, :2].T + m[:, 2]
  np.testing.assert_allclose(mapped, align.TEMPLATE_112, atol=3.5)
  crop = face.crop_face(frame, det.boxes[0], det.landmarks[0], size=112)
  framed = Image.new("RGB", (224, 224), (128, 128, 128))
  framed.paste(Image.fromarray(crop), (56, 56))
  again = face.make_detector("yunet").detect(np.asarray(framed))
  assert len(again) == 1
  eyes, nose, mouth = (
    again.landmarks[0, :2] - 56,
    again.landmarks[0, 2] - 56,
    (again.landmarks[0, 3:] - 56),
  )
  assert abs(eyes[0, 1] - eyes[1, 1]) <= 3  # level: the roll is removed
  assert eyes[:, 1].max() < nose[1] < mouth[:, 1].min()
  np.testing.assert_allclose(eyes[:, 0], align.TEMPLATE_112[:2, 0], atol=4)


# ------------------------------------------------------------- make_crops


def test_make_crops_writes_the_missing_crop_folders(tmp_path):
  from affjax.data import synthetic
  from affjax.data.preprocess import video as video_lib
  from affjax.face import make_crops

  raw = str(tmp_path / "raw")
  synthetic.generate(
    raw,
    num_trials=3,
    seed=3,
    min_seconds=6,
    max_seconds=8,
    two_subject_videos=0,
  )
  trial = "1-25-256x192"  # the face leaves the picture for 27 frames
  crop_dir = os.path.join(raw, "cropped_aligned", trial)
  shipped = video_lib.list_crops(crop_dir)
  import shutil

  shutil.rmtree(crop_dir)
  # Drawn faces need a lower score than real ones (see YuNetSettings).
  drawn = face.YuNetFaceDetector(face.YuNetSettings(min_score=0.2))
  assert make_crops.make_crops(raw, detector=drawn) == {trial: 127}
  written = video_lib.list_crops(crop_dir)
  # Every frame the generator cropped has a crop again (its single random
  # misses are bridged), and none of the 27 face-less frames.
  assert set(shipped) <= set(written) and len(written) == 127
  assert not [n for n in os.listdir(os.path.dirname(crop_dir)) if "tmp" in n]
  with Image.open(written[min(written)]) as im:
    assert im.size == (112, 112)
  assert make_crops.make_crops(raw, detector=drawn) == {}  # nothing to do


def test_make_detector_falls_back_to_haar_without_yuface(monkeypatch):
  from affjax.face import detector as detector_lib

  def missing():
    raise ImportError("no yuface here")

  monkeypatch.setattr(detector_lib, "_import_yuface", missing)
  assert isinstance(face.make_detector(), face.HaarFaceDetector)
  with pytest.raises(ImportError, match="no yuface"):
    face.make_detector("yunet")


def test_drawn_face_settings_and_thread_variable_left_alone(monkeypatch):
  from affjax.face import detector as detector_lib

  drawn = face.make_detector(drawn_faces=True)
  assert drawn.settings.min_score == 0.2 and drawn.settings.landmarks is False
  assert face.make_detector().settings.min_score == 0.8
  # OMP_NUM_THREADS is set only while yuface is imported; a user's value
  # is kept.
  monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
  detector_lib._import_yuface()
  assert "OMP_NUM_THREADS" not in os.environ
  monkeypatch.setenv("OMP_NUM_THREADS", "2")
  detector_lib._import_yuface()
  assert os.environ["OMP_NUM_THREADS"] == "2"
