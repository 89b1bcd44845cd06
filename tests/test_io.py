"""affjax.io: URL-safe paths, atomic writes, permissions, temporaries."""

import json
import math
import os
import stat

import pytest

from affjax import io


def test_urls_are_never_made_local():
  assert io.is_url("gs://bucket/run")
  assert not io.is_url("/tmp/run")
  assert io.absolute("gs://bucket/run/") == "gs://bucket/run"
  assert io.absolute("rel") == os.path.join(os.getcwd(), "rel")
  assert io.join("gs://b/run/", "eval", "x.json") == "gs://b/run/eval/x.json"
  assert io.dirname("gs://b/run/eval/x.json") == "gs://b/run/eval"
  assert io.basename("gs://b/run/eval/") == "eval"


def test_atomic_write_json_readable_by_others(tmp_path):
  path = tmp_path / "sub" / "r.json"
  io.write_json(path, {"a": 1.5, "b": [math.nan, math.inf]})
  assert json.loads(path.read_text()) == {"a": 1.5, "b": [None, None]}
  umask = os.umask(0)
  os.umask(umask)
  assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
  assert io.read_json(path) == {"a": 1.5, "b": [None, None]}


def test_failed_write_keeps_old_file_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "r.txt"
  io.write_text(path, "old")

  def fail(f):
    f.write("half")
    raise RuntimeError("killed")

  with pytest.raises(RuntimeError):
    io.atomic_write(path, fail)
  assert path.read_text() == "old"
  assert os.listdir(tmp_path) == ["r.txt"]


def test_remove_temporaries(tmp_path):
  (tmp_path / f"{io.TMP_PREFIX}r.json-abc").write_text("x")
  (tmp_path / "keep.json").write_text("y")
  assert io.remove_temporaries(tmp_path) == [f"{io.TMP_PREFIX}r.json-abc"]
  assert os.listdir(tmp_path) == ["keep.json"]


def test_bad_json_names_file(tmp_path):
  path = tmp_path / "bad.json"
  path.write_text("{")
  with pytest.raises(ValueError, match="bad.json"):
    io.read_json(path)
