"""One writer per data directory: runs sharing a directory wait in turn.

A fold sweep launched in parallel shares `config.data.*_dir`, and a training
process killed alone leaves its data-preparation child running while the
user restarts. Without a lock, two runs race on the same renames (`[Errno
39] Directory not empty`) and on the same manifest (one run's rewrite drops
trials the other finished). Each writer of a data directory (raw-data
generation, preprocessing, the TFDS build) therefore holds an advisory
`flock` on a lock file for as long as it writes, and re-reads the
directory's state once it holds the lock.

`flock` locks belong to the open file, so the kernel releases them when the
holder dies, `kill -9` included: a crashed run never leaves a stale lock, and
the lock file itself is never deleted (deleting it could let two runs lock
two different files). Processes started with `exec` (spawn workers,
subprocesses) do not inherit the lock, as Python opens files
non-inheritable.
"""

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator

from absl import logging

__all__ = ["beside", "hold", "inside"]


def inside(directory: str) -> str:
  """Lock file of a directory that is created in place: `<dir>/.lock`."""
  return os.path.join(directory, ".lock")


def beside(directory: str) -> str:
  """Lock file of a directory renamed into place: `<parent>/.<name>.lock`."""
  directory = os.path.abspath(directory)
  parent, name = os.path.split(directory)
  return os.path.join(parent, f".{name}.lock")


def _holder(fd: int) -> str:
  text = os.pread(fd, 200, 0).decode(errors="replace").strip()
  return text or "another process"


@contextlib.contextmanager
def hold(path: str, what: str) -> Iterator[None]:
  """Holds an exclusive lock on `path` (created if needed) inside the block.

  Waits, with a log line naming the holder, while another process holds it.

  Args:
    path: the lock file (see `inside` and `beside`).
    what: what the lock protects, for the log line (e.g. "feature cache
      /data/cache").
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      logging.warning(
        "%s is in use by %s (lock %s); waiting for it to finish",
        what,
        _holder(fd),
        path,
      )
      start = time.monotonic()
      fcntl.flock(fd, fcntl.LOCK_EX)
      logging.warning(
        "%s is free after %.1fs; continuing", what, time.monotonic() - start
      )
    # Who holds it, for the log line of the next run that waits.
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock
