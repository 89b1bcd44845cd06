"""Two runs on the same data at once wait for each other.

A fold sweep launched in parallel shares `config.data.*_dir`; a training
process killed alone (`kill -9 <pid>`) leaves its data-preparation child
running while the user restarts. Both must end with a complete, consistent
cache and dataset: one run waits for the other (and logs that it waits),
instead of failing with "[Errno 39] Directory not empty" (generation or a
trial's rename) or rewriting the manifest without the trials the other run
finished. The lock is per data directory (`affjax.data.dirlock`).
"""

import json
import os
import subprocess

from affjax.data import affwild2
from affjax.data.preprocess import cache
from tests import reliability_helpers as rh

PREPARE = """
import sys
from affjax.data import prepare
from configs import test
config = test.get_config()
config.unlock()
root = sys.argv[1]
for key in ("raw", "cache", "tfds"):
  config.data[key + "_dir"] = f"{root}/{key}"
prepare.prepare(config.data, root)
"""


def _together(argvs, tmp_path):
  logs = [str(tmp_path / f"log{i}.txt") for i in range(len(argvs))]
  procs = [rh.start(a, log) for a, log in zip(argvs, logs, strict=True)]
  try:
    codes = [p.wait(timeout=300) for p in procs]
  except subprocess.TimeoutExpired:
    codes = None
  finally:
    for p in procs:
      rh.kill_group(p)
  texts = []
  for log in logs:
    with open(log) as f:
      texts.append(f.read())
  assert codes == [0] * len(argvs), "\n".join(t[-2000:] for t in texts)
  # The runs overlapped (each takes seconds to reach its first lock): one
  # found a directory in use and said it waits.
  assert any("waiting for it to finish" in t for t in texts), "\n".join(
    t[-2000:] for t in texts
  )


def test_two_prepares_on_the_same_data(tmp_path):
  root = str(tmp_path / "data")
  _together([[rh.PYTHON, "-c", PREPARE, root]] * 2, tmp_path)
  cache_dir = os.path.join(root, "cache")
  metas = rh.assert_cache_consistent(cache_dir)
  manifest = cache.read_json(os.path.join(cache_dir, cache.MANIFEST))
  assert sorted(manifest["trials"]) == sorted(metas)
  with open(os.path.join(root, "raw", "synthetic.json")) as f:
    assert len(metas) == len(json.load(f)["trials"])
  built = affwild2.read_metadata(os.path.join(root, "tfds"))
  assert sorted(built["trials"]) == sorted(metas)


def test_two_preprocessing_commands_on_one_cache(test_data_root, tmp_path):
  # The session's raw data, and its cache as the expected result.
  root = test_data_root
  out = str(tmp_path / "cache")
  argv = [
    rh.PYTHON,
    "-m",
    "affjax.data.preprocess",
    f"--raw={os.path.join(root, 'raw')}",
    f"--out={out}",
    "--vggish_model=tiny",
    "--workers=2",
  ]
  _together([argv, argv], tmp_path)
  assert rh.temporaries(os.path.join(out, cache.TRIALS_DIR)) == []
  rh.assert_same_cache(out, os.path.join(root, "cache"))
