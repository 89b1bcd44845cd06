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

PyTorch runs with every thread count of `--torch_threads` (default: all
cores, then 1) in the same alternation. On a shared, loaded 2-core machine
PyTorch's OpenMP barriers wait for whichever thread lost its core, and 2
threads can be several times slower than 1; XLA's work-stealing pool suffers
less. Two ratios are printed: vs PyTorch on all cores (the issue's setting)
and vs the best PyTorch thread count (the fair one under load).

`--train_py` adds affjax's real training step (`affjax.train.make_train_step`
at release stage 0, optimiser groups of `affjax.optim`) on the end-to-end
path. Like the benchmark's own step it takes no gradient of the frozen
backbone (one compiled step per release stage), so the two should agree.

  python -m benchmarks.train_step                       # ~3-5 min
  python -m benchmarks.train_step --paths=head_only --repeats=9
  python -m benchmarks.train_step --paths=end_to_end --e2e_batch=2 \
      --e2e_frames=32 --e2e_repeats=3 --e2e_torch_threads=2,1
  python -m benchmarks.train_step --e2e_batch=8 --e2e_frames=300 \
      --e2e_repeats=3                                   # issue shapes, ~1 h

`--conv_chunk=64` adds affjax with `config.model.backbone.conv_chunk=64`
(the backbone's convs over 64 crops a call) on the end-to-end path.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import jax.numpy as jnp
import numpy as np
import optax

from affjax import losses
from benchmarks import harness

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
        preds, updates = model.apply(
          variables,
          batch,
          train=True,
          rngs={"dropout": key},
          mutable=["batch_stats"],
        )
      else:
        preds = model.apply(variables, batch, train=True, rngs={"dropout": key})
        updates = {}
      loss = losses.ccc_loss(preds, batch["label"], batch["mask"])
      return loss, updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state["head"]
    )
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
  return {
    "step": jnp.zeros((), jnp.int32),
    "head": params,
    "frozen": frozen,
    "batch_stats": variables.get("batch_stats", {}),
    "opt": jax.jit(tx.init)(params),
  }


def adam_l2() -> optax.GradientTransformation:
  # torch.optim.Adam(weight_decay=...) = L2 added to the gradient.
  return optax.chain(
    optax.add_decayed_weights(WEIGHT_DECAY), optax.adam(LEARNING_RATE)
  )


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


def torch_cases(net, batch, threads: int):
  """PyTorch train step and inference, each run with `threads` threads.

  The thread count is set on every call because the cases alternate with
  cases of other thread counts in one process.
  """
  import torch  # pylint: disable=g-import-not-at-top

  args, label = harness.torch_inputs(batch)
  trainable = [p for p in net.parameters() if p.requires_grad]
  opt = torch.optim.Adam(trainable, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)

  def train():
    torch.set_num_threads(threads)
    net.train()
    opt.zero_grad(set_to_none=True)
    loss = harness.torch_ccc_loss(net(*args), label)
    loss.backward()
    opt.step()
    return loss.item()

  def infer():
    torch.set_num_threads(threads)
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
  with (
    torch.inference_mode(),
    flop_counter.FlopCounterMode(display=False) as counter,
  ):
    net(*args)
  out["infer"] = counter.get_total_flops()
  return out


def train_py_case(model, variables, batch, frames):
  """affjax.train's own step at release stage 0 (backbone frozen)."""
  from affjax import (
    optim,  # pylint: disable=g-import-not-at-top
    train,  # pylint: disable=g-import-not-at-top
    train_state,  # pylint: disable=g-import-not-at-top
  )
  from configs import common  # pylint: disable=g-import-not-at-top

  config = common.base_config()
  config.data.window_length = frames
  mesh = jax.make_mesh(
    (1,),
    ("data",),
    devices=jax.devices()[:1],
    axis_types=(jax.sharding.AxisType.Auto,),
  )
  setup = train_state.build_setup(config, mesh, model=model)
  variables = jax.tree.map(jnp.copy, dict(variables))
  params = variables["params"]
  opt_state = jax.jit(setup.tx.init)(params)
  opt_state = optim.set_learning_rates(opt_state, {"head": LEARNING_RATE})
  state = train_state.TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get("batch_stats", {}),
    opt_state=opt_state,
  )
  # Stage 0 of the release schedule: the whole backbone is frozen.
  step = train.make_train_step(setup, jax.random.key(0), released=0)

  def wrapped(state, batch):
    state, metrics = step(state, batch)
    return state, metrics.loss.total

  return JaxTrain(wrapped, state, batch)


def run_path(
  path: str,
  batch_size: int,
  frames: int,
  repeats: int,
  rates: dict[str, float],
  train_py: bool,
  torch_threads: list[int],
  conv_chunk: int = 0,
) -> list[dict[str, Any]]:
  """Times one path; one row per affjax case and mode."""
  visual_input = "frames" if path == "end_to_end" else "embeddings"
  net, model, variables = harness.twin_models(visual_input)
  batch = harness.random_batch(batch_size, frames, visual_input)
  tx = adam_l2()
  j_infer = JaxInfer(model, variables, batch)
  # Same function on both sides (eval mode, same weights).
  import torch  # pylint: disable=g-import-not-at-top

  with torch.inference_mode():
    want = net(*harness.torch_inputs(batch)[0]).numpy()
  diff = float(np.max(np.abs(np.asarray(j_infer.run()) - want)))
  j_train = JaxTrain(jax_train_step(model, tx), jax_state(variables, tx), batch)
  cases = {
    "train": [harness.Case("affjax", j_train.run)],
    "infer": [harness.Case("affjax", j_infer.run)],
  }
  # PyTorch with every thread count asked for: on a loaded machine its
  # OpenMP barriers make 2 threads slower than 1, so the fair comparison is
  # against the best of them, measured in the same alternation.
  for threads in torch_threads:
    t_train, t_infer = torch_cases(net, batch, threads)
    cases["train"].append(harness.Case(f"pytorch {threads}t", t_train))
    cases["infer"].append(harness.Case(f"pytorch {threads}t", t_infer))
  jax_runs = {"train": j_train, "infer": j_infer}
  if conv_chunk and path == "end_to_end":
    # Same weights and function, backbone convs over conv_chunk crops a call.
    chunked = model.clone(backbone=model.backbone.clone(conv_chunk=conv_chunk))
    name = f"affjax conv_chunk={conv_chunk}"
    jax_runs[f"train {name}"] = JaxTrain(
      jax_train_step(chunked, tx), jax_state(variables, tx), batch
    )
    jax_runs[f"infer {name}"] = JaxInfer(chunked, variables, batch)
    # XLA's cost analysis counts a loop body once, not once per trip; the
    # function is the same, so the floor uses the unchunked FLOPs.
    jax_runs[f"train {name}"].flops = j_train.flops
    jax_runs[f"infer {name}"].flops = j_infer.flops
    for mode in ("train", "infer"):
      cases[mode].insert(1, harness.Case(name, jax_runs[f"{mode} {name}"].run))
  if train_py and path == "end_to_end":
    tp = train_py_case(model, variables, batch, frames)
    cases["train"].insert(1, harness.Case("affjax train.py", tp.run))
    jax_runs["train.py"] = tp
  t_flops = torch_flops(net, batch)
  torch.set_num_threads(max(torch_threads))
  best_rate = max(rates.values()) * 1e9
  rows = []
  for mode, group in cases.items():
    harness.alternate(group, repeats)
    torch_cases_ = [c for c in group if c.name.startswith("pytorch")]
    best_torch = min(torch_cases_, key=lambda c: c.median)
    all_threads = torch_cases_[0]
    for case in group:
      if case.name.startswith("pytorch"):
        continue
      if case.name.endswith("train.py"):
        runner = jax_runs["train.py"]
      else:
        runner = jax_runs.get(f"{mode} {case.name}", jax_runs[mode])
      floor = runner.flops / best_rate
      rows.append(
        {
          "path": path,
          "mode": mode,
          "impl": case.name,
          "batch": batch_size,
          "frames": frames,
          "affjax_s": case.median,
          "pytorch_s": all_threads.median,
          "pytorch_case": all_threads.name,
          "ratio": all_threads.median / case.median,
          "best_pytorch_s": best_torch.median,
          "best_pytorch_case": best_torch.name,
          "ratio_best": best_torch.median / case.median,
          "compile_s": runner.compile_seconds,
          "xla_gflop": runner.flops / 1e9,
          "torch_gflop": t_flops[mode] / 1e9,
          "floor_s": floor,
          "affjax_over_floor": case.median / floor,
          "pytorch_over_floor": best_torch.median / floor,
          "max_abs_diff_eval": diff,
          "affjax_times": case.times,
          "pytorch_times": {c.name: c.times for c in torch_cases_},
        }
      )
  return rows


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--frames", type=int, default=300)
  parser.add_argument(
    "--e2e_batch",
    type=int,
    default=2,
    help="end-to-end batch (IR-50 on every frame is slow)",
  )
  parser.add_argument("--e2e_frames", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--e2e_repeats", type=int, default=0, help="0: --repeats")
  parser.add_argument("--paths", default="head_only,end_to_end")
  parser.add_argument(
    "--torch_threads",
    default=f"{os.cpu_count() or 1},1",
    help="PyTorch thread counts timed (head only); the first is the "
    "reference setting (all cores)",
  )
  parser.add_argument(
    "--e2e_torch_threads",
    default=str(os.cpu_count() or 1),
    help="PyTorch thread counts timed end to end",
  )
  parser.add_argument(
    "--train_py",
    action="store_true",
    help="also time affjax.train.make_train_step",
  )
  parser.add_argument(
    "--conv_chunk",
    type=int,
    default=0,
    help="also time end to end with config.model.backbone.conv_chunk=N",
  )
  parser.add_argument("--json", default="", help="write the rows here")
  args = parser.parse_args()
  harness.set_torch_threads()
  print(
    f"jax {jax.__version__}, devices {jax.devices()}, "
    f"load average {harness.load_average()}"
  )
  rates = harness.machine_rates()
  print(
    "measured GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items())
  )
  rows = []
  for path in args.paths.split(","):
    if path == "head_only":
      b, t, n = args.batch, args.frames, args.repeats
      threads = _ints(args.torch_threads)
    else:
      b, t = args.e2e_batch, args.e2e_frames
      n = args.e2e_repeats or args.repeats
      threads = _ints(args.e2e_torch_threads)
    rows += run_path(
      path, b, t, n, rates, args.train_py, threads, args.conv_chunk
    )
    print(f"{path} done, load average {harness.load_average()}", flush=True)
  print(f"\nload average after: {harness.load_average()}")
  print(
    "| path | step | impl | B x T | affjax | PyTorch all cores | ratio |"
    " best PyTorch | ratio vs best | compile | XLA GFLOP | torch GFLOP |"
    " floor | affjax/floor | best PyTorch/floor |"
  )
  print("|---" * 15 + "|")
  fmt = harness.fmt_seconds
  for r in rows:
    print(
      f"| {r['path']} | {r['mode']} | {r['impl']} | {r['batch']} x "
      f"{r['frames']} | {fmt(r['affjax_s'])} | {fmt(r['pytorch_s'])} | "
      f"{r['ratio']:.2f}x | {fmt(r['best_pytorch_s'])} "
      f"({r['best_pytorch_case']}) | {r['ratio_best']:.2f}x | "
      f"{r['compile_s']:.1f} s | {r['xla_gflop']:.1f} | "
      f"{r['torch_gflop']:.1f} | {fmt(r['floor_s'])} | "
      f"{r['affjax_over_floor']:.2f} | {r['pytorch_over_floor']:.2f} |"
    )
  print(
    f"ratio = PyTorch time / affjax time (> 1: affjax faster). Floor rate: "
    f"{max(rates.values()):.0f} GFLOP/s (best of {sorted(rates)}); eval "
    "outputs max |affjax - PyTorch| = "
    + ", ".join(
      f"{r['path']} {r['max_abs_diff_eval']:.1e}"
      for r in rows
      if r["mode"] == "infer"
    )
  )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(
        {"rates": rates, "rows": rows, "load_average": harness.load_average()},
        f,
        indent=1,
      )


if __name__ == "__main__":
  main()
