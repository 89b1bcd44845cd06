"""Loads openSMILE's native library before TensorFlow can be imported.

openSMILE's `libSMILEapi.so` and TensorFlow's `libtensorflow_framework.so.2`
both export the same libstdc++ template instantiations with different ABIs.
Whichever library loads first wins the symbol binding; when TensorFlow is first,
openSMILE later corrupts the heap (`malloc(): invalid size (unsorted)`, abort).
Loading the openSMILE library first (a `ctypes` load, no pandas import) is
enough, so `import affjax` does it, and the audio features check it.
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
      "Import affjax (or opensmile) before tensorflow, or run preprocessing "
      "in its own process (python -m affjax.data.preprocess)."
    )
