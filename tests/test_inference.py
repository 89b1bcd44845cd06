"""Tests for affjax.inference: whole-trial vs windowed predictions."""

import jax
import numpy as np
import pytest

from affjax.data import stitch
from affjax.inference import trial as inference
from affjax.models import av_model, iresnet

AUDIO = (("vggish", 6), ("mfcc", 5))
FIELD = 13  # kernel 3, 2 levels: 1 + 2 * 2 * (2**2 - 1)


def _model(visual_input):
  return av_model.AVLeaderFollower(
    backbone=iresnet.IRTiny() if visual_input == "frames" else None,
    visual_input=visual_input,
    audio_features=AUDIO,
    visual_channels=(8, 8),
    audio_channels=(4, 4),
    kernel_size=3,
    fusion_dim=4,
    num_outputs=2,
  )


def _trial(visual_input, length, seed):
  rng = np.random.default_rng(seed)
  if visual_input == "frames":
    visual = rng.uniform(-1, 1, (length, 40, 40, 3))
  else:
    visual = rng.normal(size=(length, 512))
  trial = {visual_input: visual.astype(np.float32)}
  for name, dim in AUDIO:
    trial[name] = rng.normal(size=(length, dim)).astype(np.float32)
  return trial


def _init(model, trial, seed=0):
  """Random variables from numpy (compiling flax's init takes ~10-25 s)."""
  batch = {k: v[None, :4] for k, v in trial.items()}
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), batch, train=False)
  )
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "'var'" in name:  # BatchNorm variances must be positive
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    scale = 0.05 if "backbone" in name else 0.3
    return (scale * rng.normal(size=leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _windowed(model, variables, trials, window, hop):
  """Per trial: [(start, window predictions [window, C]), ...], one call."""
  rows, index = {k: [] for k in trials[0]}, []
  for i, trial in enumerate(trials):
    length = len(next(iter(trial.values())))
    for s in stitch.window_starts(length, window, hop):
      for k, v in trial.items():
        piece = np.zeros((window, *v.shape[1:]), np.float32)
        piece[: len(v[s : s + window])] = v[s : s + window]
        rows[k].append(piece)
      index.append((i, s))
  batch = {k: np.stack(v) for k, v in rows.items()}
  out = np.asarray(
    jax.jit(lambda v, b: model.apply(v, b, train=False))(variables, batch)
  )
  per_trial = [[] for _ in trials]
  for (i, s), pred in zip(index, out):
    per_trial[i].append((s, pred))
  return per_trial


def _check_against_windows(whole, windows, length, window):
  """Equal where the window saw a full history; different at its start."""
  compared = 0
  for s, pred in windows:
    for t in range(s, min(s + window, length)):
      if s == 0 or t - s >= FIELD - 1:
        np.testing.assert_allclose(
          pred[t - s],
          whole[t],
          rtol=1e-4,
          atol=2e-5,
          err_msg=f"frame {t}, start {s}",
        )
        compared += 1
    if s > 0:  # the window's first frame sees zero padding instead
      assert np.abs(pred[0] - whole[s]).max() > 1e-4
  return compared


def test_plan_chunks_hand_cases():
  assert inference.plan_chunks(10, 4, 3) == [(0, 0, 7), (4, 7, 10)]
  assert inference.plan_chunks(5, 4, 3) == [(0, 0, 5)]
  assert inference.plan_chunks(0, 4, 3) == []
  assert inference.plan_chunks(16, 4, 3) == [
    (0, 0, 7),
    (4, 7, 11),
    (8, 11, 15),
    (12, 15, 16),
  ]
  for length in range(1, 40):
    plan = inference.plan_chunks(length, 5, 12)
    kept = np.concatenate([np.arange(a, b) for _, a, b in plan])
    np.testing.assert_array_equal(kept, np.arange(length))
    for start, keep_start, _ in plan:
      assert start == 0 or keep_start - start == 12
  with pytest.raises(ValueError, match="chunk_length >= 1"):
    inference.plan_chunks(10, 0, 3)


def test_windows_and_identical_frames():
  assert stitch.window_starts(1000, 300, 200).tolist() == [
    0,
    200,
    400,
    600,
    700,
  ]
  assert stitch.window_starts(800, 300, 200).tolist() == [0, 200, 400, 500]
  assert stitch.window_starts(120, 300, 200).tolist() == [0]
  ok = inference.identical_frames(1000, [0, 200, 400, 600, 700], 300, 121)
  bad = np.flatnonzero(~ok)
  want = np.concatenate([np.arange(s, s + 120) for s in (200, 400, 600, 700)])
  np.testing.assert_array_equal(bad, np.unique(want))
  assert ok.sum() == 1000 - 460  # 120 + 120 + [600, 820)


def test_receptive_field_of_paper_model():
  model = av_model.AVLeaderFollower(visual_input="embeddings")
  assert inference.receptive_field(model) == 121
  assert inference.receptive_field(_model("embeddings")) == FIELD
  assert inference.input_keys(model) == ("embeddings", "vggish", "mfcc")


def test_whole_trial_equals_windows_away_from_starts_embeddings():
  model = _model("embeddings")
  trials = [_trial("embeddings", n, i) for i, n in enumerate((57, 23, 90))]
  variables = _init(model, trials[0])
  # Short chunks: several per trial, trials sharing head batches.
  predict = inference.make_trial_predictor(
    model, variables, chunk_length=16, batch_size=3
  )
  whole = predict(trials)
  one_pass = jax.jit(lambda v, b: model.apply(v, b, train=False))(
    variables, {k: v[None] for k, v in trials[2].items()}
  )
  np.testing.assert_allclose(
    whole[2], np.asarray(one_pass)[0], rtol=1e-4, atol=2e-5
  )
  compared = 0
  for got, trial, windows in zip(
    whole, trials, _windowed(model, variables, trials, 30, 20)
  ):
    assert got.shape == (len(trial["embeddings"]), 2)
    compared += _check_against_windows(got, windows, len(got), 30)
  assert compared > 150
  # Other trial lengths reuse the compiled head: no retrace.
  predict([_trial("embeddings", 200, 7), _trial("embeddings", 0, 8)])
  assert predict.traces == {"head": 1, "backbone": 0}


def test_whole_trial_equals_windows_away_from_starts_frames():
  model = _model("frames")
  trials = [_trial("frames", n, i) for i, n in enumerate((45, 20))]
  variables = _init(model, trials[0])
  predict = inference.make_trial_predictor(
    model, variables, chunk_length=24, batch_size=2, frame_batch_size=32
  )
  whole = predict(trials)
  compared = sum(
    _check_against_windows(got, windows, len(got), 24)
    for got, windows in zip(whole, _windowed(model, variables, trials, 24, 16))
  )
  assert compared > 40
  assert predict.traces == {"head": 1, "backbone": 1}
  _, bvars, head, hvars = inference.split_backbone(model, variables)
  assert head.visual_input == "embeddings" and head.backbone is None
  assert sorted(hvars) == ["params"] and "backbone" not in hvars["params"]
  assert sorted(bvars) == ["batch_stats", "params"]


def test_missing_or_ragged_inputs_are_named():
  model = _model("embeddings")
  trial = _trial("embeddings", 10, 0)
  predict = inference.make_trial_predictor(model, _init(model, trial))
  with pytest.raises(ValueError, match=r"lacks model inputs \['mfcc'\]"):
    predict([{k: v for k, v in trial.items() if k != "mfcc"}])
  with pytest.raises(ValueError, match="differ in length"):
    predict([dict(trial, mfcc=trial["mfcc"][:5])])
