"""Paths that may be local or URLs, and whole-file writes that never leave half a file.

Every path affjax takes (workdir, data directories, outputs, checkpoints) may be
a local path or a URL such as `gs://bucket/run`; URLs go through `etils.epath`,
which handles every scheme it knows. A URL is never passed to `os.path`
functions: `os.path.abspath("gs://b/run")` is `$PWD/gs:/b/run`.

Atomic writes:
- local: the bytes go to a temporary file `.tmp-<name>-<random>` beside the
  target, then `os.replace` puts it in place (atomic on POSIX), so a reader sees
  the old file or the new one, never a part. A kill leaves at most a `.tmp-*`
  file, which `remove_temporaries` deletes.
- URL (object stores): one upload creates the object whole or not at all
  (GCS makes an object visible only once its upload has finished), so the
  bytes are uploaded straight to the target. There is no rename of
  directories on a bucket; writers that need a directory to appear at once
  write a marker object last.

Permissions: files are created with `0666 & ~umask` (0644 under the usual
umask 022), so teammates sharing a disk can read results; `tempfile` alone
would leave 0600.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from typing import Any

from etils import epath

TMP_PREFIX = ".tmp-"


def is_url(path: str | os.PathLike) -> bool:
  """True for `scheme://...` paths (gs://, s3://, ...), False for local ones."""
  return "://" in os.fspath(path)


def absolute(path: str | os.PathLike) -> str:
  """An absolute local path (`~` expanded), or the URL unchanged."""
  path = os.fspath(path)
  if is_url(path):
    return path.rstrip("/")
  return os.path.abspath(os.path.expanduser(path))


def join(base: str | os.PathLike, *parts: str) -> str:
  """`os.path.join` for local paths, '/'-joining for URLs."""
  base = os.fspath(base)
  if is_url(base):
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
  return os.path.join(base, *parts)


def dirname(path: str | os.PathLike) -> str:
  path = os.fspath(path)
  if is_url(path):
    return path.rstrip("/").rsplit("/", 1)[0]
  return os.path.dirname(os.path.abspath(path))


def basename(path: str | os.PathLike) -> str:
  return os.fspath(path).rstrip("/").rsplit("/", 1)[-1]


def exists(path: str | os.PathLike) -> bool:
  return epath.Path(os.fspath(path)).exists()


def isdir(path: str | os.PathLike) -> bool:
  return epath.Path(os.fspath(path)).is_dir()


def makedirs(path: str | os.PathLike) -> None:
  """Creates `path` and its parents (a no-op for buckets' implicit folders)."""
  epath.Path(os.fspath(path)).mkdir(parents=True, exist_ok=True)


def listdir(path: str | os.PathLike) -> list[str]:
  """The names (not paths) in directory `path`, sorted."""
  return sorted(p.name for p in epath.Path(os.fspath(path)).iterdir())


def _file_mode() -> int:
  umask = os.umask(0)
  os.umask(umask)
  return 0o666 & ~umask


def atomic_write(
  path: str | os.PathLike, write: Callable[[Any], None], mode: str = "w"
) -> None:
  """Writes the file through `write(f)`; readers never see a partial file.

  Args:
    path: local path or URL of the file to create or replace.
    write: called once with an open file object (text for mode "w", binary
      for "wb").
    mode: "w" or "wb".
  """
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
  path = os.fspath(path)
  if is_url(path):
    with epath.Path(path).open(mode) as f:
      write(f)
    return
  directory = dirname(path)
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(
    prefix=f"{TMP_PREFIX}{basename(path)}-", dir=directory
  )
  try:
    with os.fdopen(fd, mode) as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, _file_mode())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text(path: str | os.PathLike, text: str) -> None:
  atomic_write(path, lambda f: f.write(text))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  atomic_write(path, lambda f: f.write(data), mode="wb")


def json_safe(x: Any) -> Any:
  """`x` with NaN and infinities as None (JSON has no NaN), recursively."""
  if isinstance(x, dict):
    return {k: json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [json_safe(v) for v in x]
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes `obj` as indented JSON (NaN/inf as null), atomically."""
  text = json.dumps(json_safe(obj), indent=2, allow_nan=False)
  write_text(path, text + "\n")


def open_file(path: str | os.PathLike, mode: str = "r"):
  """Opens a local file or a URL for reading (`mode` "r" or "rb")."""
  if mode not in ("r", "rb"):
    raise ValueError(f"open_file is for reading; use atomic_write ({mode!r})")
  return epath.Path(os.fspath(path)).open(mode)


def read_text(path: str | os.PathLike) -> str:
  return epath.Path(os.fspath(path)).read_text()


def read_json(path: str | os.PathLike) -> Any:
  """Parses the JSON file at `path`; the error names the file."""
  path = os.fspath(path)
  try:
    return json.loads(read_text(path))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None


def remove_temporaries(directory: str | os.PathLike) -> list[str]:
  """Deletes the `.tmp-*` files a killed writer left in `directory`.

  Returns the names removed. Only local directories hold temporaries: URL
  writes upload in place.
  """
  directory = os.fspath(directory)
  if is_url(directory) or not os.path.isdir(directory):
    return []
  removed = []
  for name in sorted(os.listdir(directory)):
    if name.startswith(TMP_PREFIX):
      full = os.path.join(directory, name)
      if os.path.isfile(full):
        os.remove(full)
        removed.append(name)
  return removed
