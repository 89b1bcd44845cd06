r"""Epoch cost on the demo set: cached embeddings vs end to end, + recompiles.

The paper's model (IR-50 frozen, 4x128 visual TCN, 2x 4x32 audio TCNs,
fusion) with the paper's 300/200 windows, on the demo dataset's training
trials (`configs/demo.py`'s synthetic set: 14 trials of 20-40 s at 25/30
fps; fold 0 = the generator's train partition). The trial lengths come from
the generator's plan (no video is rendered), the windows per epoch from
`affjax.data.stitch.window_starts`, as the training pipeline cuts them.

Epoch time = windows per epoch x measured cost per window, for:

* end to end: the frozen-backbone train step of `benchmarks/train_step.py`
  (IR-50 forward in train mode on every frame of every window, gradients
  for the head only) at `--e2e_batch` windows of 300 frames;
* cached: the same step on `embeddings` (the head only) at batch 8;
* the one-off embedding pass (`affjax.embed`'s job): IR-50 in eval mode on
  every frame of the set once, in batches of `--frame_batch` frames.

The three are timed in alternation in one process (medians). Nothing is
asserted. Also printed: recompilations after the first step of affjax's real
jitted train and eval steps (`affjax.train.jit_train_step` /
`jit_eval_step`) for `configs/cached_embeddings.py` and `configs/demo.py`,
counted from jax's compile log (`jax_log_compiles`) over `--steps` steps on
fresh batches of the same shapes; anything compiled after step 1 is listed.

  python -m benchmarks.epoch                 # ~5-10 min on a loaded 2-core box
  python -m benchmarks.epoch --repeats=1 --skip_epoch   # recompiles only
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from benchmarks import train_step as ts

WINDOW, HOP = 300, 200


def demo_train_lengths() -> tuple[list[int], int]:
  """Training trial lengths and total frames of the demo set (plan only)."""
  from affjax.data import synthetic  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top

  cfg = common.demo_synthetic()
  # `_plan` is what `synthetic.generate` draws first from the same seed, so
  # these are the lengths the demo renders, without rendering anything.
  videos = synthetic._plan(  # pylint: disable=protected-access
    cfg.num_trials,
    np.random.default_rng(cfg.seed),
    cfg.min_seconds,
    cfg.max_seconds,
    (25, 30),
    1,
    0.2,
    0.2,
  )
  train, total = [], 0
  for video in videos:
    for subject in video["subjects"]:
      total += video["n_frames"]
      if subject.partition == "train":
        train.append(video["n_frames"])
  return train, total


def init_variables(model, batch):
  inputs = {k: v for k, v in batch.items() if k not in ("label", "mask")}
  key = jax.random.key(0)
  return model.init({"params": key, "dropout": key}, inputs, train=False)


def epoch_costs(args) -> None:
  from affjax.data import stitch  # pylint: disable=g-import-not-at-top
  from affjax.inference import trial as inference  # pylint: disable=g-import-not-at-top
  from affjax.models import build_model  # pylint: disable=g-import-not-at-top

  lengths, total_frames = demo_train_lengths()
  windows = sum(stitch.num_windows(n, WINDOW, HOP) for n in lengths)
  print(
    f"demo set: {len(lengths)} training trials, {sum(lengths)} frames, "
    f"{windows} windows of {WINDOW}/{HOP} per epoch; {total_frames} frames "
    "in all partitions (what embedding covers)"
  )
  model = build_model(harness.model_config("frames"))
  e2e_batch = harness.random_batch(args.e2e_batch, WINDOW, "frames")
  variables = init_variables(model, e2e_batch)
  tx = ts.adam_l2()
  e2e = ts.JaxTrain(
    ts.jax_train_step(model, tx), ts.jax_state(variables, tx), e2e_batch
  )
  backbone, bb_vars, head, head_vars = inference.split_backbone(
    model, variables
  )
  head_batch = harness.random_batch(args.batch, WINDOW, "embeddings")
  cached = ts.JaxTrain(
    ts.jax_train_step(head, tx), ts.jax_state(head_vars, tx), head_batch
  )
  frames = jnp.asarray(
    harness.random_batch(1, args.frame_batch, "frames")["frames"][0]
  )
  embed = (
    jax.jit(lambda v, x: backbone.apply(v, x, train=False))
    .lower(bb_vars, frames)
    .compile()
  )
  print(
    f"compile: end-to-end step {e2e.compile_seconds:.1f} s, cached step "
    f"{cached.compile_seconds:.1f} s"
  )
  cases = [
    harness.Case("end_to_end", e2e.run),
    harness.Case("cached", cached.run),
    harness.Case("embed", lambda: harness.block(embed(bb_vars, frames))),
  ]
  harness.alternate(cases, args.repeats)
  e2e_s, cached_s, embed_s = (c.median for c in cases)
  per_window = {
    "end_to_end": e2e_s / args.e2e_batch,
    "cached": cached_s / args.batch,
  }
  epoch = {k: v * windows for k, v in per_window.items()}
  embed_once = embed_s / args.frame_batch * total_frames
  fmt = harness.fmt_seconds
  print(f"load average after: {harness.load_average()}")
  print("| figure | value |")
  print("|---|---|")
  for k in ("end_to_end", "cached"):
    print(f"| {k} cost per window (median) | {fmt(per_window[k])} |")
    print(f"| {k} epoch ({windows} windows) | {fmt(epoch[k])} |")
  print(
    f"| epoch ratio end_to_end / cached | "
    f"{epoch['end_to_end'] / epoch['cached']:.0f}x |"
  )
  print(f"| one-off embedding of {total_frames} frames | {fmt(embed_once)} |")
  print(
    f"| cached: embedding + 1 epoch vs 1 end-to-end epoch | "
    f"{epoch['end_to_end'] / (embed_once + epoch['cached']):.1f}x cheaper |"
  )
  print(
    f"| epochs to amortise the embedding | "
    f"{embed_once / (epoch['end_to_end'] - epoch['cached']):.2f} |"
  )


class _CompileCounter(logging.Handler):
  """Collects the names in jax's "Compiling <name> ..." log records."""

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.names: list[str] = []

  def emit(self, record):
    message = record.getMessage()
    if message.startswith("Compiling "):
      self.names.append(message.split()[1])


def recompiles(config_name: str, steps: int) -> None:
  """Real train/eval steps of a config on fresh batches; compiles per step."""
  from affjax import train, train_state  # pylint: disable=g-import-not-at-top

  config = importlib.import_module(f"configs.{config_name}").get_config()
  mesh = jax.make_mesh(
    (1,),
    ("data",),
    devices=jax.devices()[:1],
    axis_types=(jax.sharding.AxisType.Auto,),
  )
  program = train.build_program(config, mesh)
  state = train_state.init_state(program.setup, jax.random.key(0))
  shapes = train_state.dummy_batch(config, config.train.batch_size)

  def batch(seed):
    rng = np.random.default_rng(seed)
    out = {
      k: rng.normal(size=v.shape).astype(np.float32) for k, v in shapes.items()
    }
    b, t = next(iter(shapes.values())).shape[:2]
    out["label"] = rng.uniform(-1, 1, (b, t, config.model.num_outputs))
    out["label"] = out["label"].astype(np.float32)
    out["mask"] = np.ones((b, t), bool)
    return out

  counter = _CompileCounter()
  logger = logging.getLogger("jax")
  logger.addHandler(counter)
  # Counted, not printed: the records list every argument's shape.
  propagate, logger.propagate = logger.propagate, False
  per_step = []
  with jax.log_compiles(True):
    for i in range(steps):
      before = len(counter.names)
      state, metrics = program.train_step(state, batch(i))
      preds = program.eval_step(state, batch(1000 + i))
      float(metrics.loss.total)
      np.asarray(preds)
      per_step.append(counter.names[before:])
  logger.removeHandler(counter)
  logger.propagate = propagate
  later = [n for names in per_step[1:] for n in names]
  print(
    f"{config_name}: compiles in step 1: {len(per_step[0])} "
    f"({', '.join(sorted(set(per_step[0])))}); after step 1, over "
    f"{steps - 1} steps: {len(later)}" + (f" ({later})" if later else "")
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--e2e_batch", type=int, default=1)
  parser.add_argument("--frame_batch", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--skip_epoch", action="store_true")
  parser.add_argument("--configs", default="cached_embeddings,demo")
  args = parser.parse_args()
  print(f"jax {jax.__version__}, load average {harness.load_average()}")
  for name in args.configs.split(","):
    if name:
      recompiles(name, args.steps)
  if not args.skip_epoch:
    epoch_costs(args)


if __name__ == "__main__":
  main()
