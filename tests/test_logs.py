"""The log a person reads: a line per data stage and per epoch, a SIGTERM line.

Unit tests of `affjax.logs` and `affjax.interrupts`, then one training run of
`configs/test.py` in a child process, stopped by SIGTERM once its second
epoch line is out: its log must be short (a fixed number of lines plus one
per epoch, so the 20-epoch README demo stays under 80), every epoch line
must carry loss, CCC per emotion, lr, release stage, time and ETA, no
library INFO line may show, and the run must end with exit status 143 and
one line naming the checkpoint that is on disk.
"""

import logging
import os
import re
import signal

import pytest

from affjax import interrupts, logs, train
from tests import reliability_helpers as rh


@pytest.mark.parametrize(
  "seconds, text",
  [(0, "0s"), (42.4, "42s"), (59.6, "1m00s"), (185, "3m05s"), (7620, "2h07m")],
)
def test_duration(seconds, text):
  assert logs.duration(seconds) == text


def test_epoch_timer_leaves_out_the_compiling_first_epoch():
  now = [0.0]
  timer = logs.EpochTimer(clock=lambda: now[0])
  assert timer.eta(5) == 0.0
  for seconds in (100.0, 10.0, 12.0, 11.0):
    timer.start()
    now[0] += seconds
    assert timer.stop() == seconds
  # Median of 10, 12, 11 (not 100) times 4 epochs left.
  assert timer.eta(4) == 44.0
  assert timer.eta(0) == 0.0
  one = logs.EpochTimer(clock=lambda: now[0])
  one.start()
  now[0] += 30.0
  one.stop()
  assert one.eta(2) == 60.0  # only the first epoch so far: it is the guess


def _record(level, pathname):
  return logging.LogRecord("absl", level, pathname, 1, "m", None, None)


def test_filter_keeps_affjax_info_and_every_warning():
  own = os.path.join(os.path.dirname(logs.__file__), "train.py")
  library = "/usr/lib/python3/site-packages/orbax/checkpoint_manager.py"
  keep = logs.OwnInfoOnly().filter
  assert keep(_record(logging.INFO, own))
  assert keep(_record(logging.DEBUG, own))
  assert not keep(_record(logging.INFO, library))
  assert not keep(_record(logging.DEBUG, library))
  assert keep(_record(logging.WARNING, library))
  assert keep(_record(logging.ERROR, library))


def test_signal_raises_interrupted_once_then_default_again():
  before = signal.getsignal(signal.SIGTERM)
  with (
    pytest.raises(interrupts.Interrupted) as caught,
    interrupts.stop_on_signals(),
  ):
    # Python runs the handler before the next bytecode: the fail below is
    # never reached.
    os.kill(os.getpid(), signal.SIGTERM)
    pytest.fail("SIGTERM did not interrupt")
  assert caught.value.name == "SIGTERM"
  assert caught.value.exit_code == 128 + signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is before


def test_signal_inside_deferred_is_raised_at_its_end():
  done = []
  with (
    pytest.raises(interrupts.Interrupted) as caught,
    interrupts.stop_on_signals(),
  ):
    with interrupts.deferred():
      os.kill(os.getpid(), signal.SIGINT)
      done.append("rest of the block")
    pytest.fail("the held SIGINT was not raised")
  assert done == ["rest of the block"]
  assert caught.value.name == "SIGINT"


def test_interrupted_report_names_checkpoint_and_resume():
  stop = interrupts.Interrupted(signal.SIGTERM)
  line = train.interrupted_report(stop, "/runs/a", {"epochs": 3, "step": 51})
  assert line == (
    "SIGTERM: stopped. Saved: checkpoint 3 (epochs 0-2, train step 51) in "
    "/runs/a/checkpoints. The same command resumes from epoch 3."
  )
  line = train.interrupted_report(stop, "/runs/a", {"epochs": None, "step": 0})
  assert line.startswith("SIGTERM: stopped before the first checkpoint")


# One line per epoch (`affjax.train._log_epoch`).
EPOCH_LINE = re.compile(
  r"\] epoch (\d+) step (\d+): train loss \d+\.\d{4}, validation CCC "
  r"valence -?\d\.\d{4} arousal -?\d\.\d{4} \(mean -?\d\.\d{4}(, best)?\), "
  r"lr \d\.\de-\d\d, released \d+/\d+, (\d+m)?\d+s, ETA (\d+[hm])?\d+[ms]$",
  re.MULTILINE,
)
STOP_LINE = re.compile(
  r"SIGTERM: stopped\. Saved: checkpoint (\d+) \(epochs 0-\d+, train step "
  r"\d+\) in (\S+)\. The same command resumes from epoch (\d+)\.$",
  re.MULTILINE,
)
# Lines a run prints besides its epoch lines, at most: C++ notes of
# TensorFlow/XLA, devices, mesh, 4 data stages, data summary, model size,
# release notes, stop, summary. The 20-epoch demo then stays under 80.
MAX_OTHER_LINES = 30


def test_training_log_is_short_and_sigterm_says_what_was_saved(tmp_path):
  workdir = str(tmp_path / "run")
  log_path = str(tmp_path / "log.txt")
  proc = rh.start(
    [
      rh.PYTHON,
      "-m",
      "affjax.main",
      "--config=configs/test.py",
      f"--workdir={workdir}",
      "--config.train.max_epochs=100",
    ],
    log_path,
  )

  def log():
    with open(log_path, errors="replace") as f:
      return f.read()

  try:
    # Event: the second epoch line, i.e. two checkpoints issued.
    assert rh.wait_until(
      lambda: len(EPOCH_LINE.findall(log())) >= 2, proc, timeout=900
    ), log()[-3000:]
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM, log()[-3000:]
  finally:
    rh.kill_group(proc)
  lines = log().splitlines()
  epochs = [int(m.group(1)) for m in map(EPOCH_LINE.search, lines) if m]
  assert epochs == list(range(len(epochs))), lines
  other = [line for line in lines if not EPOCH_LINE.search(line)]
  assert len(other) <= MAX_OTHER_LINES, "\n".join(other)
  for noise in ("checkpoint_manager", "orbax", "Downloading and preparing"):
    assert not any(noise in line for line in lines), noise
  assert any("] Data: feature cache" in line for line in lines), lines
  stop = STOP_LINE.search(lines[-1])
  assert stop, lines[-5:]
  saved = int(stop.group(1))
  assert saved == int(stop.group(3)) >= 2
  assert stop.group(2) == os.path.join(workdir, "checkpoints")
  # The named checkpoint is complete on disk and the newest one.
  on_disk = os.listdir(stop.group(2))
  assert max(int(n) for n in on_disk if n.isdigit()) == saved, on_disk
  assert not [n for n in on_disk if "tmp" in n], on_disk
  assert os.path.isfile(os.path.join(workdir, train.PARAMETER_TABLE))
