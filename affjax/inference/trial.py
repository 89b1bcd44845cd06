r"""Whole-trial inference: each frame once, instead of overlapping windows.

Evaluation in the reference (and `train.evaluate_split`) predicts 300-frame
windows every 200 frames and averages the overlaps, so every frame is
computed about 1.5 times. In eval mode every part of the model is either
per-frame or causal:

* the backbone sees one frame at a time (BatchNorm uses running statistics,
  dropout is off), so a frame's embedding does not depend on its window;
* the TCNs are causal with a receptive field of
  `1 + 2 (kernel - 1) (2**levels - 1)` frames (121 for the paper's kernel 5
  and 4 levels): the output at frame t reads input frames t-120..t only;
* the fusion (attention across streams, LayerNorm over `[streams, d]`) and
  the regressor act on each frame separately.

So running the model over a whole trial gives, at frame t, exactly what a
window starting at s gives whenever `t - s >= receptive_field - 1` (or
s = 0, where both see the same zero padding of the causal convolutions). In
a window's first `receptive_field - 1` frames the window's prediction
differs: the convolutions see zero padding instead of the frames before s.
After stitching (averaging windows), the frames whose stitched prediction
equals the whole-trial one are given by `identical_frames`; with the
reference's 300/200 windows those are all frames except
`[200 k, 200 k + 120)` for k >= 1. Whole-trial inference is the
reference's prediction without the window-start artefact.

How it runs (static shapes, one compilation):

1. With `frames` input the backbone is split off and applied to the frames
   of all trials in fixed-size flat batches (`embed.embed_frames`): once per
   frame, not 1.5 times.
2. The rest (TCNs + fusion, on `embeddings`) runs over chunks of
   `chunk_length` frames plus `receptive_field - 1` frames of left context
   (the first chunk of a trial needs none), packed across trials into
   `[batch_size, chunk_length + context]` batches; only the outputs with a
   full causal history are kept. Trailing padding is harmless (causal).
   This is the windowed path of `affjax.inference.windows.predict_trials`
   with chunks instead of overlapping windows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from affjax import embed as embed_lib
from affjax.inference import windows
from affjax.models import tcn

Array = jax.Array
Trial = Mapping[str, np.ndarray]  # model input key -> [T, ...]
Variables = Mapping[str, Any]
plan_chunks = windows.plan_chunks


def receptive_field(model: Any) -> int:
  """Frames the output at t depends on (t and the ones before), all TCNs."""
  levels = [len(model.visual_channels)]
  if getattr(model, "audio_features", ()):
    levels.append(len(model.audio_channels))
  return tcn.receptive_field(model.kernel_size, max(levels))


def input_keys(model: Any) -> tuple[str, ...]:
  """Per-trial arrays the model reads: visual input, then audio streams."""
  return (model.visual_input,) + tuple(
    name for name, _ in getattr(model, "audio_features", ())
  )


def identical_frames(
  length: int, starts: Sequence[int], window: int, field: int
) -> np.ndarray:
  """Frames where stitched window predictions equal whole-trial ones.

  Args:
    length: trial length, frames.
    starts: window starts (e.g. `affjax.data.stitch.window_starts`).
    window: window length, frames.
    field: the model's receptive field (`receptive_field(model)`).

  Returns:
    `[length]` bool: True where every window covering the frame either starts
    at 0 or started at least `field - 1` frames earlier.
  """
  ok = np.ones(length, bool)
  covered = np.zeros(length, bool)
  for s in starts:
    covered[s : s + window] = True
    if s > 0:
      ok[s : min(s + field - 1, length)] = False
  return ok & covered


def split_backbone(
  model: Any, variables: Variables
) -> tuple[Any, dict[str, Any] | None, Any, dict[str, Any]]:
  """Separates the per-frame backbone from the temporal head.

  Returns:
    `(backbone, backbone_variables, head, head_variables)`: the head is the
    same model reading `embeddings`; backbone and its variables are None if
    the model already reads embeddings.
  """
  if model.visual_input == "embeddings":
    return None, None, model, dict(variables)
  head_vars, backbone_vars = {}, {}
  for collection, tree in variables.items():
    tree = dict(tree)
    if "backbone" in tree:
      backbone_vars[collection] = tree.pop("backbone")
    if tree:
      head_vars[collection] = tree
  head = model.clone(backbone=None, visual_input="embeddings")
  return model.backbone, backbone_vars, head, head_vars


@dataclasses.dataclass
class TrialPredictor:
  """Whole-trial predictions with fixed compiled shapes.

  Build with `make_trial_predictor`; call with a sequence of trials (dicts of
  `[T_i, ...]` model inputs, e.g. `frames` or `embeddings` plus the audio
  features, normalised as the pipeline does) to get `[T_i, num_outputs]`
  float32 predictions. `traces` counts compilations of the head and backbone
  functions (each should stay at 1 whatever the trial lengths).
  """

  head_fn: Callable[[dict[str, np.ndarray]], Array]
  backbone_fn: Callable[[np.ndarray], Array] | None
  keys: tuple[str, ...]
  chunk_length: int
  context: int
  batch_size: int
  frame_batch_size: int
  num_outputs: int
  traces: dict[str, int]

  def __call__(self, trials: Sequence[Trial]) -> list[np.ndarray]:
    trials = [self._check(i, t) for i, t in enumerate(trials)]
    if self.backbone_fn is not None:
      embedded = embed_lib.embed_frames(
        self.backbone_fn,
        ((i, t["frames"]) for i, t in enumerate(trials)),
        self.frame_batch_size,
      )
      for i, emb in embedded:
        trials[i] = {
          **{k: v for k, v in trials[i].items() if k != "frames"},
          "embeddings": emb,
        }
    if not any(len(t["embeddings"]) for t in trials):
      return [np.zeros((0, self.num_outputs), np.float32) for _ in trials]
    keys = tuple(trials[0])
    preds = windows.predict_trials(
      lambda batch: self.head_fn({k: batch[k] for k in keys}),
      trials,
      window=self.chunk_length,
      context=self.context,
      batch_size=self.batch_size,
    )
    # Each frame is kept from exactly one chunk: the float32 output itself.
    return [p.astype(np.float32) for p in preds]

  def _check(self, index: int, trial: Trial) -> dict[str, np.ndarray]:
    missing = [k for k in self.keys if k not in trial]
    if missing:
      raise ValueError(
        f"trial {index} lacks model inputs {missing}; found {sorted(trial)}."
      )
    lengths = {k: len(trial[k]) for k in self.keys}
    if len(set(lengths.values())) > 1:
      raise ValueError(
        f"trial {index}: inputs differ in length (frames): {lengths}."
      )
    return {k: np.asarray(trial[k]) for k in self.keys}


def make_trial_predictor(
  model: Any,
  variables: Variables,
  *,
  chunk_length: int = 2048,
  batch_size: int = 4,
  frame_batch_size: int = 256,
) -> TrialPredictor:
  """Builds a `TrialPredictor` for `model` (AVLeaderFollower / VisualOnly).

  Args:
    model: the Flax model (eval mode is used).
    variables: its variables.
    chunk_length: new frames per chunk; each chunk also reads
      `receptive_field - 1` frames of context, so longer chunks waste less.
    batch_size: chunks per head call.
    frame_batch_size: frames per backbone call (`frames` models only).
  """
  backbone, backbone_vars, head, head_vars = split_backbone(model, variables)
  traces = {"head": 0, "backbone": 0}

  @jax.jit
  def head_apply(variables, batch):
    traces["head"] += 1
    return head.apply(variables, batch, train=False)

  head_vars = jax.device_put(head_vars)
  backbone_fn = None
  if backbone is not None:

    @jax.jit
    def backbone_apply(variables, frames):
      traces["backbone"] += 1
      return backbone.apply(variables, frames, train=False)

    backbone_vars = jax.device_put(backbone_vars)
    backbone_fn = lambda frames: backbone_apply(backbone_vars, frames)
  return TrialPredictor(
    head_fn=lambda batch: head_apply(head_vars, batch),
    backbone_fn=backbone_fn,
    keys=input_keys(model),
    chunk_length=int(chunk_length),
    context=receptive_field(model) - 1,
    batch_size=int(batch_size),
    frame_batch_size=int(frame_batch_size),
    num_outputs=int(model.num_outputs),
    traces=traces,
  )
