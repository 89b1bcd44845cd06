"""What a run prints: affjax's own lines, the libraries' INFO lines hidden.

The command line (`affjax.main`) calls `quiet_libraries` unless `--verbosity`
(`-v`) or `--stderrthreshold` was given: absl's handler then drops INFO and
DEBUG records logged from outside the affjax package (orbax's lines per
checkpoint save, TFDS's dataset-building lines, clu's metric and progress
lines, JAX's backend probing). Warnings and errors from every library still
show. What stays by default is one line per data stage, one per epoch and
the final summary; `--verbosity=0` shows every library's INFO lines again
and `--verbosity=1` adds affjax's DEBUG lines (one per preprocessed trial).

Also here: the durations printed in those lines (`duration`) and the
epoch timer that gives the time and ETA of each epoch line (`EpochTimer`).
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from typing import Any

from absl import flags
from absl import logging as absl_logging

# Records whose source file is under this directory are affjax's own.
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class OwnInfoOnly(logging.Filter):
  """Passes WARNING and above from anywhere, lower levels only from affjax."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return True
    return os.path.abspath(record.pathname).startswith(_PACKAGE_DIR)


_FILTER = OwnInfoOnly()


def quiet_libraries() -> None:
  """Hides other libraries' INFO/DEBUG lines on absl's handler (idempotent)."""
  handler = absl_logging.get_absl_handler()
  if _FILTER not in handler.filters:
    handler.addFilter(_FILTER)


def libraries_quiet() -> bool:
  """Whether `quiet_libraries` is in effect in this process."""
  return _FILTER in absl_logging.get_absl_handler().filters


def settings() -> dict[str, Any]:
  """This process's logging settings, for a child Python (`configure`)."""
  return {
    "verbosity": absl_logging.get_verbosity(),
    "quiet": libraries_quiet(),
  }


def configure(verbosity: int, quiet: bool) -> None:
  """absl's line format, `verbosity` and filter in a child Python.

  A child started with `python -m` (not through `absl.app.run`) would
  otherwise print Python's bare `INFO:absl:...` format. Its flags are
  marked parsed: a child takes its settings from `settings()` of the parent,
  not from a command line.
  """
  flags.FLAGS.mark_as_parsed()
  absl_logging.use_absl_handler()
  absl_logging.set_verbosity(verbosity)
  if quiet:
    quiet_libraries()


def duration(seconds: float) -> str:
  """'42s', '3m05s' or '2h07m': a duration at the precision a person reads."""
  seconds = max(0, round(seconds))
  if seconds < 60:
    return f"{seconds}s"
  minutes, seconds = divmod(seconds, 60)
  if minutes < 60:
    return f"{minutes}m{seconds:02d}s"
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m"


class EpochTimer:
  """Wall time of each epoch and the remaining time of the run.

  The first epoch a process runs also compiles the train and eval steps, so
  once a later epoch has finished it no longer counts towards the estimate:
  the ETA is the median of the other epochs' times times the epochs left.
  """

  def __init__(self, clock=time.monotonic):
    self._clock = clock
    self._start: float | None = None
    self._times: list[float] = []

  def start(self) -> None:
    self._start = self._clock()

  def stop(self) -> float:
    """Ends the epoch started by `start`; returns its seconds."""
    if self._start is None:
      raise RuntimeError("EpochTimer.stop() without start()")
    seconds = self._clock() - self._start
    self._times.append(seconds)
    self._start = None
    return seconds

  def eta(self, epochs_left: int) -> float:
    """Seconds for `epochs_left` more epochs (0 before any epoch ended)."""
    if not self._times:
      return 0.0
    typical = self._times[1:] or self._times
    return statistics.median(typical) * max(0, epochs_left)
