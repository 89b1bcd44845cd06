r"""affjax vs the PyTorch reference: train step and inference, side by side.

Same architecture (IR-50 + 4x128 visual TCN + 2x 4x32 audio TCNs + fusion),
same weights (converted), same batch: `--batch` windows of `--frames` frames,
40x40 faces, VGGish 128 + MFCC 39. Two paths:

* end to end (`frames` input): the backbone is frozen (no gradient into it)
  but runs forward, in train mode during the train step as in the reference
  (BatchNorm batch statistics, dropout);
* head only (`embeddings` input, the cached-embedding mode).

For each: a train step (CCC loss, backward, Adam with L2 on the trainable
parameters) and inference (eval mode). affjax's step is jitted with the state
donated; compile time is measured separately (lower + compile). Cases run in
alternation; medians and the throughput ratio (PyTorch time / affjax time,
> 1 means affjax is faster) are printed, with XLA's FLOP count, the floor
(FLOPs / the best rate measured on this machine) and measured / floor.

`--train_py` adds affjax's real training step (`affjax.train.make_train_step`,
optimiser groups of `affjax.optim`) on the end-to-end path.

  python -m benchmarks.train_step                       # ~3-5 min
  python -m benchmarks.train_step --e2e_batch=8 --e2e_frames=300 --repeats=3
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from affjax import losses  # noqa: E402
from benchmarks import harness  # noqa: E402

LEARNING_RATE = 1e-5
WEIGHT_DECAY = 1e-3


def jax_train_step(model: Any, tx: optax.GradientTransformation):
  """Frozen-backbone step: gradients w.r.t. the head parameters only."""

  def step(state, batch):
    key = jax.random.fold_in(jax.random.key(0), state["step"])

    def loss_fn(head):
      variables = {"params": {**head, **state["frozen"]}}
      if state["batch_stats"]:
        variables["batch_stats"] = state["batch_stats"]
        preds, updates = model.apply(variables, batch, train=True,
                                     rngs={"dropout": key},
                                     mutable=["batch_stats"])
      else:
        preds = model.apply(variables, batch, train=True,
                            rngs={"dropout": key})
        updates = {}
      loss = losses.ccc_loss(preds, batch["label"], batch["mask"])
      return loss, updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["head"])
    deltas, opt = tx.update(grads, state["opt"], state["head"])
    return {
        "step": state["step"] + 1,
        "head": optax.apply_updates(state["head"], deltas),
        "frozen": state["frozen"],
        "batch_stats": updates.get("batch_stats", state["batch_stats"]),
        "opt": opt,
    }, loss

  return step


def jax_state(variables: dict[str, Any], tx: optax.GradientTransformation):
  # Copies: the step donates its state, the variables stay usable.
  variables = jax.tree.map(jnp.copy, dict(variables))
  params = dict(variables["params"])
  frozen = {"backbone": params.pop("backbone")} if "backbone" in params else {}
  return {"step": jnp.zeros((), jnp.int32), "head": params, "frozen": frozen,
          "batch_stats": variables.get("batch_stats", {}),
          "opt": jax.jit(tx.init)(params)}


def adam_l2() -> optax.GradientTransformation:
  # torch.optim.Adam(weight_decay=...) = L2 added to the gradient.
  return optax.chain(optax.add_decayed_weights(WEIGHT_DECAY),
                     optax.adam(LEARNING_RATE))


class JaxTrain:
  """Jitted, donated train step; `run()` does one step and blocks."""

  def __init__(self, step_fn, state, batch):
    self.batch = jax.device_put(batch)
    self.jitted = jax.jit(step_fn, donate_argnums=(0,))
    start = time.perf_counter()
    self.compiled = self.jitted.lower(state, self.batch).compile()
    self.compile_seconds = time.perf_counter() - start
    self.flops = harness.xla_flops(self.compiled)
    self.state = state

  def run(self):
    self.state, loss = self.compiled(self.state, self.batch)
    return harness.block(loss)


class JaxInfer:
  def __init__(self, model, variables, batch):
    inputs = {k: v for k, v in batch.items() if k not in ("label", "mask")}
    self.inputs = jax.device_put(inputs)
    self.variables = variables
    fn = jax.jit(lambda v, b: model.apply(v, b, train=False))
    start = time.perf_counter()
    self.compiled = fn.lower(variables, self.inputs).compile()
    self.compile_seconds = time.perf_counter() - start
    self.flops = harness.xla_flops(self.compiled)

  def run(self):
    return harness.block(self.compiled(self.variables, self.inputs))


def torch_cases(net, batch):
  import torch  # pylint: disable=g-import-not-at-top

  args, label = harness.torch_inputs(batch)
  trainable = [p for p in net.parameters() if p.requires_grad]
  opt = torch.optim.Adam(trainable, lr=LEARNING_RATE,
                         weight_decay=WEIGHT_DECAY)

  def train():
    net.train()
    opt.zero_grad(set_to_none=True)
    loss = harness.torch_ccc_loss(net(*args), label)
    loss.backward()
    opt.step()
    return loss.item()

  def infer():
    net.eval()
    with torch.inference_mode():
      return net(*args)

  return train, infer


def torch_flops(net, batch) -> dict[str, float]:
  """PyTorch's own FLOP counter (the issue's figures use it)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch.utils import flop_counter  # pylint: disable=g-import-not-at-top

  args, label = harness.torch_inputs(batch)
  out = {}
  net.train()
  with flop_counter.FlopCounterMode(display=False) as counter:
    harness.torch_ccc_loss(net(*args), label).backward()
  out["train"] = counter.get_total_flops()
  net.zero_grad(set_to_none=True)
  net.eval()
  with torch.inference_mode(), flop_counter.FlopCounterMode(
      display=False) as counter:
    net(*args)
  out["infer"] = counter.get_total_flops()
  return out


def train_py_case(model, variables, batch, frames):
  """affjax.train's own step at release stage 0 (backbone frozen)."""
  from affjax import optim  # pylint: disable=g-import-not-at-top
  from affjax import train  # pylint: disable=g-import-not-at-top
  from affjax import train_state  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top

  config = common.base_config()
  config.data.window_length = frames
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,))
  setup = train_state.build_setup(config, mesh, model=model)
  variables = jax.tree.map(jnp.copy, dict(variables))
  params = variables["params"]
  opt_state = jax.jit(setup.tx.init)(params)
  opt_state = optim.set_learning_rates(opt_state, {"head": LEARNING_RATE})
  state = train_state.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     batch_stats=variables.get("batch_stats", {}),
                     opt_state=opt_state)
  # Stage 0 of the release schedule: the whole backbone is frozen.
  step = train.make_train_step(setup, jax.random.key(0), released=0)

  def wrapped(state, batch):
    state, metrics = step(state, batch)
    return state, metrics.loss.total

  return JaxTrain(wrapped, state, batch)


def run_path(path: str, batch_size: int, frames: int, repeats: int,
             rates: dict[str, float], train_py: bool) -> list[dict[str, Any]]:
  visual_input = "frames" if path == "end_to_end" else "embeddings"
  net, model, variables = harness.twin_models(visual_input)
  batch = harness.random_batch(batch_size, frames, visual_input)
  tx = adam_l2()
  j_infer = JaxInfer(model, variables, batch)
  t_train, t_infer = torch_cases(net, batch)
  # Same function on both sides (eval mode, same weights).
  import torch  # pylint: disable=g-import-not-at-top

  with torch.inference_mode():
    want = net(*harness.torch_inputs(batch)[0]).numpy()
  diff = float(np.max(np.abs(np.asarray(j_infer.run()) - want)))
  j_train = JaxTrain(jax_train_step(model, tx), jax_state(variables, tx),
                     batch)
  cases = {"train": [harness.Case("affjax", j_train.run),
                     harness.Case("pytorch", t_train)],
           "infer": [harness.Case("affjax", j_infer.run),
                     harness.Case("pytorch", t_infer)]}
  jax_runs = {"train": j_train, "infer": j_infer}
  if train_py and path == "end_to_end":
    tp = train_py_case(model, variables, batch, frames)
    cases["train"].append(harness.Case("affjax train.py", tp.run))
    jax_runs["train.py"] = tp
  t_flops = torch_flops(net, batch)
  best_rate = max(rates.values()) * 1e9
  rows = []
  for mode, group in cases.items():
    harness.alternate(group, repeats)
    by_name = {c.name: c for c in group}
    for case in group:
      if case.name == "pytorch":
        continue
      runner = jax_runs["train.py" if case.name.endswith("train.py")
                        else mode]
      floor = runner.flops / best_rate
      rows.append({
          "path": path, "mode": mode, "impl": case.name,
          "batch": batch_size, "frames": frames,
          "affjax_s": case.median,
          "pytorch_s": by_name["pytorch"].median,
          "ratio": by_name["pytorch"].median / case.median,
          "compile_s": runner.compile_seconds,
          "xla_gflop": runner.flops / 1e9,
          "torch_gflop": t_flops[mode] / 1e9,
          "floor_s": floor,
          "affjax_over_floor": case.median / floor,
          "pytorch_over_floor": by_name["pytorch"].median / floor,
          "max_abs_diff_eval": diff,
          "affjax_times": case.times,
          "pytorch_times": by_name["pytorch"].times,
      })
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--frames", type=int, default=300)
  parser.add_argument("--e2e_batch", type=int, default=2,
                      help="end-to-end batch (IR-50 on every frame is slow)")
  parser.add_argument("--e2e_frames", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--paths", default="head_only,end_to_end")
  parser.add_argument("--train_py", action="store_true",
                      help="also time affjax.train.make_train_step")
  parser.add_argument("--json", default="", help="write the rows here")
  args = parser.parse_args()
  harness.set_torch_threads()
  print(f"jax {jax.__version__}, devices {jax.devices()}, "
        f"load average {harness.load_average()}")
  rates = harness.machine_rates()
  print("measured GFLOP/s: " + ", ".join(f"{k} {v:.0f}"
                                          for k, v in rates.items()))
  rows = []
  for path in args.paths.split(","):
    b, t = ((args.batch, args.frames) if path == "head_only"
            else (args.e2e_batch, args.e2e_frames))
    rows += run_path(path, b, t, args.repeats, rates, args.train_py)
  print(f"\nload average after: {harness.load_average()}")
  print("| path | step | impl | B x T | affjax | PyTorch | PyTorch/affjax |"
        " compile | XLA GFLOP | torch GFLOP | floor | affjax/floor |"
        " PyTorch/floor |")
  print("|---" * 13 + "|")
  for r in rows:
    print(f"| {r['path']} | {r['mode']} | {r['impl']} | {r['batch']} x "
          f"{r['frames']} | {harness.fmt_seconds(r['affjax_s'])} | "
          f"{harness.fmt_seconds(r['pytorch_s'])} | {r['ratio']:.2f}x | "
          f"{r['compile_s']:.1f} s | {r['xla_gflop']:.1f} | "
          f"{r['torch_gflop']:.1f} | {harness.fmt_seconds(r['floor_s'])} | "
          f"{r['affjax_over_floor']:.2f} | {r['pytorch_over_floor']:.2f} |")
  print(f"floor rate: {max(rates.values()):.0f} GFLOP/s "
        f"(best of {sorted(rates)}); eval outputs max |affjax - PyTorch| = "
        + ", ".join(f"{r['path']} {r['max_abs_diff_eval']:.1e}"
                    for r in rows if r["mode"] == "infer"))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"rates": rates, "rows": rows,
                 "load_average": harness.load_average()}, f, indent=1)


if __name__ == "__main__":
  main()
