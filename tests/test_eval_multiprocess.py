"""Evaluation on several processes whose devices interleave along the mesh.

On TPU pod slices `jax.make_mesh` orders devices by their physical place, so
the processes' devices interleave along the data axis (v4-32: processes
[0, 1, 2, 3, 0, 1, 2, 3, ...]). Here 2 and 4 CPU processes (localhost
coordinator) build such a mesh and evaluate `configs/test.py`'s checkpoint
twice: through `train.evaluate_split` (what validation in the training loop
runs) and through `train.evaluate_checkpoint` (`--mode=evaluate`). Their
results.json and stitched predictions must be byte-identical to those of one
process with as many devices: each device runs the same program on the same
rows, so only a scrambled row order or a window paired with another window's
prediction could make them differ.

48 devices in all (1 x 48, 2 x 24, 4 x 12): XLA's CPU backend rounds some
operations differently depending on how many devices a process has, even for
a computation on one device. Measured on a 2-core machine, the model's output
bits agree within the groups {1, 2, 3}, {4, 8}, {6} and {12, 16, 24, 32, 48}
devices per process, so 48 keeps every run in one group; the checkpoint is
trained on this process's 8 devices (a cross-topology restore as well).

This file is also the worker program (`python tests/test_eval_multiprocess.py
--worker ...`).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np
import pytest

from affjax import distributed, sharding

TOTAL_DEVICES = 48
TIMEOUT_S = 300  # compiling on 2 busy cores, several processes


def _config(data_root: str):
  from configs import test as test_config  # pylint: disable=g-import-not-at-top

  config = test_config.get_config()
  config.unlock()
  for key in ("raw", "cache", "tfds"):
    config.data[f"{key}_dir"] = os.path.join(data_root, key)
  config.train.max_epochs = 1
  config.train.eval_batch_size = TOTAL_DEVICES  # one window per device
  return config.lock()


def _interleave(devices) -> list:
  by_process = {}
  for d in sorted(devices, key=lambda d: d.id):
    by_process.setdefault(d.process_index, []).append(d)
  columns = zip(*(by_process[p] for p in sorted(by_process)), strict=True)
  return [d for column in columns for d in column]


def _evaluate(config, workdir: str, out: str) -> None:
  """Validation (evaluate_split) and --mode=evaluate into `out`/{val,eval}."""
  from affjax import checkpoints, train  # pylint: disable=g-import-not-at-top
  from affjax.data import pipeline, prepare  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh(config.mesh)
  program = train.build_program(config, mesh)
  manager = checkpoints.create_manager(workdir, read_only=True)
  state = checkpoints.restore(
    manager, manager.latest_step(), program.setup.abstract_state
  ).state
  paths = prepare.resolve_paths(config.data, workdir)
  split = pipeline.load_split(config.data, paths, "validation")
  train.evaluate_split(
    program.eval_step,
    state,
    mesh,
    config,
    paths,
    split,
    out_dir=os.path.join(out, "val"),
  )
  train.evaluate_checkpoint(config, workdir, out_dir=os.path.join(out, "eval"))


def _worker(argv: list[str]) -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--worker", action="store_true")
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--data_root", required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  jax.config.update("jax_num_cpu_devices", TOTAL_DEVICES // args.num_processes)
  distributed.maybe_initialize(
    f"127.0.0.1:{args.port}",
    args.num_processes,
    args.process_id,
    initialization_timeout=60,
  )
  # Every mesh of the run (affjax.train builds its own) in the interleaved
  # order of a TPU pod slice.
  make_mesh = sharding.make_mesh
  sharding.make_mesh = lambda axes, devices=None: make_mesh(
    axes, _interleave(jax.devices() if devices is None else devices)
  )
  mesh = sharding.make_mesh([("data", -1)])
  order = [d.process_index for d in mesh.devices.flat]
  n = args.num_processes
  assert order == [i % n for i in range(TOTAL_DEVICES)], order
  assert jax.device_count() == TOTAL_DEVICES
  _evaluate(_config(args.data_root), args.workdir, args.out)
  if jax.distributed.is_initialized():
    jax.distributed.shutdown()


def _files(root: str) -> dict[str, bytes]:
  out = {}
  for base, _, names in os.walk(root):
    for name in names:
      path = os.path.join(base, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def _run(tmp: str, data_root: str, workdir: str, num_processes: int) -> str:
  """Evaluates on `num_processes` worker processes; returns their output."""
  from tests.test_distributed import _free_port, run_processes  # pylint: disable=g-import-not-at-top

  os.makedirs(tmp, exist_ok=True)
  port = _free_port()
  out = os.path.join(tmp, "out")
  run_processes(
    [
      [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        f"--process_id={i}",
        f"--num_processes={num_processes}",
        f"--port={port}",
        f"--data_root={data_root}",
        f"--workdir={workdir}",
        f"--out={out}",
      ]
      for i in range(num_processes)
    ],
    tmp,
    TIMEOUT_S,
  )
  return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """configs/test.py trained 1 epoch here; its evaluation by one process."""
  from affjax import train  # pylint: disable=g-import-not-at-top
  from affjax.data import prepare  # pylint: disable=g-import-not-at-top

  root = str(tmp_path_factory.mktemp("eval_mp"))
  data_root = os.path.join(root, "data")
  config = _config(data_root)
  prepare.prepare(config.data, data_root)
  workdir = os.path.join(root, "work")
  train.train_and_evaluate(config, workdir)
  reference = _run(os.path.join(root, "one"), data_root, workdir, 1)
  return data_root, workdir, _files(reference)


@pytest.mark.parametrize("num_processes", [2, 4])
def test_interleaved_processes_match_one_process(
  trained, tmp_path, num_processes
):
  data_root, workdir, reference = trained
  got = _files(_run(str(tmp_path), data_root, workdir, num_processes))
  assert sorted(got) == sorted(reference)
  assert any(k.startswith("val/predictions/") for k in got)
  assert any(k.startswith("eval/predictions/") for k in got)
  for name, data in reference.items():
    assert got[name] == data, name
  # Validation and --mode=evaluate score the same checkpoint the same way.
  for name in reference:
    if name.startswith("val/"):
      assert reference[name] == reference["eval/" + name[4:]], name
  # The model is not constant: a scrambled window order would show.
  preds = [
    np.loadtxt(v.decode().splitlines()[1:], delimiter=",")
    for k, v in reference.items()
    if k.startswith("val/predictions/")
  ]
  assert np.std(np.concatenate(preds)) > 1e-4


if __name__ == "__main__":
  _worker(sys.argv[1:])
