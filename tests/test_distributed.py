"""Tests for `affjax.distributed`: settings validation and a real 2-process run.

The multi-process test starts two Python processes on localhost (CPU, 4 fake
devices each, coordinator on 127.0.0.1) that join one 8-device mesh through
`maybe_initialize`, each feeding only its half of every batch, and checks the
trained parameters equal those of the same steps on 8 devices in this one
process. This file is also the worker program (`python tests/test_distributed.py
--worker ...`), so the two paths share the step code.
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
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from affjax import distributed, sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GLOBAL_BATCH = 16
STEPS = 6
MAX_IN_FLIGHT = 4           # bounded dispatch: deps_notes.md section b
IN_DIM, HIDDEN, OUT_DIM = 5, 8, 3
WORKER_TIMEOUT_S = 75


# --------------------------------------------------------------------------
# Settings resolution and validation (no JAX initialisation).


def test_single_process_without_settings():
  p = distributed.plan(environ={})
  assert (p.mode, p.num_processes, p.process_id) == ("single", None, None)


def test_explicit_flags():
  p = distributed.plan("10.0.0.1:8476", 4, 3, "0,1", environ={})
  assert p == distributed.Plan("explicit", "--coordinator_address, "
                               "--num_processes, --process_id",
                               "10.0.0.1:8476", 4, 3, (0, 1))


def test_environment_variables_and_flag_precedence():
  env = {"AFFJAX_COORDINATOR": "head-node:1234", "AFFJAX_NUM_PROCESSES": "8",
         "AFFJAX_PROCESS_ID": "5", "AFFJAX_LOCAL_DEVICE_IDS": "2"}
  p = distributed.plan(environ=env)
  assert (p.mode, p.coordinator_address, p.num_processes, p.process_id,
          p.local_device_ids) == ("explicit", "head-node:1234", 8, 5, (2,))
  p = distributed.plan(process_id=7, environ=env)
  assert p.process_id == 7 and "--process_id" in p.source


def test_one_process_is_single():
  p = distributed.plan(num_processes=1, environ={})
  assert (p.mode, p.num_processes, p.process_id) == ("single", 1, 0)


@pytest.mark.parametrize("address", ["10.0.0.1", "host:0", "host:70000",
                                     ":123", "a b:12", "host:port"])
def test_bad_address(address):
  with pytest.raises(ValueError, match="host:port"):
    distributed.plan(address, 2, 0, environ={})


def test_ipv6_address():
  assert distributed.check_address("[::1]:9000") == "[::1]:9000"


@pytest.mark.parametrize("num,pid,match", [
    (2, 2, r"process id in \[0, 2\)"), (2, -1, r"process id in \[0, 2\)"),
    (0, 0, "at least 1"), ("two", 0, "integer")])
def test_bad_process_count_or_id(num, pid, match):
  with pytest.raises(ValueError, match=match):
    distributed.plan("h:1", num, pid, environ={})


def test_env_process_id_out_of_range_names_variable():
  env = {"AFFJAX_COORDINATOR": "h:1", "AFFJAX_NUM_PROCESSES": "2",
         "AFFJAX_PROCESS_ID": "3"}
  with pytest.raises(ValueError, match="AFFJAX_PROCESS_ID='3'"):
    distributed.plan(environ=env)


def test_partial_settings_name_what_is_missing():
  with pytest.raises(ValueError, match="--process_id / AFFJAX_PROCESS_ID"):
    distributed.plan("h:1", 2, environ={})
  with pytest.raises(ValueError, match="--coordinator_address / "
                     "AFFJAX_COORDINATOR"):
    distributed.plan(environ={"AFFJAX_NUM_PROCESSES": "2",
                              "AFFJAX_PROCESS_ID": "0"})


@pytest.mark.parametrize("ids", ["0,0", "-1", "a", ""])
def test_bad_local_device_ids(ids):
  if ids == "":   # empty means "not given", not an error
    assert distributed.plan(local_device_ids=ids, environ={}).mode == "single"
    return
  with pytest.raises(ValueError, match="local_device_ids"):
    distributed.plan(local_device_ids=ids, environ={})


def test_slurm_and_tpu_environments_are_auto_detected():
  slurm = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "gpu[01-02]",
           "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
  p = distributed.plan(environ=slurm)
  assert p.mode == "auto" and "SLURM (2 tasks)" in p.source
  # A one-task allocation (e.g. the batch script itself) stays single.
  assert distributed.plan(environ={**slurm, "SLURM_NTASKS": "1"}).mode == (
      "single")
  tpu = {"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3"}
  assert distributed.plan(environ=tpu).mode == "auto"
  assert distributed.plan(environ={"TPU_WORKER_HOSTNAMES": "w-0"}).mode == (
      "single")
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
  return {"w1": rng.normal(size=(IN_DIM, HIDDEN)).astype(np.float32) * 0.5,
          "b1": np.zeros(HIDDEN, np.float32),
          "w2": rng.normal(size=(HIDDEN, OUT_DIM)).astype(np.float32) * 0.5,
          "b2": np.zeros(OUT_DIM, np.float32)}


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

  step = jax.jit(step, in_shardings=(repl, repl, data),
                 out_shardings=(repl, repl, repl), donate_argnums=(0, 1))
  init = jax.jit(lambda p: (p, tx.init(p)), out_shardings=(repl, repl))
  params, opt_state = init(_init_params())
  in_flight = collections.deque()
  rows = sharding.local_rows(GLOBAL_BATCH)
  for i in range(STEPS):
    local = {k: v[rows] for k, v in _global_batch_numpy(i).items()}
    params, opt_state, loss = step(params, opt_state,
                                   sharding.global_batch(local, mesh))
    in_flight.append(loss)
    if len(in_flight) > MAX_IN_FLIGHT:
      in_flight.popleft().block_until_ready()
  # Replicated: this process's first shard holds the whole value.
  return {k: np.asarray(v.addressable_data(0)) for k, v in params.items()}


def _worker(argv: list[str]) -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--worker", action="store_true")
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  jax.config.update("jax_num_cpu_devices", 4)
  distributed.maybe_initialize(f"127.0.0.1:{args.port}", args.num_processes,
                               args.process_id, initialization_timeout=60)
  mesh = sharding.make_mesh([("data", -1)])
  params = _train(mesh)
  counts = np.array([jax.process_index(), jax.process_count(),
                     jax.local_device_count(), jax.device_count()])
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


def run_processes(argvs: list[list[str]], logdir: str,
                  timeout: float = WORKER_TIMEOUT_S) -> None:
  """Runs one subprocess per argv; all are killed if any fails or hangs."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
         "PYTHONPATH": REPO}
  env.pop("XLA_FLAGS", None)
  with contextlib.ExitStack() as stack:
    logs = [stack.enter_context(open(os.path.join(logdir, f"process_{i}.log"),
                                     "w+")) for i in range(len(argvs))]
    procs = []
    stack.callback(_kill, procs)   # on any exit, even an interrupt
    for argv, log in zip(argvs, logs, strict=True):
      # Own session: the whole group can be killed, leaving no orphans.
      procs.append(subprocess.Popen(argv, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, cwd=REPO,
                                    start_new_session=True))
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
      pytest.fail(f"processes {failed} failed, {hung} hung (timeout "
                  f"{timeout} s):{text}")


def test_two_processes_match_one_process_on_8_devices():
  with tempfile.TemporaryDirectory() as tmp:
    port = _free_port()
    outs = [os.path.join(tmp, f"out_{i}.npz") for i in range(2)]
    run_processes(
        [[sys.executable, os.path.abspath(__file__), "--worker",
          f"--process_id={i}", "--num_processes=2", f"--port={port}",
          f"--out={outs[i]}"] for i in range(2)], tmp)
    results = [dict(np.load(out)) for out in outs]
  for i, result in enumerate(results):
    np.testing.assert_array_equal(result.pop("counts"), [i, 2, 4, 8])
  single = _train(sharding.make_mesh([("data", -1)]))
  initial = _init_params()
  for name, value in single.items():
    assert not np.allclose(value, initial[name]), name   # it did train
    for result in results:
      np.testing.assert_allclose(result[name], value, rtol=1e-5, atol=1e-6,
                                 err_msg=name)


if __name__ == "__main__":
  _worker(sys.argv[1:])
