"""Tests for `affjax.distributed`: settings validation and real 2-process runs.

The multi-process tests start two Python processes on localhost (CPU, 4 fake
devices each, coordinator on 127.0.0.1) that join one 8-device mesh through
`maybe_initialize`, each feeding only its half of every batch, and check that
the trained state equals that of the same steps on 8 devices in this one
process: first for a tiny MLP, then for `configs/test.py` (the real model,
`affjax.train`'s step and the synthetic data pipeline, where each process
reads its own trials). This file is also the worker program (`python
tests/test_distributed.py --worker ...`), so both sides share the step code.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from affjax import distributed, sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GLOBAL_BATCH = 16
STEPS = 6
# Bounded dispatch: unbounded async dispatch with cross-device collectives
# deadlocks XLA's CPU runtime (see affjax.train.train_epoch).
MAX_IN_FLIGHT = 4
IN_DIM, HIDDEN, OUT_DIM = 5, 8, 3
WORKER_TIMEOUT_S = 75
REAL_EPOCHS = 2  # a few steps each on the test data
REAL_TIMEOUT_S = 300  # compiling the real model on 2 busy cores


# --------------------------------------------------------------------------
# Settings resolution and validation (no JAX initialisation).


def test_single_process_without_settings():
  p = distributed.plan(environ={})
  assert (p.mode, p.num_processes, p.process_id) == ("single", None, None)


def test_explicit_flags():
  p = distributed.plan("10.0.0.1:8476", 4, 3, "0,1", environ={})
  assert p == distributed.Plan(
    "explicit",
    "--coordinator_address, --num_processes, --process_id",
    "10.0.0.1:8476",
    4,
    3,
    (0, 1),
  )


def test_environment_variables_and_flag_precedence():
  env = {
    "AFFJAX_COORDINATOR": "head-node:1234",
    "AFFJAX_NUM_PROCESSES": "8",
    "AFFJAX_PROCESS_ID": "5",
    "AFFJAX_LOCAL_DEVICE_IDS": "2",
  }
  p = distributed.plan(environ=env)
  assert (
    p.mode,
    p.coordinator_address,
    p.num_processes,
    p.process_id,
    p.local_device_ids,
  ) == ("explicit", "head-node:1234", 8, 5, (2,))
  p = distributed.plan(process_id=7, environ=env)
  assert p.process_id == 7 and "--process_id" in p.source


def test_one_process_is_single():
  p = distributed.plan(num_processes=1, environ={})
  assert (p.mode, p.num_processes, p.process_id) == ("single", 1, 0)


@pytest.mark.parametrize(
  "address", ["10.0.0.1", "host:0", "host:70000", ":123", "a b:12", "host:port"]
)
def test_bad_address(address):
  with pytest.raises(ValueError, match="host:port"):
    distributed.plan(address, 2, 0, environ={})


def test_ipv6_address():
  assert distributed.check_address("[::1]:9000") == "[::1]:9000"


@pytest.mark.parametrize(
  "num,pid,match",
  [
    (2, 2, r"process id in \[0, 2\)"),
    (2, -1, r"process id in \[0, 2\)"),
    (0, 0, "at least 1"),
    ("two", 0, "integer"),
  ],
)
def test_bad_process_count_or_id(num, pid, match):
  with pytest.raises(ValueError, match=match):
    distributed.plan("h:1", num, pid, environ={})


def test_env_process_id_out_of_range_names_variable():
  env = {
    "AFFJAX_COORDINATOR": "h:1",
    "AFFJAX_NUM_PROCESSES": "2",
    "AFFJAX_PROCESS_ID": "3",
  }
  with pytest.raises(ValueError, match="AFFJAX_PROCESS_ID='3'"):
    distributed.plan(environ=env)


def test_partial_settings_name_what_is_missing():
  with pytest.raises(ValueError, match="--process_id / AFFJAX_PROCESS_ID"):
    distributed.plan("h:1", 2, environ={})
  with pytest.raises(
    ValueError, match="--coordinator_address / AFFJAX_COORDINATOR"
  ):
    distributed.plan(
      environ={"AFFJAX_NUM_PROCESSES": "2", "AFFJAX_PROCESS_ID": "0"}
    )


@pytest.mark.parametrize("ids", ["0,0", "-1", "a", ""])
def test_bad_local_device_ids(ids):
  if ids == "":  # empty means "not given", not an error
    assert distributed.plan(local_device_ids=ids, environ={}).mode == "single"
    return
  with pytest.raises(ValueError, match="local_device_ids"):
    distributed.plan(local_device_ids=ids, environ={})


def test_slurm_and_tpu_environments_are_auto_detected():
  slurm = {
    "SLURM_JOB_ID": "77",
    "SLURM_STEP_NODELIST": "gpu[01-02]",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
  }
  p = distributed.plan(environ=slurm)
  assert p.mode == "auto" and "SLURM (2 tasks)" in p.source
  # A one-task allocation (e.g. the batch script itself) stays single.
  assert distributed.plan(environ={**slurm, "SLURM_NTASKS": "1"}).mode == (
    "single"
  )
  tpu = {"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3"}
  assert distributed.plan(environ=tpu).mode == "auto"
  assert distributed.plan(environ={"TPU_WORKER_HOSTNAMES": "w-0"}).mode == (
    "single"
  )
  assert distributed.plan(distributed=True, environ={}).mode == "auto"


def test_maybe_initialize_single_process_is_a_no_op():
  p = distributed.maybe_initialize(environ={})
  assert p.mode == "single"
  assert not jax.distributed.is_initialized()
  assert jax.process_count() == 1 and jax.device_count() == 8


# --------------------------------------------------------------------------
# The shared data-parallel training step (tiny MLP, Adam).


def _init_params() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {
    "w1": rng.normal(size=(IN_DIM, HIDDEN)).astype(np.float32) * 0.5,
    "b1": np.zeros(HIDDEN, np.float32),
    "w2": rng.normal(size=(HIDDEN, OUT_DIM)).astype(np.float32) * 0.5,
    "b2": np.zeros(OUT_DIM, np.float32),
  }


def _global_batch_numpy(step: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(1000 + step)
  x = rng.normal(size=(GLOBAL_BATCH, IN_DIM)).astype(np.float32)
  y = np.tanh(x[:, :OUT_DIM] * 2.0) + 0.1 * x[:, -OUT_DIM:]
  return {"x": x, "y": y.astype(np.float32)}


def _loss(params, batch):
  h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  pred = h @ params["w2"] + params["b2"]
  return jnp.mean((pred - batch["y"]) ** 2)


def _train(mesh: jax.sharding.Mesh) -> dict[str, np.ndarray]:
  """STEPS Adam steps on `mesh`; each process feeds only its own rows."""
  tx = optax.adam(1e-2)
  repl, data = sharding.replicated(mesh), sharding.data_sharding(mesh)

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(_loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step = jax.jit(
    step,
    in_shardings=(repl, repl, data),
    out_shardings=(repl, repl, repl),
    donate_argnums=(0, 1),
  )
  init = jax.jit(lambda p: (p, tx.init(p)), out_shardings=(repl, repl))
  params, opt_state = init(_init_params())
  in_flight = collections.deque()
  rows = sharding.local_rows(GLOBAL_BATCH)
  for i in range(STEPS):
    local = {k: v[rows] for k, v in _global_batch_numpy(i).items()}
    params, opt_state, loss = step(
      params, opt_state, sharding.global_batch(local, mesh)
    )
    in_flight.append(loss)
    if len(in_flight) > MAX_IN_FLIGHT:
      in_flight.popleft().block_until_ready()
  # Replicated: this process's first shard holds the whole value.
  return {k: np.asarray(v.addressable_data(0)) for k, v in params.items()}


# --------------------------------------------------------------------------
# The real model: `configs/test.py` (tiny IResNet + TCNs + leader-follower
# fusion, masked CCC loss, Adam), batches from the synthetic data pipeline.


def _real_config(data_root: str):
  from configs import test as test_config  # pylint: disable=g-import-not-at-top

  config = test_config.get_config()
  config.unlock()
  for key in ("raw", "cache", "tfds"):
    config.data[f"{key}_dir"] = os.path.join(data_root, key)
  return config.lock()


def _train_real(
  mesh, data_root: str, shards: list[int], num_shards: int
) -> dict[str, np.ndarray]:
  """REAL_EPOCHS epochs of `affjax.train`'s jitted step on `mesh`.

  Each step's batch holds the rows that processes `shards` (of `num_shards`)
  read: a worker passes its own index, the single-process reference all of
  them, so both runs see the same global batches in the same row order.
  """
  from flax import traverse_util  # pylint: disable=g-import-not-at-top

  from affjax import train, train_state  # pylint: disable=g-import-not-at-top
  from affjax.data import pipeline, prepare  # pylint: disable=g-import-not-at-top

  config = _real_config(data_root)
  paths = prepare.DataPaths(
    config.data.raw_dir, config.data.cache_dir, config.data.tfds_dir
  )
  setup = train_state.build_setup(config, mesh)
  init_key, loop_key = jax.random.split(jax.random.key(config.seed))
  state = train_state.init_state(setup, init_key)
  step = train.jit_train_step(setup, mesh, loop_key, released=0)
  per_shard = config.train.batch_size // num_shards
  in_flight = collections.deque()
  for epoch in range(REAL_EPOCHS):
    parts = [
      pipeline.train_batches(
        config.data,
        paths,
        "train",
        batch_size=per_shard,
        epoch=epoch,
        seed=config.seed,
        process_index=i,
        process_count=num_shards,
      )
      for i in shards
    ]
    for rows in zip(*parts, strict=True):
      batch = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
      state, metrics = step(state, sharding.global_batch(batch, mesh))
      in_flight.append(metrics)
      if len(in_flight) > MAX_IN_FLIGHT:
        jax.block_until_ready(in_flight.popleft())
  trees = {
    "params": state.params,
    "batch_stats": state.batch_stats,
    "step": {"step": state.step},
  }
  flat = traverse_util.flatten_dict(trees, sep="/")
  return {k: np.asarray(v.addressable_data(0)) for k, v in flat.items()}


def _worker(argv: list[str]) -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--worker", action="store_true")
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument(
    "--data_root",
    default="",
    help="train configs/test.py on this data (else the MLP)",
  )
  args = parser.parse_args(argv)
  jax.config.update("jax_num_cpu_devices", 4)
  distributed.maybe_initialize(
    f"127.0.0.1:{args.port}",
    args.num_processes,
    args.process_id,
    initialization_timeout=60,
  )
  mesh = sharding.make_mesh([("data", -1)])
  if args.data_root:
    params = _train_real(
      mesh, args.data_root, [jax.process_index()], jax.process_count()
    )
  else:
    params = _train(mesh)
  counts = np.array(
    [
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
    ]
  )
  tmp = f"{args.out}.tmp.npz"
  np.savez(tmp, counts=counts, **params)
  os.replace(tmp, args.out)
  jax.distributed.shutdown()


# --------------------------------------------------------------------------
# Multi-process harness.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _kill(procs) -> None:
  for proc in procs:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  for proc in procs:
    proc.wait()


def run_processes(
  argvs: list[list[str]],
  logdir: str,
  timeout: float = WORKER_TIMEOUT_S,
  while_running: Callable[[], Any] | None = None,
) -> Any:
  """Runs one subprocess per argv; all are killed if any fails or hangs.

  `while_running()` (if given) is called once the processes have started,
  in this process, and its result returned.
  """
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "PYTHONPATH": REPO,
  }
  env.pop("XLA_FLAGS", None)
  with contextlib.ExitStack() as stack:
    logs = [
      stack.enter_context(open(os.path.join(logdir, f"process_{i}.log"), "w+"))
      for i in range(len(argvs))
    ]
    procs = []
    stack.callback(_kill, procs)  # on any exit, even an interrupt
    for argv, log in zip(argvs, logs, strict=True):
      # Own session: the whole group can be killed, leaving no orphans.
      procs.append(
        subprocess.Popen(
          argv,
          env=env,
          stdout=log,
          stderr=subprocess.STDOUT,
          cwd=REPO,
          start_new_session=True,
        )
      )
    result = while_running() if while_running is not None else None
    # Stop at the first failure: the others would wait for it until timeout.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      codes = [p.poll() for p in procs]
      if all(c == 0 for c in codes) or any(c not in (None, 0) for c in codes):
        break
      time.sleep(0.2)
    hung = sum(p.poll() is None for p in procs)
    _kill(procs)
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
      text = ""
      for i, log in enumerate(logs):
        log.seek(0)
        text += f"\n--- process {i} (rc={procs[i].returncode}) ---\n"
        text += log.read()[-3000:]
      pytest.fail(
        f"processes {failed} failed, {hung} hung (timeout {timeout} s):{text}"
      )
  return result


def _run_two_workers(
  tmp: str,
  *extra: str,
  timeout: float = WORKER_TIMEOUT_S,
  while_running: Callable[[], Any] | None = None,
):
  """Runs 2 worker processes (4 CPU devices each).

  Returns:
    Their results (dicts of arrays) and the result of `while_running()`.
  """
  port = _free_port()
  outs = [os.path.join(tmp, f"out_{i}.npz") for i in range(2)]
  local = run_processes(
    [
      [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        f"--process_id={i}",
        "--num_processes=2",
        f"--port={port}",
        f"--out={outs[i]}",
        *extra,
      ]
      for i in range(2)
    ],
    tmp,
    timeout,
    while_running,
  )
  results = [dict(np.load(out)) for out in outs]
  for i, result in enumerate(results):
    np.testing.assert_array_equal(result.pop("counts"), [i, 2, 4, 8])
  return results, local


def test_two_processes_match_one_process_on_8_devices(tmp_path):
  results, single = _run_two_workers(
    str(tmp_path),
    while_running=lambda: _train(sharding.make_mesh([("data", -1)])),
  )
  initial = _init_params()
  for name, value in single.items():
    assert not np.allclose(value, initial[name]), name  # it did train
    for result in results:
      np.testing.assert_allclose(
        result[name], value, rtol=1e-5, atol=1e-6, err_msg=name
      )


@pytest.fixture(scope="module")
def test_data(test_data_root) -> str:
  """configs/test.py's synthetic data (the session's, tests/conftest.py)."""
  return test_data_root


def test_two_processes_match_one_process_real_config(test_data, tmp_path):
  """configs/test.py's model and data pipeline: 2 processes x 4 devices.

  Parameters, BatchNorm statistics and the step count must agree with the
  single-process run; the reference trains here while the workers run.
  """
  results, single = _run_two_workers(
    str(tmp_path),
    f"--data_root={test_data}",
    timeout=REAL_TIMEOUT_S,
    while_running=lambda: _train_real(
      sharding.make_mesh([("data", -1)]), test_data, [0, 1], 2
    ),
  )
  assert int(single["step/step"]) >= REAL_EPOCHS  # compared below too
  for result in results:
    assert sorted(result) == sorted(single)
    for name, value in single.items():
      np.testing.assert_allclose(
        result[name], value, rtol=1e-4, atol=1e-5, err_msg=name
      )


if __name__ == "__main__":
  _worker(sys.argv[1:])
