"""openSMILE must survive a later TensorFlow import in the same process."""

import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent("""
  import numpy as np
  {first}
  import tensorflow
  from affjax.data.preprocess import audio
  wave = (0.1 * np.sin(np.arange(32000) / 16000 * 2 * np.pi * 150))
  feats = audio.egemaps_features(wave.astype(np.float32), 16000, 50, 25.0)
  print("shape", feats.shape)
""")


def _run(first: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-c", _SCRIPT.format(first=first)],
    check=False,
    capture_output=True,
    text=True,
    timeout=120,
    env={
      "TF_CPP_MIN_LOG_LEVEL": "2",
      "JAX_PLATFORMS": "cpu",
      "PATH": "/usr/bin:/bin",
    },
  )


def test_affjax_import_before_tensorflow_keeps_opensmile_working():
  result = _run("import affjax")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "shape (50, 23)" in result.stdout


def test_tensorflow_first_raises_clear_error_instead_of_crashing():
  result = _run("import sys; import tensorflow")
  # affjax is imported (through audio) only after TensorFlow here.
  assert result.returncode == 1, result.stderr[-2000:]
  assert "openSMILE was loaded after TensorFlow" in result.stderr
