r"""Runs affjax on a Cloud TPU VM: one host (v4-8) or a pod slice (v4-32, ...).

Steps (`--steps`, all by default): create the TPU VM; pack this checkout and
copy it to every worker; install (Python venv, `pip install -e .[extras]` and
`jax[tpu]` of the version CI pins); run the same command on every worker
(`--worker=all`, with `--distributed` so each worker joins the one global
mesh); copy the results back (from gs:// or from worker 0, the only writer);
delete the TPU VM (also after a failed run, unless `--keep`).

  python -m launch.tpu_vm --name=affjax-v4 --zone=us-central2-b \
      --accelerator_type=v4-32 --bucket=gs://my-bucket \
      --config=configs/lfan.py --sweep --workdir=gs://my-bucket/lfan \
      --dry-run -- --config.data.raw_dir=gs://my-bucket/affwild2

Arguments after `--` go to every `affjax.main` run. With `--sweep` the config
file's runs (6 folds x 2 emotions for `configs/lfan.py`) run one after the
other on the TPU VM, or, with `--parallel`, each on its own TPU VM
`<name>-<index>` at the same time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shlex
import sys
from collections.abc import Sequence
from typing import TextIO

if __package__ in (None, ""):  # run as a file: make `launch` importable
  sys.path.insert(
    0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  )

from launch import jobs as jobs_lib

STEPS = ("create", "copy", "install", "run", "fetch", "delete")
REMOTE_DIR = "affjax"  # code on each worker, relative to ~
REMOTE_VENV = "affjax-venv"
ARCHIVE = "affjax-src.tar.gz"
TAR_EXCLUDES = (
  ".git",
  ".venv",
  "workdirs",
  "__pycache__",
  "*.egg-info",
  "build",
  ".pytest_cache",
)


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

  opt("name", required=True, help="TPU VM name")
  opt("zone", required=True, help="e.g. us-central2-b")
  opt("accelerator_type", required=True, help="e.g. v4-8, v4-32, v5p-16")
  opt(
    "runtime_version",
    default="tpu-ubuntu2204-base",
    help="TPU VM software version (--version of gcloud)",
  )
  opt("project", default="", help="GCP project (default: gcloud's)")
  opt(
    "bucket",
    default="",
    help="gs:// bucket for workdirs and data; with "
    "a relative --workdir the workdir becomes <bucket>/<workdir>",
  )
  opt("spot", action="store_true", help="create a Spot TPU VM")
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


def _gcloud(
  args: argparse.Namespace, verb: str, name: str, *rest: str
) -> list[str]:
  cmd = [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    verb,
    name,
    f"--zone={args.zone}",
  ]
  if args.project:
    cmd.append(f"--project={args.project}")
  return cmd + list(rest)


def _ssh_all(args: argparse.Namespace, name: str, command: str) -> list[str]:
  return _gcloud(args, "ssh", name, "--worker=all", f"--command={command}")


def install_command(args: argparse.Namespace) -> str:
  """Shell command run on every worker: unpack, venv, pip install."""
  py, venv, code = (
    args.python,
    f'"$HOME/{REMOTE_VENV}"',
    (f'"$HOME/{REMOTE_DIR}"'),
  )
  steps = [
    "set -e",
    f"rm -rf {code} && mkdir -p {code}",
    f'tar -xzf "$HOME/{ARCHIVE}" -C {code}',
    (
      f"command -v {py} >/dev/null || (sudo add-apt-repository -y "
      f"ppa:deadsnakes/ppa && sudo apt-get update -q && sudo apt-get "
      f"install -y -q {py} {py}-venv)"
    ),
    f"{py} -m venv {venv}",
    f"{venv}/bin/pip install -q --upgrade pip",
    (
      f'{venv}/bin/pip install -q -c "$HOME/{REMOTE_DIR}/.ci/'
      f'constraints.txt" -e "$HOME/{REMOTE_DIR}[{args.extras}]" '
      f"'jax[tpu]=={args.jax_version}'"
    ),
  ]
  return "; ".join(steps)


def run_command(job: jobs_lib.Job, extra: Sequence[str]) -> str:
  """Shell command run on every worker for one job (from the code dir, so
  that `configs/...` paths and `import configs` work)."""
  main = shlex.join(
    ["-m", "affjax.main"] + job.main_args(distributed=True, extra=extra)
  )
  return (
    f'cd "$HOME/{REMOTE_DIR}" && TF_CPP_MIN_LOG_LEVEL=2 '
    f'"$HOME/{REMOTE_VENV}/bin/python" {main}'
  )


def fetch_command(
  args: argparse.Namespace, name: str, job: jobs_lib.Job
) -> list[str]:
  """Copies one job's workdir into `<results_dir>/`."""
  if job.workdir.startswith("gs://"):
    return ["gcloud", "storage", "cp", "-r", job.workdir, args.results_dir]
  # Only process 0 (worker 0) writes summaries and results files.
  return _gcloud(
    args,
    "scp",
    f"{name}:{job.workdir}",
    args.results_dir,
    "--worker=0",
    "--recurse",
  )


def _resolve_workdir(args: argparse.Namespace) -> None:
  """gs:// or absolute workdirs as given; relative ones under --bucket."""
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


def _one_tpu(
  args,
  name: str,
  jobs: list[jobs_lib.Job],
  extra: list[str],
  runner: jobs_lib.Runner,
  steps: set[str],
) -> None:
  """All steps on TPU VM `name` for `jobs` (run one after the other)."""
  archive = os.path.join("/tmp", f"{name}-{ARCHIVE}")
  runner.comment(f"TPU VM {name}: jobs {', '.join(j.name for j in jobs)}")
  try:
    if "create" in steps:
      runner.run(
        _gcloud(
          args,
          "create",
          name,
          f"--accelerator-type={args.accelerator_type}",
          f"--version={args.runtime_version}",
        )
        + (["--spot"] if args.spot else [])
      )
    if "copy" in steps:
      runner.run(
        ["tar", "-czf", archive, "-C", jobs_lib.REPO]
        + [f"--exclude={e}" for e in TAR_EXCLUDES]
        + ["."]
      )
      runner.run(
        _gcloud(args, "scp", archive, f"{name}:{ARCHIVE}", "--worker=all")
      )
    if "install" in steps:
      runner.run(_ssh_all(args, name, install_command(args)))
      if args.setup_command:
        runner.run(_ssh_all(args, name, args.setup_command))
    if "run" in steps:
      for job in jobs:
        runner.comment(f"job {job.name} -> {job.workdir}")
        runner.run(_ssh_all(args, name, run_command(job, extra)))
    if "fetch" in steps:
      runner.run(["mkdir", "-p", args.results_dir])
      for job in jobs:
        runner.run(fetch_command(args, name, job))
  finally:
    if "delete" in steps and not args.keep:
      runner.run(_gcloud(args, "delete", name, "--quiet"))


def main(
  args: argparse.Namespace, extra: list[str], runner: jobs_lib.Runner
) -> None:
  steps = {s for s in args.steps.split(",") if s}
  if steps - set(STEPS):
    raise ValueError(
      f"--steps={args.steps!r}: unknown "
      f"{sorted(steps - set(STEPS))}; choose from {STEPS}"
    )
  _resolve_workdir(args)
  jobs = jobs_lib.jobs_from_args(args)
  if not args.parallel or len(jobs) == 1:
    _one_tpu(args, args.name, jobs, extra, runner, steps)
    return
  plans = [(f"{args.name}-{i}", [job]) for i, job in enumerate(jobs)]
  if runner.dry_run:
    for name, group in plans:
      _one_tpu(args, name, group, extra, runner, steps)
    return
  with concurrent.futures.ThreadPoolExecutor(len(plans)) as pool:
    futures = [
      pool.submit(_one_tpu, args, name, group, extra, runner, steps)
      for name, group in plans
    ]
    errors = [f.exception() for f in futures if f.exception()]
  if errors:
    raise RuntimeError(
      f"{len(errors)} of {len(plans)} TPU VMs failed: {errors}"
    )


def cli(argv: Sequence[str] | None = None, out: TextIO | None = None) -> None:
  jobs_lib.run_main(main, build_parser(), argv, out)


if __name__ == "__main__":
  cli()
