"""Shell commands the TPU launcher runs on the workers (via `gcloud ssh`).

A job runs detached from the ssh session that starts it, so a dropped
connection, a closed laptop or a killed launcher does not stop it:
`setsid nohup bash -c <wrapper>` puts it in its own session, and the
wrapper appends everything to one log per worker. Each job has a run
directory on every worker, `~/affjax-runs/<job>/`, holding

  worker.log   the job's stdout and stderr on this worker
  pid          the wrapper's pid (its process group: setsid makes it leader)
  command      the job's command line
  exit_code    written (atomically) when the job has finished

and, with a `gs://` workdir, the log is also copied to
`<workdir>/logs/<hostname>.log` every few minutes and at the end, so it
outlives a preempted VM. The start command is idempotent: a job that is
running is left alone (the launcher reattaches), one that finished with
status 0 with the same command line is not started again, anything else
starts (affjax resumes from the latest checkpoint in the workdir).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence

from launch import jobs as jobs_lib

REMOTE_DIR = "affjax"  # code on each worker, relative to ~
REMOTE_VENV = "affjax-venv"
ARCHIVE = "affjax-src.tar.gz"
RUNS_DIR = "affjax-runs"
STATUS_TAG = "affjax-status"
LOG_SYNC_SECONDS = 300


def run_dir(job: jobs_lib.Job) -> str:
  """The job's run directory on a worker, as a shell word ($HOME expands)."""
  safe = re.sub(r"[^A-Za-z0-9._-]+", "_", job.name).strip("._") or "run"
  return f'"$HOME/{RUNS_DIR}/{safe}"'


def _alive(d: str) -> str:
  """Shell test: the job's wrapper is running (a stale pid after a reboot
  may name an unrelated process, so its command line must be the wrapper's,
  whose $0 is `affjax-job`)."""
  return (
    f'[ -f {d}/pid ] && ps -p "$(cat {d}/pid)" -o args= 2>/dev/null '
    "| grep -q affjax-job"
  )


def install_command(python: str, extras: str, jax_version: str) -> str:
  """Unpacks the code, creates the venv, pip-installs affjax and jax[tpu]."""
  venv, code = f'"$HOME/{REMOTE_VENV}"', f'"$HOME/{REMOTE_DIR}"'
  steps = [
    "set -e",
    f"rm -rf {code} && mkdir -p {code}",
    f'tar -xzf "$HOME/{ARCHIVE}" -C {code}',
    (
      f"command -v {python} >/dev/null || (sudo add-apt-repository -y "
      f"ppa:deadsnakes/ppa && sudo apt-get update -q && sudo apt-get "
      f"install -y -q {python} {python}-venv)"
    ),
    f"{python} -m venv {venv}",
    f"{venv}/bin/pip install -q --upgrade pip",
    (
      f'{venv}/bin/pip install -q -c "$HOME/{REMOTE_DIR}/.ci/'
      f'constraints.txt" -e "$HOME/{REMOTE_DIR}[{extras}]" '
      f"'jax[tpu]=={jax_version}'"
    ),
  ]
  return "; ".join(steps)


def main_command(job: jobs_lib.Job, extra: Sequence[str]) -> str:
  """The job's `affjax.main` command (from the code dir, so that
  `configs/...` paths and `import configs` work)."""
  main = shlex.join(
    ["-m", "affjax.main"] + job.main_args(distributed=True, extra=extra)
  )
  return (
    f'cd "$HOME/{REMOTE_DIR}" && TF_CPP_MIN_LOG_LEVEL=2 '
    f'"$HOME/{REMOTE_VENV}/bin/python" {main}'
  )


def _wrapper(job: jobs_lib.Job, extra: Sequence[str]) -> str:
  """The detached script: run, keep the log in the bucket, record status."""
  d = run_dir(job)
  log = f"{d}/worker.log"
  parts = []
  upload = ""
  if job.workdir.startswith("gs://"):
    url = f"{job.workdir.rstrip('/')}/logs/$(hostname).log"
    upload = f'gcloud storage cp {log} "{url}" >/dev/null 2>&1'
    parts.append(
      f"( while sleep {LOG_SYNC_SECONDS}; do {upload}; done ) & sync=$!"
    )
  parts += [
    f"( {main_command(job, extra)} ) >> {log} 2>&1",
    "rc=$?",
    f'echo "=== affjax exit $rc $(date -u +%FT%TZ)" >> {log}',
  ]
  if upload:
    parts += ['kill "$sync" 2>/dev/null', upload]
  parts.append(
    f'echo "$rc" > {d}/exit_code.tmp && mv {d}/exit_code.tmp {d}/exit_code'
  )
  return "; ".join(parts)


def start_command(job: jobs_lib.Job, extra: Sequence[str]) -> str:
  """Starts the job detached on a worker unless it runs or has succeeded.

  One line (as every remote command here), so a dry run prints one command
  per line.
  """
  d = run_dir(job)
  # A finished job counts only if it ran this very command: after a change
  # of arguments the same job name runs again.
  cmd = shlex.quote(main_command(job, extra))
  return " ".join(
    [
      f"mkdir -p {d};",
      f"if {_alive(d)}; then",
      f'echo "affjax: {job.name} is running on $(hostname): reattaching";',
      f'elif [ "$(cat {d}/exit_code 2>/dev/null)" = 0 ]',
      f'&& [ "$(cat {d}/command 2>/dev/null)" = {cmd} ]; then',
      f'echo "affjax: {job.name} already finished on $(hostname)";',
      "else",
      f"rm -f {d}/exit_code; printf %s {cmd} > {d}/command;",
      f'echo "=== affjax start $(date -u +%FT%TZ)" >> {d}/worker.log;',
      f"setsid nohup bash -c {shlex.quote(_wrapper(job, extra))}",
      "affjax-job > /dev/null 2>&1 < /dev/null &",
      f"echo $! > {d}/pid;",
      "fi",
    ]
  )


def status_command(job: jobs_lib.Job) -> str:
  """Prints one line `affjax-status <host> running|exit <N>|absent`."""
  d = run_dir(job)
  tag = f"{STATUS_TAG} $(hostname)"
  return " ".join(
    [
      f"if {_alive(d)}; then echo {tag} running;",
      f'elif [ -f {d}/exit_code ]; then echo {tag} exit "$(cat {d}/exit_code)";',
      f"else echo {tag} absent; fi",
    ]
  )


def parse_status(stdout: str) -> dict[str, str]:
  """`{host: "running" | "exit N" | "absent"}` from status output (other
  lines, e.g. ssh banners, are ignored)."""
  status = {}
  for line in stdout.splitlines():
    parts = line.split(None, 2)
    if len(parts) == 3 and parts[0] == STATUS_TAG:
      status[parts[1]] = parts[2].strip()
  return status


def log_command(job: jobs_lib.Job, offset: int) -> str:
  """The worker log from byte `offset` on (empty if there is none yet)."""
  return f"tail -c +{offset + 1} {run_dir(job)}/worker.log 2>/dev/null || true"


def stop_command(job: jobs_lib.Job) -> str:
  """Stops the job's whole process group on a worker, if it runs."""
  d = run_dir(job)
  return f'if {_alive(d)}; then kill -TERM -- -"$(cat {d}/pid)"; fi; true'
