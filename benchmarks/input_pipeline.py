r"""Input pipeline windows/s vs what the training step consumes, side by side.

  python -m benchmarks.input_pipeline                  # ~2-4 min
  python -m benchmarks.input_pipeline --cases=paper_embeddings --epochs=10
  python -m benchmarks.input_pipeline --cache=/data/cache --tfds=/data/tfds
  python -m benchmarks.input_pipeline --baseline=/tmp/old_pipeline.py

Cases (batch 8 windows each, `affjax.data.pipeline.train_batches` on fold
0's training split):

* `demo`: `configs/demo.py` (frames + VGGish + MFCC, 100-frame windows).
* `paper_frames`: the paper's shapes (frames, 300/200 windows, 40x40 crops).
* `paper_embeddings`: `configs/cached_embeddings.py:both` (cached 512-d
  embeddings + VGGish + MFCC, 300/200 windows).

Data: without `--cache`, a feature cache of `--trials` trials of
`--min_frames`..`--max_frames` frames (Aff-Wild2-like lengths) filled with
random arrays (frames, audio features, labels with some -5, embeddings) is
written under `--workdir` and built into TFDS once, then reused.

Per case: the first epoch (it decodes the split into memory when it fits),
then `--epochs` timed epochs. Printed: start-up per epoch (call -> first
batch), steady-state windows/s after the first batch, and windows/s over the
whole epoch including start-up. `--stream` also times the pipeline
with the trials streamed from disk instead of kept in memory, and
`--baseline=FILE` another pipeline module (e.g. an older `pipeline.py`
saved to a file); epochs alternate between them.

Consumption: the jitted training step of the case's own config
(`affjax.train.jit_train_step`, compile time printed separately). The
paper's end-to-end IR-50 step takes minutes per step on a CPU, so for
`paper_frames` the PyTorch reference's measured 81.7 s per step (sucv/ABAW2
timed on the same 2-core machine type) is used unless `--paper_frames_step=measure`, or
`--train_step_json` points at `benchmarks/train_step.py --json` output (its
affjax train rows, scaled linearly in frames per step). The ratio columns
are pipeline windows/s / step windows/s (the target is >= 10). Nothing is
asserted.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

CASES = ("demo", "paper_frames", "paper_embeddings")
# PyTorch reference (sucv/ABAW2) timed on the same 2-core machine type:
# B 8 x T 300, IR-50 frozen.
REFERENCE_E2E_STEP_S = 81.7
_AUDIO_DIMS = {"mfcc": 39, "egemaps": 23, "vggish": 128}


def _load_average() -> str:
  return " ".join(f"{x:.2f}" for x in os.getloadavg()) + (
    f" on {os.cpu_count()} cores"
  )


# ------------------------------------------------------------------ data


def write_cache(
  cache_dir: str,
  num_trials: int,
  min_frames: int,
  max_frames: int,
  seed: int = 0,
) -> None:
  """A feature cache of random trials (3/4 train, 1/4 validation)."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(cache_dir, "trials"), exist_ok=True)
  entries = {}
  for i in range(num_trials):
    part = "validation" if i % 4 == 3 else "train"
    name = f"bench{i:03d}"
    n = int(rng.integers(min_frames, max_frames + 1))
    arrays = {
      "frames": rng.integers(0, 256, (n, 48, 48, 3), dtype=np.uint8),
      "face_mask": np.ones(n, bool),
      "labels": rng.uniform(-1, 1, (n, 2)).astype(np.float32),
      "embeddings": rng.normal(size=(n, 512)).astype(np.float32),
    }
    arrays["labels"][rng.random(n) < 0.05] = -5.0
    for k, d in _AUDIO_DIMS.items():
      arrays[k] = rng.normal(size=(n, d)).astype(np.float32)
    d = os.path.join(cache_dir, "trials", name)
    os.makedirs(d, exist_ok=True)
    for k, v in arrays.items():
      np.save(os.path.join(d, k + ".npy"), v)
    with open(os.path.join(d, "embeddings.json"), "w") as f:
      json.dump({"backbone": "random", "n_frames": n}, f)
    valid = np.all(arrays["labels"] != -5, 1)
    sums = {
      k: {
        "count": int(valid.sum()),
        "sum": arrays[k][valid].astype(np.float64).sum(0).tolist(),
        "sumsq": np.square(arrays[k][valid].astype(np.float64)).sum(0).tolist(),
      }
      for k in _AUDIO_DIMS
    }
    meta = {
      "trial": name,
      "video": name,
      "partition": part,
      "fps": 30,
      "n_frames": n,
      "feature_sums": sums,
    }
    with open(os.path.join(d, "meta.json"), "w") as f:
      json.dump(meta, f)
    entries[name] = {"partition": part, "video": name, "fps": 30, "n_frames": n}
  tmp = os.path.join(cache_dir, "manifest.json.tmp")
  with open(tmp, "w") as f:
    json.dump(
      {
        "version": 1,
        "settings": {"frame_size": 48},
        "trials": entries,
        "skipped": {},
      },
      f,
    )
  os.replace(tmp, os.path.join(cache_dir, "manifest.json"))


def data_paths(args: argparse.Namespace):
  """DataPaths of `--cache`/`--tfds`, or of the generated random cache."""
  from affjax.data import affwild2, prepare

  if args.cache:
    tfds_dir = args.tfds or os.path.join(args.workdir, "tfds")
    paths = prepare.DataPaths(
      "", os.path.abspath(args.cache), os.path.abspath(tfds_dir)
    )
  else:
    tag = f"t{args.trials}_{args.min_frames}_{args.max_frames}"
    root = os.path.join(args.workdir, tag)
    paths = prepare.DataPaths(
      "", os.path.join(root, "cache"), os.path.join(root, "tfds")
    )
    if not os.path.isfile(os.path.join(paths.cache_dir, "manifest.json")):
      t = time.perf_counter()
      write_cache(
        paths.cache_dir, args.trials, args.min_frames, args.max_frames
      )
      print(f"random cache written in {time.perf_counter() - t:.1f}s")
  t = time.perf_counter()
  affwild2.build(paths.cache_dir, paths.tfds_dir)
  print(
    f"TFDS dataset ready in {time.perf_counter() - t:.1f}s: {paths.tfds_dir}"
  )
  return paths


def case_config(case: str, paths: Any):
  """The full run config of a case, reading the benchmark's data."""
  from configs import cached_embeddings, common, demo

  if case == "demo":
    config = demo.get_config()
  elif case == "paper_embeddings":
    config = cached_embeddings.get_config("both")
  elif case == "paper_frames":
    config = common.base_config()
  else:
    raise ValueError(f"unknown case {case!r}; expected one of {CASES}")
  with config.unlocked():
    config.data.name = "affwild2"
    config.data.cache_dir = paths.cache_dir
    config.data.tfds_dir = paths.tfds_dir
    config.data.fold = 0
  return config


# -------------------------------------------------------------- pipeline


def load_module(path: str):
  """A pipeline module from a file (e.g. an older pipeline.py)."""
  name = "baseline_pipeline"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def run_epoch(module, config, paths, epoch: int) -> dict[str, float]:
  """One epoch of `module.train_batches`: start-up, windows, seconds.

  `module` may be a (module, data config) pair (another reading mode).
  """
  module, data = module if isinstance(module, tuple) else (module, config.data)
  t0 = time.perf_counter()
  it = module.train_batches(
    data,
    paths,
    "train",
    batch_size=config.train.batch_size,
    epoch=epoch,
    seed=config.seed,
  )
  first = next(it, None)
  t1 = time.perf_counter()
  windows = 0
  for batch in it:
    windows += batch["trial"].shape[0]
  t2 = time.perf_counter()
  total = windows + (0 if first is None else first["trial"].shape[0])
  return {
    "startup": t1 - t0,
    "windows": windows,
    "stream": t2 - t1,
    "epoch": t2 - t0,
    "total": total,
  }


def time_pipelines(
  modules: dict[str, Any], config, paths, epochs: int
) -> dict[str, dict[str, float]]:
  """First epoch, then `epochs` epochs alternating between the modules."""
  runs = {name: [] for name in modules}
  first = {name: run_epoch(m, config, paths, 0) for name, m in modules.items()}
  for epoch in range(1, epochs + 1):
    names = list(modules) if epoch % 2 else list(modules)[::-1]
    for name in names:
      runs[name].append(run_epoch(modules[name], config, paths, epoch))
  out = {}
  for name, rs in runs.items():
    windows = sum(r["windows"] for r in rs)
    stream = sum(r["stream"] for r in rs)
    out[name] = {
      "first_epoch_s": first[name]["epoch"],
      "startup_s": statistics.median(r["startup"] for r in rs),
      "steady": windows / stream if stream else float("nan"),
      "epoch_rate": (sum(r["total"] for r in rs) / sum(r["epoch"] for r in rs)),
      "windows_per_epoch": rs[0]["total"],
    }
  return out


# ---------------------------------------------------------- train step


def time_train_step(config, repeats: int) -> dict[str, float]:
  """Compile seconds and median seconds of the case's jitted train step."""
  import jax

  from affjax import sharding, train, train_state

  mesh = sharding.make_mesh(config.mesh)
  setup = train_state.build_setup(config, mesh)
  state = train_state.init_state(setup, jax.random.key(0))
  # Stage 0: the config's frozen groups (IR-50 for lfan) get no gradient.
  step = train.jit_train_step(setup, mesh, jax.random.key(1), released=0)
  b, t = config.train.batch_size, config.data.window_length
  batch = train_state.dummy_batch(config, b)
  batch["label"] = np.zeros((b, t, len(config.data.emotions)), np.float32)
  batch["mask"] = np.ones((b, t), bool)
  batch = sharding.global_batch(batch, mesh)
  t0 = time.perf_counter()
  state, _ = step(state, batch)
  jax.block_until_ready(state)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    state, _ = step(state, batch)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  return {
    "compile_s": compile_s,
    "step_s": statistics.median(times),
    "source": f"jitted train step, median of {repeats}",
  }


def step_from_json(path: str, case: str, config) -> dict[str, float] | None:
  """Step seconds for `case` from `benchmarks/train_step.py --json` rows."""
  with open(path) as f:
    rows = json.load(f)["rows"]
  want = "head_only" if case == "paper_embeddings" else "end_to_end"
  for r in rows:
    if r["path"] == want and r["mode"] == "train" and r["impl"] == "affjax":
      scale = (
        config.train.batch_size
        * config.data.window_length
        / (r["batch"] * r["frames"])
      )
      return {
        "compile_s": r["compile_s"],
        "step_s": r["affjax_s"] * scale,
        "source": f"{path}: {want} B{r['batch']}xT{r['frames']} "
        f"scaled x{scale:.1f}",
      }
  return None


def consumption(case: str, config, args) -> dict[str, Any]:
  if args.train_step_json:
    got = step_from_json(args.train_step_json, case, config)
    if got:
      return got
  if case == "paper_frames" and args.paper_frames_step == "reference":
    return {
      "compile_s": float("nan"),
      "step_s": REFERENCE_E2E_STEP_S,
      "source": "PyTorch reference, measured (IR-50, B8xT300)",
    }
  return time_train_step(config, args.step_repeats)


# ------------------------------------------------------------------ main


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--cases", default=",".join(CASES))
  p.add_argument("--cache", default="", help="existing feature cache")
  p.add_argument(
    "--tfds", default="", help="its TFDS dir (default: <workdir>/tfds)"
  )
  p.add_argument("--workdir", default="/tmp/affjax_bench_input")
  p.add_argument("--trials", type=int, default=20)
  p.add_argument("--min_frames", type=int, default=1500)
  p.add_argument("--max_frames", type=int, default=4500)
  p.add_argument(
    "--epochs", type=int, default=6, help="timed epochs after the first"
  )
  p.add_argument(
    "--baseline",
    default="",
    help="another pipeline module file to time alongside",
  )
  p.add_argument(
    "--stream",
    action="store_true",
    help="also time the streaming path (memory_cache_gb=0)",
  )
  p.add_argument("--step_repeats", type=int, default=3)
  p.add_argument(
    "--paper_frames_step", default="reference", choices=("reference", "measure")
  )
  p.add_argument("--train_step_json", default="")
  p.add_argument(
    "--no_step", action="store_true", help="skip the training-step timing"
  )
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, root)
  from affjax.data import pipeline, trials

  print(f"load average before: {_load_average()}")
  paths = data_paths(args)
  baseline = load_module(args.baseline) if args.baseline else None
  results = []
  for case in args.cases.split(","):
    config = case_config(case, paths)
    modules = {"affjax": pipeline}
    if args.stream:
      streamed = config.data.copy_and_resolve_references()
      with streamed.unlocked():
        streamed.memory_cache_gb = 0.0
      modules["affjax streamed"] = (pipeline, streamed)
    if baseline:
      modules["baseline"] = baseline
    split = pipeline.load_split(config.data, paths, "train")
    print(
      f"\n{case}: {len(split.trial_names)} training trials, "
      f"{int(split.trial_lengths.sum())} frames, {split.num_windows} "
      f"windows of {config.data.window_length} (hop "
      f"{config.data.hop_length}), batch {config.train.batch_size}, "
      f"features {tuple(config.data.features)}",
      flush=True,
    )
    trials.clear_stores()  # each case's first epoch decodes its split
    timed = time_pipelines(modules, config, paths, args.epochs)
    step = None if args.no_step else consumption(case, config, args)
    if step:
      print(
        f"  train step: {step['step_s']:.3f}s per batch "
        f"(compile {step['compile_s']:.1f}s; {step['source']})"
      )
    for name, r in timed.items():
      need = config.train.batch_size / step["step_s"] if step else None
      results.append((case, name, r, need))
      print(f"  {name}: {r}", flush=True)
  print(f"\nload average after: {_load_average()}")
  print(
    "| case | pipeline | first epoch | start-up/epoch | steady w/s | "
    "epoch w/s | step consumes w/s | steady/step | epoch/step |"
  )
  print("|---" * 9 + "|")
  for case, name, r, need in results:

    def ratio(x, need=need):
      return f"{x / need:.0f}x" if need else "-"

    print(
      f"| {case} | {name} | {r['first_epoch_s']:.2f} s | "
      f"{r['startup_s']:.3f} s | {r['steady']:.0f} | "
      f"{r['epoch_rate']:.0f} | "
      f"{'-' if need is None else f'{need:.2f}'} | "
      f"{ratio(r['steady'])} | {ratio(r['epoch_rate'])} |"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
