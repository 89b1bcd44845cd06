"""Tests for `launch/`: the commands each launcher prints with --dry-run.

Printed commands are parsed back with `shlex`; remote shell commands (the
`--command=` of `gcloud ... ssh`) and the sbatch script are parsed too. The
sbatch script and the GPU scheduler are also executed with stand-ins for
`srun`, `scontrol` and the venv's python, which record what they were given.
"""

from __future__ import annotations

import io
import os
import shlex
import shutil
import stat
import subprocess
import textwrap
import time

import pytest

from launch import gpu_host, slurm, tpu_remote, tpu_steps, tpu_vm
from launch import jobs as jobs_lib

REPO = jobs_lib.REPO

TINY_CONFIG = '''
"""A tiny config with a sweep: 3 folds x 2 emotions."""
import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.emotion = arg or "valence"
  c.data = ml_collections.ConfigDict({"fold": 0})
  c.optim = ml_collections.ConfigDict({"learning_rate": 1e-3})
  return c


def sweep(add):
  for fold in range(3):
    for emotion in ("valence", "arousal"):
      add(arg=emotion, **{"data.fold": fold, "optim.learning_rate": 1e-4})
'''


@pytest.fixture
def tiny_config(tmp_path):
  path = tmp_path / "configs" / "tiny.py"
  path.parent.mkdir()
  path.write_text(TINY_CONFIG)
  return str(path)


@pytest.fixture
def allow_commands():
  """Requested by tests that really run (stand-in) commands."""


@pytest.fixture(autouse=True)
def refuse_real_commands(monkeypatch, request):
  """Guards against a launcher running gcloud, sbatch or pip for real (fake
  runners override `execute` and are not affected)."""
  if "allow_commands" in request.fixturenames:
    return

  def refuse(self, argv, **kwargs):
    raise AssertionError(f"a test tried to run {argv}")

  monkeypatch.setattr(jobs_lib.Runner, "execute", refuse)


def dry_run(cli, argv) -> list[str]:
  """Runs a launcher with --dry-run; returns its printed lines."""
  out = io.StringIO()
  cli(["--dry-run"] + argv, out=out)
  return out.getvalue().splitlines()


def commands(lines) -> list[list[str]]:
  return [shlex.split(line) for line in lines if not line.startswith("#")]


def main_args(tokens) -> list[str]:
  """The arguments following `-m affjax.main` in a token list."""
  i = tokens.index("affjax.main")
  assert tokens[i - 1] == "-m"
  return tokens[i + 1 :]


def flag(tokens, name) -> str:
  values = [t.split("=", 1)[1] for t in tokens if t.startswith(f"{name}=")]
  assert len(values) == 1, (name, tokens)
  return values[0]


EXPECTED_TINY = {(f, e) for f in range(3) for e in ("valence", "arousal")}


def check_tiny_jobs(runs, config, workdir, *, distributed, extra=()):
  """Each (fold, emotion) once, with its workdir, overrides and extras."""
  seen = set()
  for args in runs:
    path, _, arg = flag(args, "--config").partition(":")
    assert path == config
    fold = int(flag(args, "--config.data.fold"))
    assert flag(args, "--config.optim.learning_rate") == "0.0001"
    assert flag(args, "--workdir") == f"{workdir}/{arg}_fold{fold}"
    assert ("--distributed" in args) == distributed
    assert args[len(args) - len(extra) :] == list(extra)
    seen.add((fold, arg))
  assert len(runs) == len(seen) and seen == EXPECTED_TINY


# --------------------------------------------------------------------------
# Jobs from a sweep.


def test_jobs_from_tiny_sweep(tiny_config):
  jobs = jobs_lib.make_jobs(tiny_config + ":base", "wd", sweep=True)
  assert [j.name for j in jobs][:2] == ["valence_fold0", "arousal_fold0"]
  assert jobs[1].config == tiny_config + ":base,arousal"
  assert jobs[1].overrides == (
    ("data.fold", "0"),
    ("optim.learning_rate", "0.0001"),
  )
  assert jobs[1].workdir == "wd/" + jobs[1].name
  single = jobs_lib.make_jobs(tiny_config, "runs/one/")
  assert single == [jobs_lib.Job("one", tiny_config, "runs/one/")]


def test_jobs_from_lfan_sweep():
  jobs = jobs_lib.make_jobs("configs/lfan.py", "gs://b/lfan", sweep=True)
  assert len(jobs) == 12 and len({j.name for j in jobs}) == 12
  pairs = {(j.config.split(":")[1], j.workdir) for j in jobs}
  assert ("arousal,fold=5", "gs://b/lfan/arousal_fold5") in pairs
  assert {j.config for j in jobs} == {
    f"configs/lfan.py:{e},fold={f}"
    for f in range(6)
    for e in ("valence", "arousal")
  }


def test_job_selection_and_errors(tiny_config, tmp_path):
  names = ["valence_fold2", "arousal_fold1"]
  jobs = jobs_lib.make_jobs(tiny_config, "wd", sweep=True, only=names)
  assert [j.name for j in jobs] == names[::-1]  # sweep order
  with pytest.raises(ValueError, match="no such job"):
    jobs_lib.make_jobs(tiny_config, "wd", sweep=True, only=["nope"])
  no_sweep = tmp_path / "plain.py"
  no_sweep.write_text("def get_config(arg=None):\n  return None\n")
  with pytest.raises(ValueError, match="no `sweep"):
    jobs_lib.make_jobs(str(no_sweep), "wd", sweep=True)
  with pytest.raises(FileNotFoundError, match="missing.py"):
    jobs_lib.make_jobs("missing.py:x", "wd", sweep=True)


def test_format_value_round_trips_through_config_flags():
  assert jobs_lib.format_value((1, 2)) == "(1, 2)"
  assert jobs_lib.format_value(True) == "True"
  assert jobs_lib.format_value("a b") == "a b"


# --------------------------------------------------------------------------
# Cloud TPU VM: dry runs.

TPU_ARGS = [
  "--name=affjax-pod",
  "--zone=us-central2-b",
  "--accelerator_type=v4-32",
  "--bucket=gs://bkt",
  "--sweep",
  "--workdir=exp",
]
GCLOUD_TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
# Before a run: pack the code, copy it to the workers, install.
PREPARE = ["tar", "scp", "install"]
# After a run: verify the two default files in the bucket, then fetch.
COLLECT = ["mkdir", "storage-ls", "storage-ls", "storage-cp"]
GCLOUD_QR = ["gcloud", "compute", "tpus", "queued-resources"]


def _remote(tokens) -> str:
  """The remote shell command of a `gcloud ... tpu-vm ssh`."""
  assert tokens[:5] == GCLOUD_TPU + ["ssh"]
  return flag(tokens, "--command")


def _started_main_args(tokens) -> list[str]:
  """`affjax.main` arguments of the job a start command runs detached."""
  words = shlex.split(_remote(tokens))
  i = words.index("nohup")
  assert words[i + 1 : i + 3] == ["bash", "-c"]
  wrapper = words[i + 3]
  line = next(x for x in wrapper.split("; ") if "affjax.main" in x)
  inner = shlex.split(line)
  return main_args(inner)[: inner.index(")") - inner.index("affjax.main") - 1]


def _kind(tokens) -> str:
  """A short name for a printed command (what the step does)."""
  if tokens[:2] == ["gcloud", "storage"]:
    return f"storage-{tokens[2]}"
  if tokens[:4] in (GCLOUD_TPU, GCLOUD_QR):
    verb = tokens[4]
    if verb != "ssh":
      return ("qr-" if tokens[3] == "queued-resources" else "") + verb
    cmd = _remote(tokens)
    for word, kind in (
      ("pip install", "install"),
      ("setsid nohup", "start"),
      ("affjax-status", "status"),
      ("tail -c", "log"),
      ("kill -TERM", "stop"),
    ):
      if word in cmd:
        return kind
    return "ssh"
  return tokens[0]


@pytest.mark.parametrize(
  "accelerator,runtime",
  [
    ("v4-32", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-32", "v2-alpha-tpuv5"),
    ("v6e-16", "v2-alpha-tpuv6e"),
  ],
)
def test_tpu_dry_run_exact_commands_per_family(accelerator, runtime):
  """Every step's command for one job on each accelerator family."""
  lines = dry_run(
    tpu_vm.cli,
    [
      "--name=tpu",
      "--zone=zz",
      f"--accelerator_type={accelerator}",
      "--workdir=gs://bkt/run",
      "--config=configs/lfan.py:arousal",
      "--spot",
    ],
  )
  cmds = commands(lines)
  assert [_kind(c) for c in cmds] == [
    "create",
    *PREPARE,
    "start",
    "status",
    "log",
    *COLLECT,
    "delete",
  ]
  assert cmds[0] == GCLOUD_TPU + [
    "create",
    "tpu",
    "--zone=zz",
    f"--accelerator-type={accelerator}",
    f"--version={runtime}",
    "--spot",
  ]
  assert cmds[2] == GCLOUD_TPU + [
    "scp",
    cmds[1][2],
    "tpu:affjax-src.tar.gz",
    "--zone=zz",
    "--worker=all",
  ]
  assert cmds[4][:8] == GCLOUD_TPU + ["ssh", "tpu", "--zone=zz", "--worker=all"]
  assert _started_main_args(cmds[4]) == [
    "--config=configs/lfan.py:arousal",
    "--workdir=gs://bkt/run",
    "--distributed",
  ]
  assert "--worker=all" in cmds[5] and "--worker=0" in cmds[6]
  assert cmds[8:] == [
    ["gcloud", "storage", "ls", "gs://bkt/run/checkpoints"],
    ["gcloud", "storage", "ls", "gs://bkt/run/eval/*/results.json"],
    ["gcloud", "storage", "cp", "-r", "gs://bkt/run", "workdirs/tpu_results"],
    GCLOUD_TPU + ["delete", "tpu", "--zone=zz", "--quiet"],
  ]


def test_tpu_dry_run_queued_resource_and_runtime_override():
  lines = dry_run(
    tpu_vm.cli,
    [
      "--name=q",
      "--zone=zz",
      "--accelerator_type=v5litepod-16",
      "--runtime_version=my-image",
      "--project=proj",
      "--workdir=gs://bkt/run",
      "--config=configs/lfan.py",
      "--queued",
      "--spot",
      "--steps=create,delete",
      "--verify_files=checkpoints",
    ],
  )
  cmds = commands(lines)
  assert cmds == [
    GCLOUD_QR
    + [
      "create",
      "q",
      "--zone=zz",
      "--project=proj",
      "--node-id=q",
      "--accelerator-type=v5litepod-16",
      "--runtime-version=my-image",
      "--spot",
    ],
    GCLOUD_QR
    + [
      "describe",
      "q",
      "--zone=zz",
      "--project=proj",
      "--format=value(state.state)",
    ],
    ["gcloud", "storage", "ls", "gs://bkt/run/checkpoints"],
    GCLOUD_QR
    + ["delete", "q", "--zone=zz", "--project=proj", "--force", "--quiet"],
  ]


def test_tpu_runtime_version_unknown_family():
  with pytest.raises(ValueError, match="--runtime_version"):
    tpu_vm.runtime_version("v7x-8")


def test_tpu_dry_run_sweep(tiny_config):
  extra = ["--config.data.raw_dir=/mnt/data", "--mode=train"]
  lines = dry_run(
    tpu_vm.cli, TPU_ARGS + [f"--config={tiny_config}", "--", *extra]
  )
  cmds = commands(lines)
  kinds = [_kind(c) for c in cmds]
  assert kinds == (
    ["create", "tar", "scp", "install"]
    + ["start", "status", "log"] * 6
    + ["mkdir"]
    + ["storage-ls", "storage-ls", "storage-cp"] * 6
    + ["delete"]
  )
  install = _remote(cmds[3])
  assert "jax[tpu]==0.10.2" in shlex.split(install.replace(";", " ; "))
  assert '-e "$HOME/affjax[preprocess]"' in install
  starts = [c for c, k in zip(cmds, kinds) if k == "start"]
  runs = [_started_main_args(c) for c in starts]
  check_tiny_jobs(
    runs, tiny_config, "gs://bkt/exp", distributed=True, extra=extra
  )
  # Each job has its own run directory (pid, exit code, log) per worker.
  dirs = {_remote(c).split()[2].rstrip(";") for c in starts}
  assert dirs == {
    f'"$HOME/affjax-runs/{e}_fold{f}"'
    for f in range(3)
    for e in ("valence", "arousal")
  }
  fetched = [c[4] for c, k in zip(cmds, kinds) if k == "storage-cp"]
  assert sorted(fetched) == sorted(flag(a, "--workdir") for a in runs)


def test_tpu_dry_run_local_workdir_fetches_then_verifies():
  lines = dry_run(
    tpu_vm.cli,
    [
      "--name=v4",
      "--zone=z",
      "--accelerator_type=v4-8",
      "--config=configs/lfan.py:arousal",
      "--workdir=/home/me/run1",
      "--steps=run,fetch,delete",
      "--project=proj",
    ],
  )
  assert [_kind(c) for c in commands(lines)] == [
    "start",
    "status",
    "log",
    "mkdir",
    "scp",
    "delete",
  ]
  fetch = commands(lines)[4]
  assert fetch[4:6] == ["scp", "v4:/home/me/run1"]
  assert "--worker=0" in fetch and "--recurse" in fetch
  checks = [line for line in lines if line.startswith("# check that")]
  assert checks == [
    "# check that workdirs/tpu_results/run1/checkpoints exists",
    "# check that workdirs/tpu_results/run1/eval/*/results.json exists",
  ]


def test_tpu_dry_run_parallel_one_vm_per_job(tiny_config):
  lines = dry_run(
    tpu_vm.cli, TPU_ARGS + [f"--config={tiny_config}", "--parallel", "--spot"]
  )
  cmds = commands(lines)
  created = [c[5] for c in cmds if _kind(c) == "create"]
  deleted = [c[5] for c in cmds if _kind(c) == "delete"]
  assert created == deleted == [f"affjax-pod-{i}" for i in range(6)]
  assert all("--spot" in c for c in cmds if _kind(c) == "create")
  runs = [_started_main_args(c) for c in cmds if _kind(c) == "start"]
  check_tiny_jobs(runs, tiny_config, "gs://bkt/exp", distributed=True)


@pytest.mark.parametrize(
  "argv,match",
  [
    (["--workdir=relative"], "absolute path"),
    (["--workdir=x", "--bucket=bkt"], "gs://<bucket>"),
    (["--workdir=gs://b/x", "--steps=run,launch"], "unknown"),
  ],
)
def test_tpu_bad_arguments(argv, match):
  base = [
    "--name=n",
    "--zone=z",
    "--accelerator_type=v4-8",
    "--config=configs/lfan.py",
  ]
  with pytest.raises(ValueError, match=match):
    dry_run(tpu_vm.cli, base + argv)


# --------------------------------------------------------------------------
# Cloud TPU VM: the control loop against a simulated cloud.


class FakeCloud(jobs_lib.Runner):
  """A runner that records commands and answers them like gcloud would.

  The TPU has a `state` ("" = does not exist); `create` makes it usable
  after `pending` intermediate states, `delete` removes it. `polls` answer
  successive status polls: `{host: state}`, "lost" (ssh fails, the TPU is
  still up) or "preempted" (ssh fails, the TPU is PREEMPTED). `verified` is
  whether `gcloud storage ls` finds the results.
  """

  def __init__(self, polls, state="", pending=(), verified=True, log=()):
    super().__init__(dry_run=False, out=io.StringIO())
    self.polls, self.state, self.pending = list(polls), state, list(pending)
    self.verified, self.log = verified, list(log)
    self.calls: list[list[str]] = []
    self.slept = 0.0

  def execute(self, argv, *, capture, **kwargs):
    self.calls.append(argv)
    kind = _kind(argv).removeprefix("qr-")
    if kind == "describe":
      state = self.pending.pop(0) if self.pending else self.state
      return jobs_lib.Result(0 if state else 1, state + "\n")
    if kind == "create":
      self.state = "ACTIVE" if "queued-resources" in argv else "READY"
    if kind == "delete":
      self.state = ""
    if kind == "status":
      poll = self.polls.pop(0)
      if poll in ("lost", "preempted"):
        self.state = "PREEMPTED" if poll == "preempted" else self.state
        return jobs_lib.Result(255, "")
      text = "".join(f"affjax-status {h} {s}\n" for h, s in poll.items())
      return jobs_lib.Result(0, "ssh banner\n" + text)
    if kind == "log":
      return jobs_lib.Result(0, self.log.pop(0) if self.log else "")
    if kind == "storage-ls":
      ok = self.verified
      return jobs_lib.Result(0 if ok else 1, "gs://x/y\n" if ok else "")
    return jobs_lib.Result(0)

  def sleep(self, seconds):
    self.slept += seconds

  def kinds(self):
    return [_kind(c) for c in self.calls]


def _run_fake(cloud, *extra_args):
  args, extra = jobs_lib.split_extra(
    [
      "--name=pod",
      "--zone=z",
      "--accelerator_type=v5p-16",
      "--workdir=gs://bkt/run",
      "--config=configs/lfan.py:arousal",
      "--poll_seconds=30",
      *extra_args,
    ]
  )
  tpu_vm.main(tpu_vm.build_parser().parse_args(args), extra, cloud)
  return cloud.kinds()


RUNNING = {"w0": "running", "w1": "running"}
DONE = {"w0": "exit 0", "w1": "exit 0"}


def test_tpu_detached_run_polls_streams_verifies_then_deletes():
  cloud = FakeCloud(
    polls=[RUNNING, {"w0": "exit 0", "w1": "running"}, DONE],
    log=["step 1\n", "", "step 2\ndone\n"],
  )
  kinds = _run_fake(cloud)
  assert kinds == [
    "describe",
    "create",
    "describe",
    *PREPARE,
    "start",
    *["status", "log"] * 3,
    *COLLECT,
    "delete",
  ]
  assert cloud.slept == 60  # two polls saw a running worker
  out = cloud.out.getvalue()
  assert "step 1\nstep 2\ndone\n" in out
  # Log offsets advance by the bytes already shown.
  tails = [_remote(c) for c in cloud.calls if _kind(c) == "log"]
  assert [t.split()[2] for t in tails] == ["+1", "+8", "+8"]
  # Polls are not echoed (only the stream); the other commands are.
  assert "affjax-status" not in out and "+ gcloud compute tpus" in out


def test_runner_captures_undecodable_bytes_exactly(allow_commands):
  """A log read from an offset can start inside a UTF-8 character."""
  runner = jobs_lib.Runner(dry_run=False, out=io.StringIO())
  r = runner.run(["printf", "\\251ok"], capture=True, echo=False)
  assert r.stdout.encode("utf-8", "surrogateescape") == b"\xa9ok"


def test_tpu_log_offsets_count_bytes():
  cloud = FakeCloud(polls=[RUNNING, DONE], state="READY", log=["é\n"])
  _run_fake(cloud, "--steps=run")
  tails = [_remote(c).split()[2] for c in cloud.calls if _kind(c) == "log"]
  assert tails == ["+1", "+4"]  # "é" is 2 bytes in UTF-8


def test_tpu_failed_verification_keeps_the_vm():
  cloud = FakeCloud(polls=[DONE], state="READY", verified=False)
  with pytest.raises(RuntimeError, match="not verified"):
    _run_fake(cloud, "--steps=run,verify,fetch,delete")
  assert (
    cloud.kinds() == ["start", "status", "log", "mkdir"] + ["storage-ls"] * 2
  )
  assert "TPU pod kept" in cloud.out.getvalue()


def test_tpu_failed_fetch_keeps_the_vm():
  class FetchFails(FakeCloud):
    def execute(self, argv, *, capture, **kwargs):
      if _kind(argv) == "storage-cp":
        self.calls.append(argv)
        return jobs_lib.Result(1)
      return super().execute(argv, capture=capture, **kwargs)

  cloud = FetchFails(polls=[DONE], state="READY")
  with pytest.raises(subprocess.CalledProcessError):
    _run_fake(cloud, "--steps=run,fetch,delete")
  assert cloud.kinds()[-1] == "storage-cp" and "delete" not in cloud.kinds()


def test_tpu_reattaches_to_a_running_job():
  """A second launch finds the TPU READY and the job running: no create, no
  new code under the running job; it polls until the end."""
  cloud = FakeCloud(polls=[RUNNING, RUNNING, RUNNING, DONE], state="READY")
  kinds = _run_fake(cloud, "--keep")
  assert kinds == [
    "describe",
    "status",  # probe: the job runs
    "start",  # idempotent: the workers print "reattaching"
    *["status", "log"] * 3,
    *COLLECT,
  ]
  assert "reattaching" in cloud.out.getvalue()


def test_tpu_preempted_vm_is_recreated_and_the_job_resumes():
  cloud = FakeCloud(polls=[RUNNING, "lost", "preempted", RUNNING, DONE])
  kinds = _run_fake(cloud, "--spot")
  once = ["describe", "create", "describe", *PREPARE, "start"]
  assert (
    kinds
    == [
      *once,
      "status",
      "log",
      "status",  # lost: the TPU is READY, poll again
      "describe",
      "status",  # lost: the TPU is PREEMPTED
      "describe",
      "describe",  # restart: delete the preempted TPU, create it anew
      "delete",
      *once[1:],
      *["status", "log"] * 2,
      "mkdir",
      "storage-ls",
      "storage-ls",
      "storage-cp",
      "delete",
    ]
  )
  assert "restart 1/3: resuming" in cloud.out.getvalue()


def test_tpu_resume_after_preemption_skips_finished_jobs(tiny_config):
  only = "--only=valence_fold0,arousal_fold0"
  cloud = FakeCloud(polls=[DONE, "preempted", DONE])
  _run_fake(cloud, f"--config={tiny_config}", "--sweep", only)
  starts = [_started_main_args(c) for c in cloud.calls if _kind(c) == "start"]
  workdirs = [flag(a, "--workdir") for a in starts]
  assert (
    workdirs
    == ["gs://bkt/run/valence_fold0"] + ["gs://bkt/run/arousal_fold0"] * 2
  )


def test_tpu_gives_up_after_max_restarts():
  cloud = FakeCloud(polls=["preempted"] * 3)
  with pytest.raises(RuntimeError, match="--max_restarts=1"):
    _run_fake(cloud, "--max_restarts=1")
  kinds = cloud.kinds()
  assert kinds.count("create") == 2 and kinds.count("delete") == 1
  assert "storage-ls" not in kinds and kinds[-1] == "describe"


def test_tpu_job_failure_stops_workers_and_keeps_the_vm():
  cloud = FakeCloud(polls=[{"w0": "exit 1", "w1": "running"}], state="READY")
  with pytest.raises(RuntimeError, match="failed on pod"):
    _run_fake(cloud, "--steps=run,verify,fetch,delete")
  assert cloud.kinds() == ["start", "status", "log", "stop"]


def test_tpu_lost_process_restarts_the_job():
  """A worker whose process vanished (no exit code, e.g. a host reboot):
  stop the others and start again on the same TPU."""
  lost = {"w0": "absent", "w1": "running"}
  cloud = FakeCloud(polls=[RUNNING, lost, RUNNING, DONE], state="READY")
  assert _run_fake(cloud) == [
    "describe",
    "status",  # probe: running, so no new code
    "start",
    "status",
    "log",
    "stop",
    "describe",
    "status",
    "start",
    "status",
    "log",
    *COLLECT,
    "delete",
  ]


def test_tpu_rerun_after_a_failure_on_a_kept_vm_copies_new_code():
  failed = {"w0": "exit 1", "w1": "exit 1"}
  cloud = FakeCloud(polls=[failed, DONE], state="READY")
  kinds = _run_fake(cloud, "--steps=create,copy,install,run")
  assert kinds == [
    "describe",
    "status",  # probe: nothing runs
    *PREPARE,
    "start",
    "status",
    "log",
  ]


def test_tpu_lost_connection_while_ready_reports_reattach():
  polls = ["lost"] * tpu_steps.MAX_POLL_FAILURES
  cloud = FakeCloud(polls=polls, state="READY")
  with pytest.raises(RuntimeError, match="reattach"):
    _run_fake(cloud, "--steps=run,delete")
  assert "delete" not in cloud.kinds()


def test_tpu_queued_resource_waits_until_active():
  cloud = FakeCloud(
    polls=[DONE], pending=["", "WAITING_FOR_RESOURCES", "PROVISIONING"]
  )
  kinds = _run_fake(cloud, "--queued", "--spot")
  assert kinds[:5] == [
    "qr-describe",
    "qr-create",
    "qr-describe",
    "qr-describe",
    "qr-describe",
  ]
  assert cloud.slept == 60 and kinds[-1] == "qr-delete"
  create = cloud.calls[1]
  assert "--runtime-version=v2-alpha-tpuv5" in create and "--spot" in create
  assert cloud.calls[-1][-2:] == ["--force", "--quiet"]


# --------------------------------------------------------------------------
# Cloud TPU VM: the remote scripts, run by bash on this machine.


def _bash(script, home, path):
  env = {"HOME": str(home), "PATH": f"{path}:{os.environ['PATH']}"}
  return subprocess.run(
    ["bash", "-c", script],
    env=env,
    capture_output=True,
    text=True,
    timeout=30,
    check=False,
  )


def _wait_status(job, home, path, want, timeout=20.0):
  deadline = time.monotonic() + timeout
  while True:
    out = _bash(tpu_remote.status_command(job), home, path).stdout
    status = tpu_remote.parse_status(out)
    if list(status.values()) == [want] or time.monotonic() > deadline:
      return list(status.values())
    time.sleep(0.05)


@pytest.mark.skipif(
  not (shutil.which("setsid") and shutil.which("ps")),
  reason="needs setsid and ps",
)
def test_remote_scripts_detach_log_status_stop_and_restart(
  tmp_path, allow_commands
):
  """start -> running (outlives the shell that started it) -> exit 0 -> no
  restart; a failed run restarts; stop kills it; the log is uploaded."""
  home, bin_dir = tmp_path / "home", tmp_path / "bin"
  venv_bin = home / "affjax-venv" / "bin"
  venv_bin.mkdir(parents=True)
  (home / "affjax").mkdir()
  bin_dir.mkdir()
  gate = tmp_path / "gate"
  python = venv_bin / "python"
  # Stand-in for the job: logs its args, waits for the gate file, exits
  # with the status written in it.
  python.write_text(
    textwrap.dedent(f"""\
      #!/bin/bash
      echo "args $*"
      echo "started" >> {tmp_path}/starts
      while [[ ! -s {gate} ]]; do sleep 0.05; done
      exit "$(cat {gate})"
      """)
  )
  gcloud = bin_dir / "gcloud"  # records the log uploads
  gcloud.write_text(f'#!/bin/bash\necho "$*" >> {tmp_path}/gcloud_calls\n')
  for f in (python, gcloud):
    f.chmod(f.stat().st_mode | stat.S_IEXEC)
  job = jobs_lib.Job("valence_fold0", "configs/x.py", "gs://b/run")
  start = tpu_remote.start_command(job, ["--config.seed=3"])

  assert _bash(start, home, bin_dir).returncode == 0
  assert _wait_status(job, home, bin_dir, "running") == ["running"]
  again = _bash(start, home, bin_dir).stdout
  assert "reattaching" in again
  gate.write_text("0")
  assert _wait_status(job, home, bin_dir, "exit 0") == ["exit 0"]
  assert "already finished" in _bash(start, home, bin_dir).stdout
  log = _bash(tpu_remote.log_command(job, 0), home, bin_dir).stdout
  assert (
    "args -m affjax.main --config=configs/x.py --workdir=gs://b/run "
    "--distributed --config.seed=3" in log
  )
  assert log.rstrip().splitlines()[-1].startswith("=== affjax exit 0 ")
  tail = _bash(
    tpu_remote.log_command(job, len(log.encode()) - 4), home, bin_dir
  )
  assert tail.stdout == log[-4:]
  uploads = (tmp_path / "gcloud_calls").read_text().splitlines()
  assert uploads[-1].startswith("storage cp ") and uploads[-1].endswith(
    "/logs/" + os.uname().nodename + ".log"
  )

  # The finished job with other arguments runs again.
  gate.write_text("")
  other = tpu_remote.start_command(job, ["--config.seed=4"])
  _bash(other, home, bin_dir)
  assert _wait_status(job, home, bin_dir, "running") == ["running"]
  gate.write_text("0")
  assert _wait_status(job, home, bin_dir, "exit 0") == ["exit 0"]
  assert (tmp_path / "starts").read_text().count("started") == 2

  # A failed run is started again (resume); stop ends it.
  (home / "affjax-runs" / "valence_fold0" / "exit_code").write_text("1\n")
  gate.write_text("")
  _bash(other, home, bin_dir)
  assert _wait_status(job, home, bin_dir, "running") == ["running"]
  assert (tmp_path / "starts").read_text().count("started") == 3
  _bash(tpu_remote.stop_command(job), home, bin_dir)
  # The wrapper dies with its group, so no exit code: "absent".
  assert _wait_status(job, home, bin_dir, "absent") == ["absent"]


# --------------------------------------------------------------------------
# Multi-GPU host.


def test_gpu_dry_run_install_and_sequential(tiny_config):
  lines = dry_run(
    gpu_host.cli,
    [
      f"--config={tiny_config}",
      "--workdir=/runs/exp",
      "--sweep",
      "--install",
      "--venv=/opt/venv",
      "--",
      "--config.seed=3",
    ],
  )
  venv, pip_up, install, *runs = commands(lines)
  assert venv == ["python3", "-m", "venv", "/opt/venv"]
  assert pip_up[:2] == ["/opt/venv/bin/pip", "install"]
  assert f"{REPO}[preprocess]" in install and "jax[cuda13]==0.10.2" in install
  assert install[install.index("-c") + 1] == f"{REPO}/.ci/constraints.txt"
  for tokens in runs:
    assert tokens[:2] == ["env", "TF_CPP_MIN_LOG_LEVEL=2"]
    assert not any(t.startswith("CUDA_VISIBLE_DEVICES") for t in tokens)
    assert tokens[2] == "/opt/venv/bin/python"
  check_tiny_jobs(
    [main_args(t) for t in runs],
    tiny_config,
    "/runs/exp",
    distributed=False,
    extra=["--config.seed=3"],
  )


def test_gpu_dry_run_gpu_groups(tiny_config):
  lines = dry_run(
    gpu_host.cli,
    [
      f"--config={tiny_config}",
      "--workdir=/runs/exp",
      "--sweep",
      "--gpus-per-job=2",
      "--num-gpus=4",
      "--num-cpus=8",
    ],
  )
  runs = commands(lines)
  assert [flag(t, "CUDA_VISIBLE_DEVICES") for t in runs] == ["0,1", "2,3"] * 3
  # Each of the 2 slots is pinned to half of the 8 cores.
  assert [t[3:6] for t in runs] == [
    ["taskset", "-c", "0,1,2,3"],
    ["taskset", "-c", "4,5,6,7"],
  ] * 3
  check_tiny_jobs(
    [main_args(t) for t in runs], tiny_config, "/runs/exp", distributed=False
  )
  with pytest.raises(ValueError, match="divisor"):
    dry_run(
      gpu_host.cli,
      [
        f"--config={tiny_config}",
        "--workdir=w",
        "--gpus_per_job=3",
        "--num_gpus=4",
      ],
    )


def test_gpu_cpu_groups_split_the_cores():
  assert gpu_host.cpu_groups(8, 3) == ["0,1", "2,3", "4,5"]
  assert gpu_host.cpu_groups(2, 4) == ["0", "1", "1", "1"]  # more slots
  mine = sorted(os.sched_getaffinity(0))
  assert gpu_host.cpu_groups(0, 1) == [",".join(map(str, mine))]


def _fake_python(path, record_dir):
  """An executable that records its argv and env into record_dir; it fails
  if another one runs on the same CUDA_VISIBLE_DEVICES at the same time."""
  path.write_text(
    textwrap.dedent(f"""\
      #!/bin/bash
      out={shlex.quote(str(record_dir))}/$$.txt
      if [[ -n "${{CUDA_VISIBLE_DEVICES:-}}" ]]; then
        lock={shlex.quote(str(record_dir))}/../busy_$CUDA_VISIBLE_DEVICES
        mkdir "$lock" || exit 7
        sleep 0.3
        rmdir "$lock"
      fi
      {{ echo "ARGS $*"; env | grep -E '^(AFFJAX_|CUDA_VISIBLE|SLURM_)' | sort
      }} > "$out.tmp" && mv "$out.tmp" "$out"
      """)
  )
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _records(record_dir):
  out = []
  for name in sorted(os.listdir(record_dir)):
    with open(record_dir / name) as f:
      lines = f.read().splitlines()
    env = dict(line.split("=", 1) for line in lines[1:])
    out.append((shlex.split(lines[0][len("ARGS ") :]), env))
  return out


def test_gpu_runs_jobs_in_parallel_slots(tiny_config, tmp_path, allow_commands):
  venv, record = tmp_path / "venv", tmp_path / "record"
  (venv / "bin").mkdir(parents=True)
  record.mkdir()
  _fake_python(venv / "bin" / "python", record)
  out = io.StringIO()
  gpu_host.cli(
    [
      f"--config={tiny_config}",
      f"--workdir={tmp_path}/wd",
      "--sweep",
      f"--venv={venv}",
      "--gpus_per_job=1",
      "--num_gpus=2",
      f"--log_dir={tmp_path}/logs",
    ],
    out=out,
  )
  runs = _records(record)
  check_tiny_jobs(
    [a[a.index("affjax.main") + 1 :] for a, _ in runs],
    tiny_config,
    f"{tmp_path}/wd",
    distributed=False,
  )
  # Both GPUs used, never two jobs on one (the stand-in would exit 7).
  assert {env["CUDA_VISIBLE_DEVICES"] for _, env in runs} == {"0", "1"}
  assert len(os.listdir(tmp_path / "logs")) == 6


# --------------------------------------------------------------------------
# SLURM.


def _script(lines) -> str:
  return "\n".join(line[4:] for line in lines if line.startswith("# | "))


def _job_lines(script):
  runs = []
  for line in script.splitlines():
    if "ARGS=( " in line:
      runs.append(shlex.split(line.split("ARGS=( ", 1)[1].rsplit(" ) ;;")[0]))
  return runs


def test_slurm_dry_run_script(tiny_config, tmp_path):
  lines = dry_run(
    slurm.cli,
    [
      f"--config={tiny_config}",
      "--workdir=/shared/exp",
      "--sweep",
      "--nodes=2",
      "--gpus_per_node=4",
      "--partition=gpu",
      "--account=acc",
      f"--log_dir={tmp_path}/logs",
      "--venv=/shared/venv",
      "--",
      "--config.data.raw_dir=/shared/data",
    ],
  )
  assert commands(lines) == [["sbatch", f"{tmp_path}/logs/affjax.sbatch"]]
  script = _script(lines)
  for expected in (
    "#SBATCH --nodes=2",
    "#SBATCH --ntasks-per-node=4",
    "#SBATCH --gpus-per-node=4",
    "#SBATCH --array=0-5",
    "#SBATCH --partition=gpu",
    "#SBATCH --account=acc",
    "export AFFJAX_NUM_PROCESSES=8",
  ):
    assert expected in script.splitlines()
  check_tiny_jobs(
    _job_lines(script),
    tiny_config,
    "/shared/exp",
    distributed=True,
    extra=["--config.data.raw_dir=/shared/data"],
  )
  srun = [line for line in script.splitlines() if line.startswith("srun")]
  assert len(srun) == 1 and "/shared/venv/bin/python" in shlex.split(srun[0])
  if shutil.which("bash"):
    check = subprocess.run(
      ["bash", "-n"], input=script, text=True, capture_output=True, check=False
    )
    assert check.returncode == 0, check.stderr


def _fake_slurm_bin(bin_dir, ntasks, tasks_per_node):
  bin_dir.mkdir()
  scontrol = bin_dir / "scontrol"
  scontrol.write_text("#!/bin/bash\necho node-a\necho node-b\n")
  srun = bin_dir / "srun"
  # Starts the command once per task with the variables srun sets.
  srun.write_text(
    textwrap.dedent(f"""\
      #!/bin/bash
      while [[ "$1" == --* ]]; do echo "$1" >> "$(dirname "$0")/srun_options"; shift; done
      for ((i = 0; i < {ntasks}; i++)); do
        SLURM_PROCID=$i SLURM_LOCALID=$((i % {tasks_per_node})) "$@" || exit 1
      done
      """)
  )
  for f in (scontrol, srun):
    f.chmod(f.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("process_per", ["gpu", "node"])
def test_slurm_script_runs_with_stand_ins(tiny_config, tmp_path, process_per):
  """Executes the generated script: array task 3 -> its job, 1 process per
  GPU (or node) with the coordinator on the first node."""
  venv, record = tmp_path / "venv", tmp_path / "record"
  (venv / "bin").mkdir(parents=True)
  record.mkdir()
  _fake_python(venv / "bin" / "python", record)
  script_path = tmp_path / "job.sbatch"
  lines = dry_run(
    slurm.cli,
    [
      f"--config={tiny_config}",
      "--workdir=/shared/exp",
      "--sweep",
      "--nodes=2",
      "--gpus_per_node=2",
      f"--process_per={process_per}",
      f"--venv={venv}",
      f"--script={script_path}",
      f"--repo_dir={tmp_path}",
    ],
  )
  script_path.write_text(_script(lines))
  per_node = 2 if process_per == "gpu" else 1
  _fake_slurm_bin(tmp_path / "bin", 2 * per_node, per_node)
  env = {
    "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
    "SLURM_ARRAY_TASK_ID": "3",
    "SLURM_JOB_ID": "123456",
    "SLURM_JOB_NODELIST": "node-[a-b]",
    "SLURM_CPUS_ON_NODE": "32",
    "HOME": str(tmp_path),
  }
  result = subprocess.run(
    ["bash", str(script_path)],
    env=env,
    capture_output=True,
    text=True,
    timeout=30,
    check=False,
  )
  assert result.returncode == 0, result.stderr
  runs = _records(record)
  assert len(runs) == 2 * per_node
  job3 = _job_lines(_script(lines))[3]
  ids = []
  for args, run_env in runs:
    assert args == ["-m", "affjax.main"] + job3
    assert run_env["AFFJAX_COORDINATOR"] == f"node-a:{20000 + 123456 % 20000}"
    assert run_env["AFFJAX_NUM_PROCESSES"] == str(2 * per_node)
    ids.append(int(run_env["AFFJAX_PROCESS_ID"]))
    expected_devices = (
      str(int(run_env["SLURM_LOCALID"])) if process_per == "gpu" else "0,1"
    )
    assert run_env["AFFJAX_LOCAL_DEVICE_IDS"] == expected_devices
  assert sorted(ids) == list(range(2 * per_node))
  # Whole nodes, their 32 cores split between the node's processes.
  options = (tmp_path / "bin" / "srun_options").read_text().split()
  assert options == [
    "--kill-on-bad-exit=1",
    f"--cpus-per-task={32 // per_node}",
  ]
  script = script_path.read_text().splitlines()
  assert "#SBATCH --exclusive" in script and "#SBATCH --mem=0" in script


def test_slurm_explicit_cpus_per_task(tiny_config):
  lines = dry_run(
    slurm.cli,
    [f"--config={tiny_config}", "--workdir=/w", "--cpus_per_task=6"],
  )
  script = _script(lines).splitlines()
  assert "#SBATCH --cpus-per-task=6" in script and "cpus=6" in script
  assert "#SBATCH --exclusive" not in script
  srun = shlex.split(next(x for x in script if x.startswith("srun")))
  assert srun[:3] == ["srun", "--kill-on-bad-exit=1", "--cpus-per-task=$cpus"]


def test_slurm_rejects_bad_sizes(tiny_config):
  with pytest.raises(ValueError, match="at least 1"):
    dry_run(slurm.cli, [f"--config={tiny_config}", "--workdir=/w", "--nodes=0"])
