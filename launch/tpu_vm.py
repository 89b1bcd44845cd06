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
import os
import sys
from collections.abc import Sequence
from typing import TextIO

if __package__ in (None, ""):  # run as a file: make `launch` importable
  sys.path.insert(
    0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  )

from launch import jobs as jobs_lib
from launch import tpu_steps
from launch.tpu_steps import Tpu

STEPS = ("create", "copy", "install", "run", "verify", "fetch", "delete")
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


def _run_all(tpu: Tpu, steps: set[str]) -> bool:
  """create/copy/install/run once; False if a job was interrupted."""
  reused = "create" in steps and tpu_steps.ensure_tpu(tpu)
  # On a reused TPU a running job means the code is installed: reattach
  # instead of unpacking new code under it. Otherwise copy and install (a
  # rerun after a failure gets the fixed code).
  running = reused and any(
    states and "running" in states.values()
    for states in (tpu_steps.job_states(tpu, job) for job in tpu.jobs)
  )
  if running:
    tpu.runner.comment(f"{tpu.name}: a job is running, reattaching")
  if "copy" in steps and not running:
    tpu_steps.copy_code(tpu)
  if "install" in steps and not running:
    tpu_steps.install(tpu)
  if "run" in steps:
    for job in tpu.jobs:
      if job.name in tpu.finished:
        continue
      if not tpu_steps.run_job(tpu, job):
        return False
      tpu.finished.add(job.name)
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
      tpu_steps.collect(tpu, fetch="fetch" in steps)
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
