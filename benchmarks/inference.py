r"""Whole-trial inference vs overlapping windows: cost and agreement.

One trial of `--frames` frames through the paper's model (random weights),
two ways:

* windows: 300-frame windows every 200 frames (`affjax.data.stitch`'s
  starts, as `train.evaluate_split` cuts them), `--batch` windows per jitted
  eval call (the last call padded), overlaps averaged;
* whole trial: `affjax.inference.trial.make_trial_predictor` (backbone once per
  frame, TCNs + fusion over one chunk with receptive-field context).

Both are timed in alternation (medians, host work included, compiled
beforehand). Printed: the cost ratio windows / whole trial, and the max abs
difference of the predictions on the frames `inference.identical_frames`
marks (those at least `receptive_field - 1` frames past every window start
covering them), and for information on the others (the window-start
artefact). `--input=embeddings` runs the head only (cached-embedding mode),
`frames` the IR-50 model.

  python -m benchmarks.inference --input=embeddings --frames=3000
  python -m benchmarks.inference --input=frames --frames=1000 --repeats=2
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import numpy as np

from benchmarks import harness

WINDOW, HOP = 300, 200


def windowed_predictor(model, variables, batch_size: int):
  """Overlapping-window prediction of one trial, overlaps averaged.

  Returns:
    `(predict, starts)`: trial dict -> `[T, outputs]`, and length -> the
    window starts used.
  """
  from affjax.data import stitch  # pylint: disable=g-import-not-at-top

  apply = jax.jit(lambda v, b: model.apply(v, b, train=False))

  def predict(trial):
    length = len(next(iter(trial.values())))
    starts = stitch.window_starts(length, WINDOW, HOP)
    # Pad the row count to a multiple of the batch: one compiled shape.
    rows = -(-len(starts) // batch_size) * batch_size
    inputs = {}
    for k, x in trial.items():
      out = np.zeros((rows, WINDOW, *x.shape[1:]), x.dtype)
      for i, s in enumerate(starts):
        piece = x[s : s + WINDOW]
        out[i, : len(piece)] = piece
      inputs[k] = out
    preds = [
      apply(variables, {k: v[lo : lo + batch_size] for k, v in inputs.items()})
      for lo in range(0, rows, batch_size)
    ]
    preds = np.concatenate([np.asarray(p) for p in preds])
    total = np.zeros((length, preds.shape[-1]))
    count = np.zeros((length, 1))
    for i, s in enumerate(starts):
      n = min(WINDOW, length - s)
      total[s : s + n] += preds[i, :n]
      count[s : s + n] += 1
    return total / count

  return predict, lambda length: stitch.window_starts(length, WINDOW, HOP)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--input", default="embeddings")
  parser.add_argument("--frames", type=int, default=3000)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--chunk", type=int, default=0, help="0: the trial")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  from affjax.inference import trial as inference  # pylint: disable=g-import-not-at-top
  from affjax.models import build_model  # pylint: disable=g-import-not-at-top

  print(f"jax {jax.__version__}, load average {harness.load_average()}")
  model = build_model(harness.model_config(args.input))
  full = harness.random_batch(1, args.frames, args.input)
  keys = inference.input_keys(model)
  trial = {k: full[k][0] for k in keys}
  small = {k: v[:, :8] for k, v in full.items() if k in keys}
  key = jax.random.key(0)
  variables = model.init({"params": key, "dropout": key}, small, train=False)
  field = inference.receptive_field(model)
  chunk = args.chunk or max(1, args.frames - (field - 1))
  whole = inference.make_trial_predictor(
    model, variables, chunk_length=chunk, batch_size=1
  )
  windows, starts = windowed_predictor(model, variables, args.batch)
  want = windows(trial)  # compiles
  got = whole([trial])[0]  # compiles
  same = inference.identical_frames(
    args.frames, starts(args.frames), WINDOW, field
  )
  diff = np.abs(got - want)
  cases = [
    harness.Case("windows", lambda: windows(trial)),
    harness.Case("whole_trial", lambda: whole([trial])),
  ]
  harness.alternate(cases, args.repeats, warmup=0)
  w, t = (c.median for c in cases)
  n_win = len(starts(args.frames))
  print(f"load average after: {harness.load_average()}")
  print(f"traces after timing: {whole.traces} (1 each = no recompilation)")
  print("| figure | value |")
  print("|---|---|")
  print(
    f"| {args.input}, {args.frames}-frame trial: windows ({n_win} x "
    f"{WINDOW}, batch {args.batch}) | {harness.fmt_seconds(w)} |"
  )
  print(
    f"| whole trial (chunk {chunk} + {field - 1} context) | "
    f"{harness.fmt_seconds(t)} |"
  )
  print(f"| cost ratio windows / whole trial | {w / t:.2f}x |")
  print(
    f"| max abs diff, {int(same.sum())} frames past the receptive field "
    f"({field}) | {diff[same].max():.1e} |"
  )
  if (~same).any():
    print(
      f"| max abs diff, {int((~same).sum())} frames near window starts "
      f"(expected to differ) | {diff[~same].max():.1e} |"
    )


if __name__ == "__main__":
  main()
