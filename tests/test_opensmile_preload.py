"""openSMILE must survive a later TensorFlow import in the same process.

openSMILE's native library and TensorFlow's clash (see
affjax/data/preprocess/opensmile_preload.py): the processes that compute
audio features load openSMILE first, and nothing else pays for it.
"""

import os
import subprocess
import sys
import textwrap

# The child imports this checkout's affjax, installed or not.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = textwrap.dedent("""
  import numpy as np
  {first}
  import tensorflow
  from affjax.data.preprocess import audio
  wave = (0.1 * np.sin(np.arange(32000) / 16000 * 2 * np.pi * 150))
  feats = audio.egemaps_features(wave.astype(np.float32), 16000, 50, 25.0)
  print("shape", feats.shape)
""")

# What a spawn preprocessing worker runs first (`ProcessPoolExecutor`'s
# initializer in affjax.data.preprocess.run).
_WORKER_START = (
  "import os; from affjax.data.preprocess import run; "
  "run._init_worker(os.getppid(), {'verbosity': 0, 'quiet': True})"
)


def _run(script: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-c", script],
    check=False,
    capture_output=True,
    text=True,
    timeout=300,
    env={
      "TF_CPP_MIN_LOG_LEVEL": "2",
      "JAX_PLATFORMS": "cpu",
      "PATH": "/usr/bin:/bin",
      "PYTHONPATH": _ROOT,
    },
  )


def test_preprocessing_worker_keeps_opensmile_working_after_tensorflow():
  result = _run(_SCRIPT.format(first=_WORKER_START))
  assert result.returncode == 0, result.stderr[-2000:]
  assert "shape (50, 23)" in result.stdout


def test_tensorflow_first_raises_clear_error_instead_of_crashing():
  result = _run(_SCRIPT.format(first="import sys; import tensorflow"))
  assert result.returncode == 1, result.stderr[-2000:]
  assert "openSMILE was loaded after TensorFlow" in result.stderr


def test_import_affjax_does_not_load_opensmile():
  script = (
    "import affjax, affjax.train\n"
    "maps = open('/proc/self/maps').read()\n"
    "print('loaded' if 'libSMILEapi' in maps else 'not loaded')\n"
  )
  result = _run(script)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "not loaded"
