r"""Command line entry point: train, evaluate, merge folds or predict.

  python -m affjax.main --config=configs/demo.py --workdir=/tmp/affjax_demo
  python -m affjax.main --config=configs/demo.py --workdir=/tmp/affjax_demo \
      --mode=evaluate [--split=validation] [--out=DIR]
  python -m affjax.main --mode=merge --fold_dirs=A/eval/test_12,B/... \
      --out=submission/
  python -m affjax.main --mode=predict --workdir=DIR --video=clip.mp4

`--config.key=value` overrides any config field; a key the config does not
have is an error. Multi-process runs add `--distributed` (Cloud TPU pod
slices, SLURM) or the explicit coordinator flags.

The log shows affjax's lines (one per data stage, one per epoch) and every
warning; `--verbosity=0` (or `--stderrthreshold`) adds the libraries' INFO
lines (orbax, TFDS, clu, JAX), `--verbosity=1` affjax's DEBUG lines too (see
`affjax.logs`). SIGINT (Ctrl-C) or SIGTERM ends a run with one line saying
what was saved; the same command then resumes.
"""

import os
import sys

# TensorFlow's C++ INFO and WARNING lines (CPU feature notes) unless the
# user asks for them; must be set before TensorFlow loads.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# `--mode=predict` computes audio features in this process, which also loads
# TensorFlow: openSMILE's native library must be loaded before it (a no-op
# without the `[preprocess]` extra).
from affjax.data.preprocess import opensmile_preload

opensmile_preload.preload()

from absl import app, flags, logging

from affjax.config_flag import parse_flags

FLAGS = flags.FLAGS

MODES = ("train", "evaluate", "merge", "predict")

flags.DEFINE_string(
  "workdir", None, "Run directory: checkpoints, summaries, data, results."
)
flags.DEFINE_enum("mode", "train", MODES, "What to do.")
flags.DEFINE_string(
  "split", None, "evaluate: split to score (default config.eval.split)."
)
flags.DEFINE_string(
  "out",
  None,
  "evaluate/predict: output directory (default under "
  "--workdir); merge: submission directory (required).",
)
flags.DEFINE_list(
  "fold_dirs",
  [],
  "merge: prediction directories of the folds (the "
  "`predictions/` folders written by --mode=evaluate, or "
  "their parents).",
)
flags.DEFINE_list(
  "emotions",
  ["valence", "arousal"],
  "merge: emotions to merge, in submission column order.",
)
flags.DEFINE_string("video", None, "predict: the video file.")
flags.DEFINE_bool(
  "distributed",
  False,
  "Join a multi-process run detected by JAX (Cloud TPU pod "
  "slice, SLURM) via jax.distributed.initialize().",
)
flags.DEFINE_string(
  "coordinator_address", None, "Multi-process: host:port of process 0."
)
flags.DEFINE_integer("num_processes", None, "Multi-process: process count.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process.")
flags.DEFINE_list(
  "local_device_ids", None, "Multi-process: devices this process uses."
)


def _require(name: str) -> None:
  if not getattr(FLAGS, name):
    raise app.UsageError(f"--mode={FLAGS.mode} needs --{name}")


def _merge() -> None:
  from affjax import io, merge  # pylint: disable=g-import-not-at-top

  _require("fold_dirs")
  _require("out")
  dirs = [
    io.join(d, "predictions") if io.isdir(io.join(d, "predictions")) else d
    for d in FLAGS.fold_dirs
  ]
  merged = merge.merge_folds(dirs, FLAGS.out, tuple(FLAGS.emotions))
  logging.info(
    "Merged %d folds into %d submission files in %s.",
    len(dirs),
    len(merged),
    FLAGS.out,
  )


def _predict() -> None:
  _require("workdir")
  _require("video")
  # Imported here: decoding and face detection are only needed to predict.
  # An ImportError raised inside it (a missing PyAV or OpenCV) is shown as
  # it is, naming the package to install.
  from affjax import predict  # pylint: disable=g-import-not-at-top

  predict.run(
    FLAGS.workdir, FLAGS.video, out_dir=FLAGS.out, config=FLAGS.config
  )


def _libraries_asked_for() -> bool:
  """True when the command line sets absl's logging levels itself."""
  return FLAGS["verbosity"].present or FLAGS["stderrthreshold"].present


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from affjax import interrupts, logs  # pylint: disable=g-import-not-at-top

  if not _libraries_asked_for():
    logs.quiet_libraries()
  with interrupts.stop_on_signals():
    try:
      _run_mode()
    except interrupts.Interrupted as stop:
      logging.warning(stop.report or f"{stop.name}: stopped.")
      sys.exit(stop.exit_code)


def _run_mode() -> None:
  # TensorFlow only feeds data: keep it off the accelerators JAX uses.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tf.config.set_visible_devices([], "GPU")
  from affjax import distributed  # pylint: disable=g-import-not-at-top

  distributed.maybe_initialize(
    FLAGS.coordinator_address,
    FLAGS.num_processes,
    FLAGS.process_id,
    FLAGS.local_device_ids,
    distributed=FLAGS.distributed,
  )
  import jax  # pylint: disable=g-import-not-at-top

  logging.info(
    "JAX process %d / %d, %d local / %d global devices (%s).",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].platform,
  )

  if FLAGS.mode == "merge":
    _merge()
    return
  if FLAGS.mode == "predict":
    _predict()
    return
  _require("workdir")
  if FLAGS.config is None:
    raise app.UsageError(f"--mode={FLAGS.mode} needs --config")
  from affjax import train  # pylint: disable=g-import-not-at-top

  if FLAGS.mode == "train":
    summary, results = train.train_then_evaluate(FLAGS.config, FLAGS.workdir)
    logging.info(
      "Training done after %d epochs (%s): best epoch %d, validation CCC "
      "mean %.4f.",
      summary["epochs"],
      summary["stop_reason"],
      summary["best_epoch"],
      summary["best_ccc"],
    )
    # The whole summary as a dict literal: the reliability tests parse it to
    # compare runs (resumed vs uninterrupted, two processes, same seed).
    logging.info("Training done: %s", summary)
    if results is not None:
      logging.info("Results, predictions and plots: %s", results["out_dir"])
  else:
    results = train.evaluate_checkpoint(
      FLAGS.config, FLAGS.workdir, split=FLAGS.split, out_dir=FLAGS.out
    )
    logging.info(
      "Evaluation: ccc_mean %.4f, %s",
      results["ccc_mean"],
      {e: v for e, v in results["overall"].items()},
    )


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
