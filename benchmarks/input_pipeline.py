r"""Throughput of the training input pipeline, in windows per second.

  python benchmarks/input_pipeline.py            # synthetic data
  python benchmarks/input_pipeline.py --cache=/data/cache \
      --tfds=/data/tfds

Without `--cache` a small synthetic dataset is generated and preprocessed
under `--workdir` first (reused on later runs). Reads one warm-up epoch, then
`--epochs` timed epochs of `affjax.data.pipeline.train_batches` (frames,
vggish and mfcc, 300/200 windows by default), and prints the start-up time
per epoch (until the first batch) and the windows/s and MB/s of the batches
after it. Prints numbers only; no assertions.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--cache", default="", help="feature cache directory")
  p.add_argument("--tfds", default="",
                 help="TFDS directory (default: <workdir>/data/tfds)")
  p.add_argument("--workdir", default="/tmp/affjax_bench_input")
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--window", type=int, default=300)
  p.add_argument("--hop", type=int, default=200)
  p.add_argument("--features", default="frames,vggish,mfcc")
  p.add_argument("--epochs", type=int, default=10,
                 help="timed epochs, after one warm-up epoch")
  p.add_argument("--fold", type=int, default=0)
  p.add_argument("--num_trials", type=int, default=8,
                 help="synthetic trials when no --cache is given")
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))
  import ml_collections  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from affjax.data import pipeline, prepare

  config = ml_collections.ConfigDict({
      "name": "affwild2" if args.cache else "synthetic", "raw_dir": "",
      "cache_dir": args.cache, "tfds_dir": args.tfds, "fold": args.fold,
      "window_length": args.window, "hop_length": args.hop,
      "emotions": ("valence", "arousal"),
      "features": tuple(args.features.split(",")), "crop_size": 40,
      "time_delay": 0,
      "synthetic": {"num_trials": args.num_trials, "seed": 0,
                    "min_seconds": 20.0, "max_seconds": 40.0,
                    "vggish_model": "tiny"}})
  start = time.time()
  paths = prepare.prepare(config, args.workdir)
  print(f"data ready in {time.time() - start:.1f}s: {paths}")
  split = pipeline.load_split(config, paths, "train")
  print(f"train split of fold {args.fold}: {len(split.trial_names)} trials, "
        f"{int(split.trial_lengths.sum())} frames, {split.num_windows} "
        f"windows of {args.window} (hop {args.hop})")
  def run(epoch):
    """(windows after the first batch, bytes, start-up s, streaming s)."""
    t0 = time.perf_counter()
    it = pipeline.train_batches(config, paths, "train",
                                batch_size=args.batch_size, epoch=epoch,
                                seed=0)
    if next(it, None) is None:
      return 0, 0, time.perf_counter() - t0, 0.0
    t1 = time.perf_counter()
    count = size = 0
    for batch in it:
      count += batch["trial"].shape[0]
      size += sum(v.nbytes for v in batch.values())
    return count, size, t1 - t0, time.perf_counter() - t1

  run(0)  # warm-up epoch: page cache, first graph building
  totals = np.zeros(4)
  for epoch in range(1, args.epochs + 1):
    totals += run(epoch)
  windows, nbytes, startup, streaming = totals
  print(f"start-up (to the first batch): {startup / args.epochs:.2f}s per "
        "epoch")
  if streaming == 0:
    print("at most one batch per epoch; nothing to time")
    return 0
  rate = windows / streaming
  print(f"train_batches: {int(windows)} windows in {streaming:.2f}s after "
        f"each epoch's first batch = {rate:.1f} windows/s "
        f"({rate * args.window:.0f} frames/s, "
        f"{nbytes / streaming / 2**20:.0f} MB/s of batches), batch "
        f"{args.batch_size}, features {tuple(config.features)}")
  per_epoch = split.num_windows / rate + startup / args.epochs
  print(f"one epoch of this split: ~{per_epoch:.1f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
