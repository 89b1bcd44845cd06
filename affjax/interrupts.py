"""SIGINT (Ctrl-C) and SIGTERM (a job scheduler, a preempted VM) as one exception.

Inside `stop_on_signals()` the first SIGINT or SIGTERM raises `Interrupted`
in the main thread, so `finally` blocks run (the training loop then waits for
a checkpoint being written) and the command line can end with one line
saying what was saved. Python's own SIGINT handling would print a
traceback, and SIGTERM's default action ends the process at once, without
any `finally`.

A second signal gets the default action again (the process ends at once),
so a user who does not want to wait for a checkpoint write can press Ctrl-C
twice. Inside `deferred()` (e.g. while a checkpoint save is being started)
a signal is held and raised when the block ends, so it never interrupts a
half-issued save.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
  """Raised by the first SIGINT/SIGTERM inside `stop_on_signals`.

  A BaseException (like KeyboardInterrupt), so `except Exception` clauses
  that turn errors into messages do not swallow it.

  Attributes:
    signum: the signal number.
    report: one line for the user, filled by the code that knows what was
      saved (e.g. the training loop); '' if nobody did.
  """

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum
    self.report = ""

  @property
  def name(self) -> str:
    return signal.Signals(self.signum).name

  @property
  def exit_code(self) -> int:
    """The shell's convention for a process ended by a signal: 128 + n."""
    return 128 + self.signum


_deferring = 0
_pending: int | None = None


def _handler(signum, frame):
  global _pending
  for s in SIGNALS:  # the next one ends the process at once
    signal.signal(s, signal.SIG_DFL)
  if _deferring:
    _pending = signum
    return
  raise Interrupted(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
  """Turns the first SIGINT/SIGTERM into `Interrupted` within the block.

  Only the main thread can set signal handlers; elsewhere this does nothing.
  The previous handlers are restored when the block ends.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  global _pending
  previous = {s: signal.getsignal(s) for s in SIGNALS}
  _pending = None
  for s in SIGNALS:
    signal.signal(s, _handler)
  try:
    yield
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
  """Holds a signal that arrives inside the block; raises it at the end."""
  global _deferring, _pending
  _deferring += 1
  try:
    yield
  finally:
    _deferring -= 1
  if not _deferring and _pending is not None:
    signum, _pending = _pending, None
    raise Interrupted(signum)
