"""Loads openSMILE's native library before TensorFlow can be imported.

openSMILE's `libSMILEapi.so` and TensorFlow's `libtensorflow_framework.so.2`
both export the same libstdc++ template instantiations with different ABIs.
Whichever library loads first wins the symbol binding; when TensorFlow is first,
openSMILE later corrupts the heap (`malloc(): invalid size (unsorted)`, abort).
Loading the openSMILE library first (a `ctypes` load, no pandas import) is
enough. Audio features are computed in processes that never import
TensorFlow: the data-preparation child of a training run and the spawn
workers of `affjax.data.preprocess.run`, which call `preload` when they
start. `ensure_safe` (called before openSMILE's first use) loads the library
if that has not happened yet and turns the crash into an error in a process
where TensorFlow came first; a process that needs both (the test session)
calls `preload` before importing TensorFlow.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import sys

_loaded_before_tensorflow: bool | None = None


def _library_path() -> str | None:
  spec = importlib.util.find_spec("opensmile")
  if spec is None or spec.origin is None:
    return None
  pattern = os.path.join(
    os.path.dirname(spec.origin), "core", "bin", "*", "libSMILEapi.so"
  )
  found = sorted(glob.glob(pattern))
  return found[0] if found else None


def preload() -> None:
  """Loads libSMILEapi.so once, if opensmile is installed (else no-op)."""
  global _loaded_before_tensorflow
  if _loaded_before_tensorflow is not None:
    return
  path = _library_path()
  if path is None:
    return
  _loaded_before_tensorflow = "tensorflow" not in sys.modules
  ctypes.CDLL(path)


def ensure_safe() -> None:
  """Raises instead of letting openSMILE crash the process.

  Raises:
    RuntimeError: TensorFlow was imported before openSMILE's library.
  """
  preload()
  if _loaded_before_tensorflow is False:
    raise RuntimeError(
      "openSMILE was loaded after TensorFlow in this process; computing "
      "audio features now would crash it (clashing libstdc++ symbols). "
      "Call affjax.data.preprocess.opensmile_preload.preload() (or import "
      "opensmile) before tensorflow, or run preprocessing in its own process "
      "(python -m affjax.data.preprocess)."
    )
