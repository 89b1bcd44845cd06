r"""affjax's train step per release stage vs the all-parameter-gradient step.

Until the release stage became static, `affjax.train.make_train_step`
differentiated every parameter and froze groups only by a learning rate of 0,
so the frozen IR-50 paid its backward pass. This times that full-gradient
step (rebuilt here, state donated like the real one) against the staged step
at the given stages, alternating, on the paper's model (configs/lfan.py,
IR-50 on 40x40 crops) with random inputs, and prints XLA's FLOP counts.

  python -m benchmarks.frozen_step --batch=1 --frames=32 --repeats=5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import numpy as np
import optax

from affjax import losses, optim, sharding, train, train_state
from benchmarks import harness
from configs import lfan


def full_gradient_step(setup, loop_key):
  """The former step: `value_and_grad` over all params, frozen lr 0."""
  model, tx = setup.model, setup.tx

  def step(state, batch):
    key = jax.random.fold_in(loop_key, state.step)

    def loss_fn(params):
      preds, updates = model.apply(
        dict(state.variables(), params=params),
        batch,
        train=True,
        rngs={"dropout": key},
        mutable=["batch_stats"],
      )
      return losses.ccc_loss(preds, batch["label"], batch["mask"]), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params
    )
    deltas, opt_state = tx.update(grads, state.opt_state, state.params)
    new = state.replace(
      step=state.step + 1,
      params=optax.apply_updates(state.params, deltas),
      batch_stats=updates["batch_stats"],
      opt_state=opt_state,
    )
    return new, train.TrainMetrics.single_from_model_output(loss=loss)

  return step


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--frames", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--stages", default="0", help="comma-separated")
  args = parser.parse_args()
  print(f"jax {jax.__version__}, load average {harness.load_average()}")
  config = lfan.get_config().unlock()
  config.data.window_length = args.frames
  mesh = sharding.make_mesh([("data", -1)], devices=jax.devices()[:1])
  setup = train_state.build_setup(config, mesh)
  loop_key = jax.random.key(1)
  rng = np.random.default_rng(0)
  batch = {
    k: rng.normal(size=v.shape).astype(np.float32)
    for k, v in train_state.dummy_batch(config, args.batch).items()
  }
  shape = (args.batch, args.frames, len(config.data.emotions))
  batch["label"] = np.tanh(rng.normal(size=shape)).astype(np.float32)
  batch["mask"] = np.ones(shape[:2], bool)
  batch = sharding.global_batch(batch, mesh)
  state = train_state.init_state(setup, jax.random.key(0))
  # Head trainable and the first release stage's lr: the stage argument
  # below decides what the staged step differentiates.
  plateau = optim.PlateauState(released=0, learning_rate=1e-5)
  state = train_state.set_learning_rates(state, setup, plateau)

  full = jax.jit(
    full_gradient_step(setup, loop_key),
    in_shardings=(setup.shardings, sharding.data_sharding(mesh)),
    out_shardings=(setup.shardings, sharding.replicated(mesh)),
    donate_argnums=(0,),
  )
  steps = {"full gradient": full}
  for r in map(int, args.stages.split(",")):
    steps[f"stage {r}"] = train.jit_train_step(
      setup, mesh, loop_key, released=r
    )
  cases, flops = [], {}
  for name, fn in steps.items():
    t0 = time.perf_counter()
    compiled = fn.lower(state, batch).compile()
    print(f"{name}: compiled in {time.perf_counter() - t0:.1f} s", flush=True)
    flops[name] = harness.xla_flops(compiled)
    holder = {"state": train_state.copy_tree(state)}

    def run(compiled=compiled, holder=holder):
      holder["state"], metrics = compiled(holder["state"], batch)
      jax.block_until_ready(metrics)

    cases.append(harness.Case(name, run))
  harness.alternate(cases, args.repeats)
  base = cases[0]
  print(f"\nIR-50 + TCNs, B {args.batch} x T {args.frames}, 40x40 faces")
  print("| step | median | min | vs full | GFLOP | vs full |")
  print("|---|---|---|---|---|---|")
  for case in cases:
    med = statistics.median(case.times)
    print(
      f"| {case.name} | {med:.3f} s | {min(case.times):.3f} s | "
      f"{med / statistics.median(base.times):.2f}x | "
      f"{flops[case.name] / 1e9:.1f} | "
      f"{flops[case.name] / flops[base.name]:.2f}x |"
    )
  print(f"load average after: {harness.load_average()}")


if __name__ == "__main__":
  main()
