"""Joins this process to a multi-process JAX run (`jax.distributed`).

`maybe_initialize` is called by `affjax.main` before any JAX computation. It
decides whether this process is one of several and, if so, calls
`jax.distributed.initialize` so that `jax.devices()` lists the devices of all
processes and one mesh can span every host. Where the settings come from, in
order of precedence:

1. explicit arguments (`--coordinator_address`, `--num_processes`,
   `--process_id`, `--local_device_ids` flags of `affjax.main`);
2. the environment variables `AFFJAX_COORDINATOR` (`host:port`),
   `AFFJAX_NUM_PROCESSES`, `AFFJAX_PROCESS_ID` and `AFFJAX_LOCAL_DEVICE_IDS`
   (comma-separated ints) for launchers of our own (`launch/slurm.py` sets
   them from SLURM's variables); explicit settings switch JAX's own cluster
   detection off, so `local_device_ids` unset means all visible devices;
3. a cluster JAX detects by itself, initialised with no arguments: a SLURM
   step with more than one task (`SLURM_JOB_ID`, `SLURM_STEP_NODELIST`,
   `SLURM_NTASKS`, `SLURM_PROCID`, `SLURM_LOCALID`), a TPU slice on GKE
   (`TPU_WORKER_HOSTNAMES` with several hosts), or, when `distributed=True`
   (the `--distributed` flag), anything else JAX can detect, notably a Cloud
   TPU VM pod slice (found through the GCE metadata server, which is only
   queried when asked for).

Otherwise the run is single-process and nothing is initialised. Either way the
process index/count and local/global device counts are logged.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence

import jax
from absl import logging

ENV_COORDINATOR = "AFFJAX_COORDINATOR"
ENV_NUM_PROCESSES = "AFFJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "AFFJAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "AFFJAX_LOCAL_DEVICE_IDS"

# What jax's SLURM detection reads (jax/_src/clusters/slurm_cluster.py).
_SLURM_VARS = (
  "SLURM_JOB_ID",
  "SLURM_STEP_NODELIST",
  "SLURM_NTASKS",
  "SLURM_PROCID",
  "SLURM_LOCALID",
)

# host:port with host a name, an IPv4 address or a bracketed IPv6 address.
_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d+)$")


@dataclasses.dataclass(frozen=True)
class Plan:
  """How this process joins the run, before anything is initialised.

  Attributes:
    mode: 'single' (nothing to do), 'explicit' (arguments and/or AFFJAX_*
      variables), or 'auto' (`jax.distributed.initialize()` detects the
      cluster).
    source: human-readable origin of the settings, for logs and errors.
    coordinator_address: `host:port` of process 0's coordinator service.
    num_processes: number of processes in the run.
    process_id: this process's index, in `[0, num_processes)`.
    local_device_ids: devices of this host this process uses (None = all).
  """

  mode: str
  source: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None


def check_address(address: str, what: str = "coordinator_address") -> str:
  """Returns `address` if it is `host:port` with a port in 1..65535.

  Raises:
    ValueError: naming `what`, the expected form and the value found.
  """
  match = _ADDRESS.match(address.strip()) if address else None
  if match is None or not 1 <= int(match.group(2)) <= 65535:
    raise ValueError(
      f"{what}={address!r}: expected 'host:port' (e.g. "
      "'10.0.0.1:8476'), with a port in 1..65535"
    )
  return address.strip()


def _to_int(value: int | str, what: str) -> int:
  # bool is an int subclass, but `--num_processes=True` is a mistake.
  ok = not isinstance(value, bool)
  try:
    number = int(value)
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f"{what}={value!r}: expected an integer")
  return number


def _device_ids(
  value: int | str | Sequence[int | str], what: str
) -> tuple[int, ...]:
  if isinstance(value, str):
    value = [v for v in value.replace(" ", "").split(",") if v]
  elif not isinstance(value, Sequence):
    value = [value]
  ids = tuple(_to_int(v, what) for v in value)
  if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
    raise ValueError(
      f"{what}={value!r}: expected distinct non-negative "
      "device ids, e.g. '0,1,2,3'"
    )
  return ids


def _slurm_tasks(env: Mapping[str, str]) -> int:
  if not all(name in env for name in _SLURM_VARS):
    return 0
  return _to_int(
    env.get("SLURM_STEP_NUM_TASKS", env["SLURM_NTASKS"]), "SLURM_NTASKS"
  )


def _tpu_hosts(env: Mapping[str, str]) -> int:
  names = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
  return len([n for n in (names or "").split(",") if n])


def plan(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_device_ids: int | str | Sequence[int] | None = None,
  *,
  distributed: bool = False,
  environ: Mapping[str, str] | None = None,
) -> Plan:
  """Decides how to join the run (see the module docstring); no side effects.

  Args:
    coordinator_address: `host:port` of process 0 (flag), or None.
    num_processes: total number of processes (flag), or None.
    process_id: this process's index (flag), or None.
    local_device_ids: local devices to use: ints or a string '0,1'; None =
      all visible devices (or JAX's per-cluster default).
    distributed: the `--distributed` flag: the caller says this process is
      one of several, so with nothing explicit JAX auto-detects the cluster.
    environ: environment to read (default `os.environ`).

  Returns:
    The validated plan.

  Raises:
    ValueError: on malformed values, a process id out of range, or a partial
      explicit setting (naming the missing flags / variables).
  """
  env = os.environ if environ is None else environ
  values = {}
  for key, flag_value, env_name in (
    ("coordinator_address", coordinator_address, ENV_COORDINATOR),
    ("num_processes", num_processes, ENV_NUM_PROCESSES),
    ("process_id", process_id, ENV_PROCESS_ID),
    ("local_device_ids", local_device_ids, ENV_LOCAL_DEVICE_IDS),
  ):
    if flag_value is not None and flag_value != "":
      values[key] = (flag_value, f"--{key}")
    elif env.get(env_name, "").strip():
      values[key] = (env[env_name].strip(), env_name)
  devices = None
  if "local_device_ids" in values:
    value, what = values.pop("local_device_ids")
    devices = _device_ids(value, what)
  source = ", ".join(what for _, what in values.values()) or None
  if values:
    return _explicit_plan(values, devices, source)
  tasks, hosts = _slurm_tasks(env), _tpu_hosts(env)
  if tasks > 1:
    return Plan("auto", f"SLURM ({tasks} tasks)", local_device_ids=devices)
  if hosts > 1:
    return Plan(
      "auto", f"TPU_WORKER_HOSTNAMES ({hosts} hosts)", local_device_ids=devices
    )
  if distributed:
    return Plan(
      "auto", "--distributed (cluster auto-detection)", local_device_ids=devices
    )
  return Plan("single", "no multi-process settings", local_device_ids=devices)


def _explicit_plan(
  values: dict[str, tuple[object, str]],
  devices: tuple[int, ...] | None,
  source: str,
) -> Plan:
  """Validates coordinator/process count/id given by flags or AFFJAX_*."""
  num = pid = None
  if "num_processes" in values:
    value, what = values["num_processes"]
    num = _to_int(value, what)
    if num < 1:
      raise ValueError(f"{what}={value!r}: expected at least 1 process")
  if "process_id" in values:
    value, what = values["process_id"]
    pid = _to_int(value, what)
    if num is not None and not 0 <= pid < num:
      raise ValueError(
        f"{what}={value!r}: expected a process id in "
        f"[0, {num}) for {num} processes"
      )
  address = None
  if "coordinator_address" in values:
    value, what = values["coordinator_address"]
    address = check_address(str(value), what)
  if num == 1 and pid in (None, 0):
    return Plan("single", source, address, 1, 0, devices)
  missing = [
    f"--{key} / {env}"
    for key, env in (
      ("coordinator_address", ENV_COORDINATOR),
      ("num_processes", ENV_NUM_PROCESSES),
      ("process_id", ENV_PROCESS_ID),
    )
    if key not in values
  ]
  if missing:
    raise ValueError(
      f"incomplete multi-process settings: {source} given but "
      f"{', '.join(missing)} missing; give all three (or none, to let JAX "
      "detect a TPU/SLURM cluster with --distributed)"
    )
  return Plan("explicit", source, address, num, pid, devices)


def maybe_initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_device_ids: int | str | Sequence[int] | None = None,
  *,
  distributed: bool = False,
  initialization_timeout: int = 300,
  environ: Mapping[str, str] | None = None,
) -> Plan:
  """Initialises `jax.distributed` if this is one of several processes.

  Must run before any JAX computation (it may not follow `jax.devices()`).
  Calling it again after a successful initialisation is a no-op.

  Args:
    coordinator_address, num_processes, process_id, local_device_ids,
      distributed, environ: as in `plan`.
    initialization_timeout: seconds to wait for all processes to connect.

  Returns:
    The plan that was carried out.

  Raises:
    ValueError: as in `plan`; or when `distributed=True` but JAX finds no
      cluster and no coordinator was given.
  """
  p = plan(
    coordinator_address,
    num_processes,
    process_id,
    local_device_ids,
    distributed=distributed,
    environ=environ,
  )
  if p.mode == "single":
    if p.local_device_ids is not None:
      logging.warning(
        "local_device_ids=%s ignored: single-process run", p.local_device_ids
      )
  elif jax.distributed.is_initialized():
    logging.info(
      "jax.distributed already initialised; not again (%s).", p.source
    )
  else:
    logging.info(
      "Initialising jax.distributed from %s: coordinator=%s "
      "num_processes=%s process_id=%s local_device_ids=%s",
      p.source,
      p.coordinator_address,
      p.num_processes,
      p.process_id,
      p.local_device_ids,
    )
    try:
      jax.distributed.initialize(
        coordinator_address=p.coordinator_address,
        num_processes=p.num_processes,
        process_id=p.process_id,
        local_device_ids=(
          None if p.local_device_ids is None else list(p.local_device_ids)
        ),
        initialization_timeout=initialization_timeout,
        # Explicit settings are the whole truth: inside a SLURM step JAX
        # would otherwise fill local_device_ids=None with [SLURM_LOCALID],
        # i.e. one GPU for a process meant to use all of a node's GPUs.
        cluster_detection_method=(
          "deactivate" if p.mode == "explicit" else None
        ),
      )
    except ValueError as e:
      if p.mode != "auto":
        raise
      raise ValueError(
        f"{p.source}: JAX found no cluster to join ({e}). On a Cloud TPU "
        "VM or in a SLURM step this is automatic; elsewhere pass "
        "--coordinator_address, --num_processes and --process_id (or set "
        f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})"
      ) from e
  logging.info(
    "Process %d of %d; %d local devices, %d global devices (%s).",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].platform,
  )
  return p
