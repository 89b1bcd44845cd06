r"""Runs affjax on one multi-GPU host (run this on the host itself).

One process per job sees its GPUs as one local mesh (no `jax.distributed`
needed on a single host). By default each job uses every GPU and the jobs run
one after the other; with `--gpus_per_job=N` the GPUs are split into groups
of N (`CUDA_VISIBLE_DEVICES`) and that many jobs run at once, each logging to
`<log_dir>/<job>.log` and pinned (`taskset`) to its share of the CPU cores,
so their input pipelines do not oversubscribe the host.

  python -m launch.gpu_host --install --config=configs/lfan.py --sweep \
      --workdir=workdirs/lfan --gpus_per_job=1 --dry-run \
      -- --config.data.raw_dir=/data/affwild2

`--install` first creates the venv (`--venv`) with `pip install -e
.[extras]` and `jax[cuda13]` of the version CI pins.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import queue
import shutil
import subprocess
import sys
from collections.abc import Sequence
from typing import TextIO

if __package__ in (None, ""):  # run as a file: make `launch` importable
  sys.path.insert(
    0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  )

from launch import jobs as jobs_lib


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  jobs_lib.add_common_options(parser, workdir_help="base workdir")

  def opt(name, **kwargs):
    jobs_lib.add_option(parser, name, **kwargs)

  opt("install", action="store_true", help="create the venv and install")
  opt(
    "venv",
    default=os.path.join(jobs_lib.REPO, ".venv"),
    help="virtualenv to install into / run from",
  )
  opt("python", default="python3", help="interpreter that creates the venv")
  opt("extras", default="preprocess", help="pip extras of affjax")
  opt(
    "jax_version",
    default=jobs_lib.pinned_jax_version(),
    help="jax[cuda13] version (default: .ci/constraints.txt)",
  )
  opt(
    "num_gpus",
    type=int,
    default=0,
    help="GPUs on this host (default: counted with nvidia-smi)",
  )
  opt(
    "gpus_per_job",
    type=int,
    default=0,
    help="GPUs per job; 0 = all (jobs run one after the other)",
  )
  opt(
    "num_cpus",
    type=int,
    default=0,
    help="CPU cores to split between parallel jobs (default: the cores "
    "this process may use)",
  )
  opt(
    "log_dir",
    default="workdirs/launch_logs",
    help="per-job logs when jobs run in parallel",
  )
  return parser


def install_commands(args: argparse.Namespace) -> list[list[str]]:
  pip = os.path.join(args.venv, "bin", "pip")
  return [
    [args.python, "-m", "venv", args.venv],
    [pip, "install", "-q", "--upgrade", "pip"],
    [
      pip,
      "install",
      "-q",
      "-c",
      os.path.join(jobs_lib.REPO, ".ci", "constraints.txt"),
      "-e",
      f"{jobs_lib.REPO}[{args.extras}]",
      f"jax[cuda13]=={args.jax_version}",
    ],
  ]


def count_gpus() -> int:
  """GPUs listed by `nvidia-smi -L` (0 if it is missing or fails)."""
  if shutil.which("nvidia-smi") is None:
    return 0
  try:
    out = subprocess.run(
      ["nvidia-smi", "-L"],
      capture_output=True,
      text=True,
      timeout=30,
      check=True,
    ).stdout
  except (subprocess.SubprocessError, OSError):
    return 0
  return sum(line.startswith("GPU ") for line in out.splitlines())


def gpu_groups(num_gpus: int, gpus_per_job: int) -> list[str]:
  """`CUDA_VISIBLE_DEVICES` values of the parallel slots.

  Raises:
    ValueError: if the GPUs do not split into groups of `gpus_per_job`.
  """
  if num_gpus < 1:
    raise ValueError(
      "--gpus_per_job needs the GPU count: nvidia-smi found "
      "none; pass --num_gpus"
    )
  if gpus_per_job < 1 or num_gpus % gpus_per_job:
    raise ValueError(
      f"--gpus_per_job={gpus_per_job}: expected a divisor of "
      f"the {num_gpus} GPUs"
    )
  return [
    ",".join(str(g) for g in range(s, s + gpus_per_job))
    for s in range(0, num_gpus, gpus_per_job)
  ]


def cpu_groups(num_cpus: int, slots: int) -> list[str]:
  """`taskset -c` core lists: the cores split evenly between the slots.

  Jobs that run side by side each size their tf.data pools by the cores
  they see; without a split every job sees them all and they oversubscribe
  the host.
  """
  cores = sorted(os.sched_getaffinity(0)) if num_cpus < 1 else range(num_cpus)
  cores = list(cores)
  per_slot = max(1, len(cores) // slots)
  groups = []
  for i in range(slots):
    part = cores[i * per_slot : (i + 1) * per_slot] or cores[-per_slot:]
    groups.append(",".join(str(c) for c in part))
  return groups


def job_command(
  args: argparse.Namespace,
  job: jobs_lib.Job,
  extra: Sequence[str],
  devices: str | None,
  cpus: str | None = None,
) -> list[str]:
  env = ["env", "TF_CPP_MIN_LOG_LEVEL=2"]
  if devices is not None:
    env.append(f"CUDA_VISIBLE_DEVICES={devices}")
  pin = ["taskset", "-c", cpus] if cpus else []
  python = os.path.join(args.venv, "bin", "python")
  return env + pin + [python, "-m", "affjax.main"] + job.main_args(extra=extra)


Slot = tuple[str, str | None]  # (CUDA_VISIBLE_DEVICES, taskset cores)


def _run_parallel(
  args, jobs, extra, runner: jobs_lib.Runner, groups: list[Slot]
) -> None:
  """Runs `jobs` with at most one job per slot (GPU group) at a time."""
  slots = queue.Queue()
  for group in groups:
    slots.put(group)
  os.makedirs(args.log_dir, exist_ok=True)

  def work(job):
    gpus, cpus = slots.get()
    try:
      log_path = os.path.join(args.log_dir, f"{job.name}.log")
      runner.comment(f"job {job.name} on GPUs {gpus}, log {log_path}")
      with open(log_path, "w") as log:
        runner.run(
          job_command(args, job, extra, gpus, cpus),
          cwd=jobs_lib.REPO,
          stdout=log,
          stderr=subprocess.STDOUT,
        )
    finally:
      slots.put((gpus, cpus))

  with concurrent.futures.ThreadPoolExecutor(len(groups)) as pool:
    futures = {pool.submit(work, job): job for job in jobs}
    failed = [futures[f].name for f in futures if f.exception()]
  if failed:
    raise RuntimeError(f"jobs {failed} failed; see {args.log_dir}/<job>.log")


def slots_of(args: argparse.Namespace, dry_run: bool) -> list[Slot]:
  """The parallel slots: GPU groups, each with its share of the cores
  (none when one slot has the host, or `taskset` is missing)."""
  gpus = gpu_groups(args.num_gpus or count_gpus(), args.gpus_per_job)
  if len(gpus) == 1 or not (dry_run or shutil.which("taskset")):
    return [(g, None) for g in gpus]
  return list(zip(gpus, cpu_groups(args.num_cpus, len(gpus))))


def main(
  args: argparse.Namespace, extra: list[str], runner: jobs_lib.Runner
) -> None:
  jobs_lib.anchor_paths(args)
  jobs = jobs_lib.jobs_from_args(args)
  runner.comment(f"in {jobs_lib.REPO}")
  if args.install:
    for cmd in install_commands(args):
      runner.run(cmd)
  if not args.gpus_per_job:
    for job in jobs:
      runner.comment(f"job {job.name} on all GPUs")
      runner.run(job_command(args, job, extra, None), cwd=jobs_lib.REPO)
    return
  groups = slots_of(args, runner.dry_run)
  if not runner.dry_run:
    _run_parallel(args, jobs, extra, runner, groups)
    return
  for i, job in enumerate(jobs):
    gpus, cpus = groups[i % len(groups)]
    runner.comment(
      f"job {job.name} on GPUs {gpus} (up to {len(groups)} "
      f"at once), log {args.log_dir}/{job.name}.log"
    )
    runner.run(job_command(args, job, extra, gpus, cpus))


def cli(argv: Sequence[str] | None = None, out: TextIO | None = None) -> None:
  jobs_lib.run_main(main, build_parser(), argv, out)


if __name__ == "__main__":
  cli()
