r"""Runs affjax on a SLURM GPU cluster, one or several nodes per job.

Writes one sbatch script and submits it. Each job (each run of the config's
sweep, e.g. 6 folds x 2 emotions) is one task of a job array, so all runs are
submitted at once and SLURM schedules them independently. Inside a job, `srun`
starts one process per GPU (`--process_per=gpu`, the default) or per node
(`--process_per=node`); every process gets the coordinator address (first
node of the allocation, a port derived from the job id), the process count and
its id (`$SLURM_PROCID`) as `AFFJAX_*` variables and runs `affjax.main
--distributed`.

  python -m launch.slurm --nodes=2 --gpus_per_node=4 --partition=gpu \
      --config=configs/lfan.py --sweep --workdir=/shared/runs/lfan \
      --dry-run -- --config.data.raw_dir=/shared/affwild2

The venv (`--venv`) and the checkout (`--repo_dir`) must be on a filesystem
every node sees; `--install` creates the venv first (on the submitting node).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from collections.abc import Sequence
from typing import TextIO

if __package__ in (None, ""):  # run as a file: make `launch` importable
  sys.path.insert(
    0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  )

from launch import gpu_host
from launch import jobs as jobs_lib

# Coordinator ports: PORT_BASE + job id % PORT_SPAN, so concurrent jobs that
# share a first node do not collide.
PORT_BASE, PORT_SPAN = 20000, 20000


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  jobs_lib.add_common_options(
    parser, workdir_help="base workdir on a filesystem all nodes share"
  )

  def opt(name, **kwargs):
    jobs_lib.add_option(parser, name, **kwargs)

  opt("nodes", type=int, default=1, help="nodes per job")
  opt("gpus_per_node", type=int, default=8, help="GPUs used on each node")
  opt(
    "process_per",
    choices=("gpu", "node"),
    default="gpu",
    help="one JAX process per GPU or per node",
  )
  opt(
    "cpus_per_task",
    type=int,
    default=0,
    help="CPU cores per process; 0 (default) = whole nodes (--exclusive) "
    "with the node's cores split evenly between its processes",
  )
  opt("partition", default="", help="SLURM partition")
  opt("account", default="", help="SLURM account")
  opt("time", default="24:00:00", help="time limit per job")
  opt("job_name", default="affjax", help="SLURM job name")
  opt("repo_dir", default=jobs_lib.REPO, help="checkout on the cluster")
  opt(
    "venv",
    default=os.path.join(jobs_lib.REPO, ".venv"),
    help="virtualenv on the cluster",
  )
  opt(
    "script",
    default="",
    help="where to write the sbatch script (default "
    "<log_dir>/<job_name>.sbatch)",
  )
  opt("log_dir", default="workdirs/slurm", help="sbatch script and logs")
  opt(
    "install",
    action="store_true",
    help="create the venv with jax[cuda13] before submitting",
  )
  opt("python", default="python3", help="interpreter that creates the venv")
  opt("extras", default="preprocess", help="pip extras of affjax")
  opt(
    "jax_version",
    default=jobs_lib.pinned_jax_version(),
    help="jax[cuda13] version (default: .ci/constraints.txt)",
  )
  return parser


def _check(args: argparse.Namespace) -> None:
  if args.nodes < 1 or args.gpus_per_node < 1:
    raise ValueError(
      f"--nodes={args.nodes}, --gpus_per_node="
      f"{args.gpus_per_node}: both must be at least 1"
    )


def sbatch_script(
  args: argparse.Namespace, jobs: list[jobs_lib.Job], extra: Sequence[str]
) -> str:
  """The sbatch script: an array with one task per job."""
  tasks_per_node = args.gpus_per_node if args.process_per == "gpu" else 1
  log_dir = os.path.abspath(args.log_dir)
  header = [
    "#!/bin/bash",
    f"#SBATCH --job-name={args.job_name}",
    f"#SBATCH --nodes={args.nodes}",
    f"#SBATCH --ntasks-per-node={tasks_per_node}",
    f"#SBATCH --gpus-per-node={args.gpus_per_node}",
    f"#SBATCH --time={args.time}",
    f"#SBATCH --output={log_dir}/%x-%A_%a.out",
    f"#SBATCH --array=0-{len(jobs) - 1}",
  ]
  for name in ("partition", "account"):
    if getattr(args, name):
      header.append(f"#SBATCH --{name.replace('_', '-')}={getattr(args, name)}")
  if args.cpus_per_task:
    header.append(f"#SBATCH --cpus-per-task={args.cpus_per_task}")
    cpus = [f"cpus={args.cpus_per_task}"]
  else:
    # Without a request SLURM gives each task its default (often 1 core),
    # which starves tf.data: take whole nodes and split their cores.
    header += ["#SBATCH --exclusive", "#SBATCH --mem=0"]
    cpus = [
      f"cpus=$(( ${{SLURM_CPUS_ON_NODE:-1}} / {tasks_per_node} ))",
      '[ "$cpus" -ge 1 ] || cpus=1',
    ]
  cases = []
  for i, job in enumerate(jobs):
    main_args = shlex.join(job.main_args(distributed=True, extra=extra))
    cases.append(f"  {i}) ARGS=( {main_args} ) ;;")
  if args.process_per == "gpu":
    # Every task sees all GPUs of its node and takes the one of its rank.
    task_env = "AFFJAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID "
  else:
    task_env = (
      "AFFJAX_LOCAL_DEVICE_IDS="
      f"{','.join(str(g) for g in range(args.gpus_per_node))} "
    )
  python = os.path.join(args.venv, "bin", "python")
  body = [
    (
      f"# Written by launch/slurm.py: {len(jobs)} job(s), "
      f"{args.nodes * tasks_per_node} JAX process(es) each."
    ),
    "set -euo pipefail",
    f"cd {shlex.quote(args.repo_dir)}",
    'case "${SLURM_ARRAY_TASK_ID:-0}" in',
    *cases,
    '  *) echo "no job for array task $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;',
    "esac",
    # sed reads all lines: `head` could SIGPIPE scontrol under pipefail.
    'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
    (
      'export AFFJAX_COORDINATOR="$head_node:'
      f'$(( {PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN} ))"'
    ),
    f"export AFFJAX_NUM_PROCESSES={args.nodes * tasks_per_node}",
    "export TF_CPP_MIN_LOG_LEVEL=2",
    *cpus,
    # srun does not inherit sbatch's --cpus-per-task (Slurm >= 22.05).
    'srun --kill-on-bad-exit=1 --cpus-per-task="$cpus" bash -c '
    + shlex.quote(
      f'export AFFJAX_PROCESS_ID=$SLURM_PROCID {task_env}&& exec "$@"'
    )
    + f' affjax-task {shlex.quote(python)} -m affjax.main "${{ARGS[@]}}"',
  ]
  return "\n".join(header + body) + "\n"


def main(
  args: argparse.Namespace, extra: list[str], runner: jobs_lib.Runner
) -> None:
  _check(args)
  if not args.workdir.startswith("gs://"):
    args.workdir = os.path.abspath(args.workdir)
  jobs = jobs_lib.jobs_from_args(args)
  script_path = os.path.abspath(
    args.script or os.path.join(args.log_dir, f"{args.job_name}.sbatch")
  )
  text = sbatch_script(args, jobs, extra)
  if args.install:
    for cmd in gpu_host.install_commands(args):
      runner.run(cmd)
  runner.comment(
    f"{script_path} ({len(jobs)} job(s): {', '.join(j.name for j in jobs)}):"
  )
  if runner.dry_run:
    for line in text.splitlines():
      runner.comment(f"| {line}")
  else:
    os.makedirs(os.path.dirname(script_path), exist_ok=True)
    os.makedirs(os.path.abspath(args.log_dir), exist_ok=True)
    with tempfile.NamedTemporaryFile(
      "w", dir=os.path.dirname(script_path), delete=False, suffix=".tmp"
    ) as f:
      f.write(text)
    os.replace(f.name, script_path)
  runner.run(["sbatch", script_path])


def cli(argv: Sequence[str] | None = None, out: TextIO | None = None) -> None:
  jobs_lib.run_main(main, build_parser(), argv, out)


if __name__ == "__main__":
  cli()
