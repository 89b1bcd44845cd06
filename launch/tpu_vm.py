r"""Runs affjax on a Cloud TPU VM: one host (v4-8) or a pod slice (v4-32, ...).

Steps (`--steps`, all by default):
  create   create the TPU VM (or a queued resource with `--queued`), with the
           software version of its accelerator family; an existing READY VM
           is reused, a preempted one is deleted and created again;
  copy     pack this checkout and copy it to every worker;
  install  Python venv, `pip install -e .[extras]` and `jax[tpu]` of the
           version CI pins, then `--setup_command`;
  run      start each job detached on every worker (`--distributed`, one log
           per worker), poll until every worker has exited and stream the
           worker-0 log; a preempted VM is recreated and the job resumes from
           the latest checkpoint in its workdir (`--max_restarts` times);
  verify   check that each job's results exist (`--verify_files` under the
           gs:// workdir, `gcloud storage ls`);
  fetch    copy the results into `--results_dir`;
  delete   delete the TPU VM, only once the results were verified (never
           after a failed run, check or fetch: the VM is kept and the command
           to delete it printed).

Running the same command again is safe at any point: it reuses the VM,
reattaches to a running job, skips finished ones and resumes interrupted
ones from the bucket.

  python -m launch.tpu_vm --name=affjax-v4 --zone=us-central2-b \
      --accelerator_type=v4-32 --bucket=gs://my-bucket \
      --config=configs/lfan.py --sweep --workdir=gs://my-bucket/lfan \
      --dry-run -- --config.data.raw_dir=/tmp/affwild2

Arguments after `--` go to every `affjax.main` run. With `--sweep` the config
file's runs (6 folds x 2 emotions for `configs/lfan.py`) run one after the
other on the TPU VM, or, with `--parallel`, each on its own TPU VM
`<name>-<index>` at the same time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import glob
import os
import sys
from collections.abc import Sequence
from typing import TextIO

if __package__ in (None, ""):  # run as a file: make `launch` importable
  sys.path.insert(
    0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  )

from launch import jobs as jobs_lib
from launch import tpu_remote as remote

STEPS = ("create", "copy", "install", "run", "verify", "fetch", "delete")
TAR_EXCLUDES = (
  ".git",
  ".venv",
  "workdirs",
  "__pycache__",
  "*.egg-info",
  "build",
  ".pytest_cache",
)
# TPU software (runtime) versions for JAX by accelerator family, from
# "TPU software versions", https://cloud.google.com/tpu/docs/runtimes
# (section "PyTorch and JAX", page last updated 2025-08-11): Trillium (v6e)
# v2-alpha-tpuv6e, v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite, v4 and
# older tpu-ubuntu2204-base. Newer families need --runtime_version.
RUNTIME_VERSIONS = {
  "v2": "tpu-ubuntu2204-base",
  "v3": "tpu-ubuntu2204-base",
  "v4": "tpu-ubuntu2204-base",
  "v5litepod": "v2-alpha-tpuv5-lite",
  "v5e": "v2-alpha-tpuv5-lite",
  "v5p": "v2-alpha-tpuv5",
  "v6e": "v2-alpha-tpuv6e",
}
# States of `tpu-vm describe` / `queued-resources describe` (state.state).
USABLE = {"READY", "ACTIVE"}
GONE = {"PREEMPTED", "TERMINATED", "STOPPED", "SUSPENDED", "FAILED"}
# Status polls that may fail in a row (ssh flakes) while the VM is READY.
MAX_POLL_FAILURES = 10
DEFAULT_VERIFY = "checkpoints,eval/*/results.json"


def runtime_version(accelerator_type: str) -> str:
  """The TPU software version for an accelerator type (`v5p-32`, ...).

  Raises:
    ValueError: for a family without a known version.
  """
  family = accelerator_type.lower().rsplit("-", 1)[0]
  if family not in RUNTIME_VERSIONS:
    raise ValueError(
      f"--accelerator_type={accelerator_type!r}: no known TPU software "
      f"version for {family!r} (known: {sorted(RUNTIME_VERSIONS)}); pass "
      "--runtime_version (see https://cloud.google.com/tpu/docs/runtimes)"
    )
  return RUNTIME_VERSIONS[family]


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  jobs_lib.add_common_options(
    parser,
    workdir_help="gs://bucket/path (needed on pod slices: "
    "checkpoints are written by all hosts), an absolute path on the "
    "workers, or a path relative to --bucket",
  )

  def opt(name, **kwargs):
    jobs_lib.add_option(parser, name, **kwargs)

  opt("name", required=True, help="TPU VM (and queued resource) name")
  opt("zone", required=True, help="e.g. us-central2-b")
  opt("accelerator_type", required=True, help="e.g. v4-32, v5p-16, v6e-8")
  opt(
    "runtime_version",
    default="",
    help="TPU software version (default: the one the Cloud TPU docs name "
    f"for the accelerator family: {RUNTIME_VERSIONS})",
  )
  opt("project", default="", help="GCP project (default: gcloud's)")
  opt(
    "bucket",
    default="",
    help="gs:// bucket for workdirs and data; with "
    "a relative --workdir the workdir becomes <bucket>/<workdir>",
  )
  opt("spot", action="store_true", help="Spot TPU (preemptible, cheaper)")
  opt(
    "queued",
    action="store_true",
    help="request the TPU as a queued resource and wait until it is ACTIVE",
  )
  opt(
    "max_restarts",
    type=int,
    default=3,
    help="recreate a preempted TPU and resume this many times",
  )
  opt("poll_seconds", type=float, default=60, help="status poll interval")
  opt(
    "verify_files",
    default=DEFAULT_VERIFY,
    help="comma-separated files/globs under each job's workdir that must "
    "exist before the TPU is deleted",
  )
  opt(
    "python",
    default="python3.11",
    help="interpreter on the workers (installed from deadsnakes if absent)",
  )
  opt("extras", default="preprocess", help="pip extras of affjax")
  opt(
    "jax_version",
    default=jobs_lib.pinned_jax_version(),
    help="jax[tpu] version (default: .ci/constraints.txt)",
  )
  opt(
    "setup_command",
    default="",
    help="shell command run on every worker after installing, e.g. to "
    "copy the feature cache from gs:// to local disk",
  )
  opt(
    "results_dir",
    default="workdirs/tpu_results",
    help="local directory the results are copied into",
  )
  opt(
    "steps",
    default=",".join(STEPS),
    help=f"comma-separated subset of {','.join(STEPS)}",
  )
  opt("keep", action="store_true", help="do not delete the TPU VM")
  opt(
    "parallel",
    action="store_true",
    help="one TPU VM per job (<name>-<i>), all at once",
  )
  return parser


@dataclasses.dataclass
class Tpu:
  """One TPU VM (or queued resource) and the jobs it runs."""

  args: argparse.Namespace
  name: str
  jobs: list[jobs_lib.Job]
  extra: list[str]
  runner: jobs_lib.Runner

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
  tpu.runner.write(r.stdout)
  return offset + len(r.stdout.encode())


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


def _run_all(tpu: Tpu, steps: set[str]) -> bool:
  """create/copy/install/run once; False if a job was interrupted."""
  reused = "create" in steps and ensure_tpu(tpu)
  # On a reused TPU, a job that runs or ran means the code is installed:
  # reattach instead of unpacking new code under a running job.
  started = reused and any(
    states and set(states.values()) != {"absent"}
    for states in (job_states(tpu, job) for job in tpu.jobs)
  )
  if started:
    tpu.runner.comment(f"{tpu.name}: jobs found, reattaching")
  if "copy" in steps and not started:
    copy_code(tpu)
  if "install" in steps and not started:
    install(tpu)
  if "run" in steps:
    return all(run_job(tpu, job) for job in tpu.jobs)
  return True


def one_tpu(tpu: Tpu, steps: set[str]) -> None:
  """All steps on one TPU; keeps it (and says so) unless all succeeded."""
  args, runner = tpu.args, tpu.runner
  runner.comment(f"TPU {tpu.name}: jobs {', '.join(j.name for j in tpu.jobs)}")
  try:
    restarts = 0
    while not _run_all(tpu, steps):
      restarts += 1
      if restarts > args.max_restarts or "create" not in steps:
        raise RuntimeError(
          f"{tpu.name}: interrupted {restarts} time(s) (--max_restarts="
          f"{args.max_restarts}); rerun the same command to resume"
        )
      runner.comment(
        f"restart {restarts}/{args.max_restarts}: resuming from the "
        "latest checkpoint in the workdir"
      )
    delete = "delete" in steps and not args.keep
    if delete or steps & {"verify", "fetch"}:
      collect(tpu, fetch="fetch" in steps)
    if delete:
      runner.run(tpu.delete_command())
  except BaseException:
    runner.comment(
      f"TPU {tpu.name} kept (it is billed until deleted); after "
      f"inspecting it: {' '.join(tpu.delete_command())}"
    )
    raise


def _resolve(args: argparse.Namespace) -> None:
  """Runtime version from the accelerator; gs:// or absolute workdirs as
  given, relative ones under --bucket."""
  if not args.runtime_version:
    args.runtime_version = runtime_version(args.accelerator_type)
  if args.bucket and not args.bucket.startswith("gs://"):
    raise ValueError(f"--bucket={args.bucket!r}: expected gs://<bucket>")
  if args.workdir.startswith(("gs://", "/")):
    return
  if not args.bucket:
    raise ValueError(
      f"--workdir={args.workdir!r}: expected gs://... or an "
      "absolute path on the workers, or give --bucket"
    )
  args.workdir = f"{args.bucket.rstrip('/')}/{args.workdir}"


def main(
  args: argparse.Namespace, extra: list[str], runner: jobs_lib.Runner
) -> None:
  steps = {s for s in args.steps.split(",") if s}
  if steps - set(STEPS):
    raise ValueError(
      f"--steps={args.steps!r}: unknown "
      f"{sorted(steps - set(STEPS))}; choose from {STEPS}"
    )
  _resolve(args)
  jobs = jobs_lib.jobs_from_args(args)
  if not args.parallel or len(jobs) == 1:
    one_tpu(Tpu(args, args.name, jobs, extra, runner), steps)
    return
  tpus = [
    Tpu(args, f"{args.name}-{i}", [job], extra, runner)
    for i, job in enumerate(jobs)
  ]
  if runner.dry_run:
    for tpu in tpus:
      one_tpu(tpu, steps)
    return
  with concurrent.futures.ThreadPoolExecutor(len(tpus)) as pool:
    futures = [pool.submit(one_tpu, tpu, steps) for tpu in tpus]
    errors = [f.exception() for f in futures if f.exception()]
  if errors:
    raise RuntimeError(f"{len(errors)} of {len(tpus)} TPUs failed: {errors}")


def cli(argv: Sequence[str] | None = None, out: TextIO | None = None) -> None:
  jobs_lib.run_main(main, build_parser(), argv, out)


if __name__ == "__main__":
  cli()
