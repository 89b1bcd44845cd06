"""Command line: raw Aff-Wild2 layout → feature cache.

  python -m affjax.data.preprocess --raw=DIR --out=DIR [--workers=N]
      [--test_list=FILE] [--trials=a,b] [--<setting>=VALUE ...]

Every `PreprocessSettings` field is a flag (e.g. `--vggish_hop_seconds=none`
for the reference's one VGGish example per frame). Re-running completes an
interrupted cache; bad inputs, a full disk or a worker killed by the system
exit with status 2 and a message naming the files or trials.
"""

import argparse
import dataclasses
import sys
import time

from absl import logging

from affjax.data.preprocess import run
from affjax.data.preprocess.cache import PreprocessSettings


def _optional_float(text: str) -> float | None:
  return None if text.lower() in ("none", "") else float(text)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m affjax.data.preprocess", description=__doc__.split("\n")[0]
  )
  parser.add_argument("--raw", required=True, help="raw dataset directory")
  parser.add_argument("--out", required=True, help="cache directory")
  parser.add_argument("--workers", type=int, default=1)
  parser.add_argument("--test_list", default=None)
  parser.add_argument("--trials", default=None, help="comma-separated names")
  for field in dataclasses.fields(PreprocessSettings):
    # Fields are int, float, str or `float | None` (parsed by _optional_float).
    kind = field.type if field.type in (int, float, str) else _optional_float
    parser.add_argument(
      f"--{field.name}",
      type=kind,
      default=field.default,
      help=f"(default {field.default})",
    )
  return parser


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  logging.set_verbosity(logging.INFO)
  settings = PreprocessSettings(
    **{
      f.name: getattr(args, f.name)
      for f in dataclasses.fields(PreprocessSettings)
    }
  )
  start = time.time()
  try:
    manifest = run.preprocess(
      args.raw,
      args.out,
      settings,
      num_workers=args.workers,
      test_list=args.test_list,
      trials=args.trials.split(",") if args.trials else None,
    )
  except (OSError, ValueError, run.BrokenProcessPool) as e:
    # Bad inputs, a full disk or a dead worker: the message says what to do,
    # a traceback would only bury it.
    print(f"error: {e}", file=sys.stderr)
    return 2
  frames = sum(t["n_frames"] for t in manifest["trials"].values())
  print(
    f"{len(manifest['trials'])} trials ({frames} frames) cached in "
    f"{args.out}, {len(manifest['skipped'])} skipped; "
    f"{time.time() - start:.1f}s"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
