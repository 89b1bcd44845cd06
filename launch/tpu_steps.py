"""The steps of a TPU run, each on one `Tpu` (used by `launch/tpu_vm.py`).

Every command goes through the launcher's `Runner`, so a dry run prints
them and tests substitute a runner that simulates the cloud.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
from collections.abc import Sequence

from launch import jobs as jobs_lib
from launch import tpu_remote as remote

TAR_EXCLUDES = (
  ".git",
  ".venv",
  "workdirs",
  "__pycache__",
  "*.egg-info",
  "build",
  ".pytest_cache",
)
# States of `tpu-vm describe` / `queued-resources describe` (state.state).
USABLE = {"READY", "ACTIVE"}
GONE = {"PREEMPTED", "TERMINATED", "STOPPED", "SUSPENDED", "FAILED"}
# Status polls that may fail in a row (ssh flakes) while the TPU is usable.
MAX_POLL_FAILURES = 10


@dataclasses.dataclass
class Tpu:
  """One TPU VM (or queued resource) and the jobs it runs."""

  args: argparse.Namespace
  name: str
  jobs: list[jobs_lib.Job]
  extra: list[str]
  runner: jobs_lib.Runner
  # Jobs that finished in this launch: a recreated TPU does not rerun them.
  finished: set[str] = dataclasses.field(default_factory=set)

  def gcloud(
    self,
    group: str,
    verb: str,
    *rest: str,
    positional: Sequence[str] | None = None,
  ) -> list[str]:
    """`gcloud compute tpus <group> <verb> <name> --zone=... [--project]`
    (`positional` replaces the name, e.g. for scp)."""
    names = [self.name] if positional is None else list(positional)
    cmd = ["gcloud", "compute", "tpus", group, verb, *names]
    cmd.append(f"--zone={self.args.zone}")
    if self.args.project:
      cmd.append(f"--project={self.args.project}")
    return cmd + list(rest)

  def ssh(self, command: str, worker: str = "all") -> list[str]:
    return self.gcloud(
      "tpu-vm", "ssh", f"--worker={worker}", f"--command={command}"
    )

  def create_command(self) -> list[str]:
    a = self.args
    spot = ["--spot"] if a.spot else []
    if a.queued:
      return self.gcloud(
        "queued-resources",
        "create",
        f"--node-id={self.name}",
        f"--accelerator-type={a.accelerator_type}",
        f"--runtime-version={a.runtime_version}",
        *spot,
      )
    return self.gcloud(
      "tpu-vm",
      "create",
      f"--accelerator-type={a.accelerator_type}",
      f"--version={a.runtime_version}",
      *spot,
    )

  def describe_command(self) -> list[str]:
    if self.args.queued:
      return self.gcloud(
        "queued-resources", "describe", "--format=value(state.state)"
      )
    return self.gcloud("tpu-vm", "describe", "--format=value(state)")

  def delete_command(self) -> list[str]:
    if self.args.queued:  # --force: delete its TPU VM too
      return self.gcloud("queued-resources", "delete", "--force", "--quiet")
    return self.gcloud("tpu-vm", "delete", "--quiet")

  def state(self) -> str:
    """READY/ACTIVE/PREEMPTED/..., or "" if it does not exist."""
    r = self.runner.run(
      self.describe_command(), check=False, capture=True, echo=False
    )
    return r.stdout.strip().upper() if r.returncode == 0 else ""


def ensure_tpu(tpu: Tpu) -> bool:
  """Creates the TPU unless a usable one exists; waits until it is usable.

  A preempted/terminated/suspended one is deleted and created again.

  Returns:
    True if an existing usable TPU was reused (a job may be running on it).
  """
  runner = tpu.runner
  if runner.dry_run:
    runner.run(tpu.create_command())
    if tpu.args.queued:
      runner.comment(f"repeated until it prints ACTIVE: {tpu.name}")
      runner.run(tpu.describe_command())
    return False
  created = False
  while True:
    state = tpu.state()
    if state in USABLE:
      return not created
    if state in GONE:
      runner.comment(f"{tpu.name} is {state}: deleting it to create it anew")
      runner.run(tpu.delete_command())
      state = ""
    if not state:
      runner.run(tpu.create_command())
      created = True
      continue
    runner.comment(f"{tpu.name} is {state}; waiting")
    runner.sleep(tpu.args.poll_seconds)


def job_states(tpu: Tpu, job: jobs_lib.Job) -> dict[str, str] | None:
  """Per-worker state of a job, or None if not every worker answered."""
  r = tpu.runner.run(
    tpu.ssh(remote.status_command(job)), check=False, capture=True, echo=False
  )
  states = remote.parse_status(r.stdout)
  return states if r.returncode == 0 and states else None


def copy_code(tpu: Tpu) -> None:
  """Packs this checkout and copies it to every worker."""
  archive = os.path.join("/tmp", f"{tpu.name}-{remote.ARCHIVE}")
  tpu.runner.run(
    ["tar", "-czf", archive, "-C", jobs_lib.REPO]
    + [f"--exclude={e}" for e in TAR_EXCLUDES]
    + ["."]
  )
  tpu.runner.run(
    tpu.gcloud(
      "tpu-vm",
      "scp",
      "--worker=all",
      positional=[archive, f"{tpu.name}:{remote.ARCHIVE}"],
    )
  )


def install(tpu: Tpu) -> None:
  """Installs the copied code on every worker, then `--setup_command`."""
  a = tpu.args
  tpu.runner.run(
    tpu.ssh(remote.install_command(a.python, a.extras, a.jax_version))
  )
  if a.setup_command:
    tpu.runner.run(tpu.ssh(a.setup_command))


def _stream_log(tpu: Tpu, job: jobs_lib.Job, offset: int) -> int:
  """Writes the new part of the worker-0 log; returns the new offset."""
  r = tpu.runner.run(
    tpu.ssh(remote.log_command(job, offset), worker="0"),
    check=False,
    capture=True,
    echo=False,
  )
  if r.returncode or not r.stdout:
    return offset
  data = r.stdout.encode("utf-8", "surrogateescape")  # the bytes read
  tpu.runner.write(data.decode("utf-8", "replace"))
  return offset + len(data)


def run_job(tpu: Tpu, job: jobs_lib.Job) -> bool:
  """Starts (or reattaches to) a job and polls until it ends.

  Returns:
    True when it finished with status 0 on every worker, False when it was
    interrupted (TPU preempted or gone, a worker lost its process) and
    should resume on a usable TPU.

  Raises:
    RuntimeError: if it failed on a worker, or every status poll failed.
  """
  runner, poll = tpu.runner, tpu.args.poll_seconds
  runner.comment(f"job {job.name} -> {job.workdir} (detached)")
  runner.run(tpu.ssh(remote.start_command(job, tpu.extra)), check=False)
  if runner.dry_run:
    runner.comment(
      f"every {poll:g} s until every worker reports `exit`: worker states, "
      "then the new part of the worker-0 log"
    )
    runner.run(tpu.ssh(remote.status_command(job)))
    runner.run(tpu.ssh(remote.log_command(job, 0), worker="0"))
    return True
  offset, failures = 0, 0
  while True:
    states = job_states(tpu, job)
    if states is None:
      state = tpu.state()
      if state not in USABLE:
        runner.comment(f"{tpu.name} is {state or 'gone'}: job interrupted")
        return False
      failures += 1
      if failures >= MAX_POLL_FAILURES:
        raise RuntimeError(
          f"{failures} status polls of {tpu.name} failed; the job may still "
          "run: rerun the same command to reattach"
        )
      runner.sleep(poll)
      continue
    failures = 0
    offset = _stream_log(tpu, job, offset)
    failed = {h: s for h, s in states.items() if s.startswith("exit ")}
    failed = {h: s for h, s in failed.items() if s != "exit 0"}
    if failed or "absent" in states.values():
      runner.run(tpu.ssh(remote.stop_command(job)), check=False)
      if failed:
        raise RuntimeError(
          f"job {job.name} failed on {tpu.name}: {failed}; worker logs in "
          f"~/{remote.RUNS_DIR}/ on each worker and {job.workdir}/logs/"
        )
      runner.comment(f"job {job.name} lost its process: {states}")
      return False
    if all(s == "exit 0" for s in states.values()):
      return True
    runner.sleep(poll)


def verify_job(tpu: Tpu, job: jobs_lib.Job) -> list[str]:
  """The `--verify_files` of a job that are missing (in its gs:// workdir,
  or in its fetched copy under `--results_dir` for a workdir on the VM)."""
  missing = []
  for pattern in [p for p in tpu.args.verify_files.split(",") if p]:
    if job.workdir.startswith("gs://"):
      url = f"{job.workdir.rstrip('/')}/{pattern}"
      r = tpu.runner.run(
        ["gcloud", "storage", "ls", url], check=False, capture=True
      )
      found = tpu.runner.dry_run or (r.returncode == 0 and r.stdout.strip())
    else:
      local = os.path.join(
        tpu.args.results_dir, os.path.basename(job.workdir.rstrip("/"))
      )
      found = tpu.runner.dry_run or glob.glob(os.path.join(local, pattern))
      if tpu.runner.dry_run:
        tpu.runner.comment(f"check that {local}/{pattern} exists")
    if not found:
      missing.append(pattern)
  return missing


def fetch_command(tpu: Tpu, job: jobs_lib.Job) -> list[str]:
  """Copies one job's workdir into `<results_dir>/`."""
  if job.workdir.startswith("gs://"):
    return ["gcloud", "storage", "cp", "-r", job.workdir, tpu.args.results_dir]
  # Only process 0 (worker 0) writes summaries and results files.
  return tpu.gcloud(
    "tpu-vm",
    "scp",
    "--worker=0",
    "--recurse",
    positional=[f"{tpu.name}:{job.workdir}", tpu.args.results_dir],
  )


def collect(tpu: Tpu, fetch: bool) -> None:
  """Verifies each job's results (in the bucket before fetching; a workdir
  on the VM after fetching it) and fetches them.

  Raises:
    RuntimeError: if a result is missing; CalledProcessError if a fetch
      fails.
  """
  if fetch:
    tpu.runner.run(["mkdir", "-p", tpu.args.results_dir])
  for job in tpu.jobs:
    on_bucket = job.workdir.startswith("gs://")
    missing = verify_job(tpu, job) if on_bucket else []
    if fetch and not missing:
      tpu.runner.run(fetch_command(tpu, job))
    if not on_bucket:
      missing = verify_job(tpu, job)
    if missing:
      raise RuntimeError(
        f"job {job.name}: {missing} not found under {job.workdir}; the "
        "results are not verified"
      )
