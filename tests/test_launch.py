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

import pytest

from launch import gpu_host, slurm, tpu_vm
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
  """Guards against a launcher running gcloud, sbatch or pip for real."""
  if "allow_commands" in request.fixturenames:
    return
  run = jobs_lib.Runner.run

  def dry_only(self, argv, **kwargs):
    if not self.dry_run:
      raise AssertionError(f"a test tried to run {argv}")
    return run(self, argv, **kwargs)

  monkeypatch.setattr(jobs_lib.Runner, "run", dry_only)


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
# Cloud TPU VM.

TPU_ARGS = [
  "--name=affjax-pod",
  "--zone=us-central2-b",
  "--accelerator_type=v4-32",
  "--bucket=gs://bkt",
  "--sweep",
  "--workdir=exp",
]


def _ssh_command(tokens) -> str:
  assert tokens[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
  assert "--worker=all" in tokens and "--zone=us-central2-b" in tokens
  return flag(tokens, "--command")


def test_tpu_dry_run_sweep(tiny_config):
  extra = ["--config.data.raw_dir=/mnt/data", "--mode=train"]
  lines = dry_run(
    tpu_vm.cli, TPU_ARGS + [f"--config={tiny_config}", "--", *extra]
  )
  cmds = commands(lines)
  create, tar, scp, install, *runs = cmds[:-8]
  assert create[:6] == [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "create",
    "affjax-pod",
  ]
  assert flag(create, "--accelerator-type") == "v4-32"
  assert flag(create, "--zone") == "us-central2-b"
  assert tar[:2] == ["tar", "-czf"] and tar[-1] == "."
  assert scp[4] == "scp" and "--worker=all" in scp
  assert "affjax-pod:affjax-src.tar.gz" in scp and tar[2] in scp
  install_cmd = _ssh_command(install)
  assert "jax[tpu]==0.10.2" in shlex.split(install_cmd.replace(";", " ; "))
  assert '-e "$HOME/affjax[preprocess]"' in install_cmd
  runs_args = []
  for tokens in runs:
    inner = shlex.split(_ssh_command(tokens))
    assert inner[:4] == ["cd", "$HOME/affjax", "&&", "TF_CPP_MIN_LOG_LEVEL=2"]
    runs_args.append(main_args(inner))
  check_tiny_jobs(
    runs_args, tiny_config, "gs://bkt/exp", distributed=True, extra=extra
  )
  mkdir, *fetches, delete = cmds[-8:]
  assert mkdir == ["mkdir", "-p", "workdirs/tpu_results"]
  assert sorted(f[4] for f in fetches) == sorted(
    flag(a, "--workdir") for a in runs_args
  )
  assert all(f[:4] == ["gcloud", "storage", "cp", "-r"] for f in fetches)
  assert delete[4:6] == ["delete", "affjax-pod"] and "--quiet" in delete


def test_tpu_dry_run_single_host_local_workdir_and_no_delete():
  lines = dry_run(
    tpu_vm.cli,
    [
      "--name=v4",
      "--zone=z",
      "--accelerator_type=v4-8",
      "--config=configs/lfan.py:arousal",
      "--workdir=/home/me/run1",
      "--steps=run,fetch",
      "--project=proj",
      "--keep",
    ],
  )
  run, _, fetch = commands(lines)
  assert "--project=proj" in run
  args = main_args(shlex.split(flag(run, "--command")))
  assert args == [
    "--config=configs/lfan.py:arousal",
    "--workdir=/home/me/run1",
    "--distributed",
  ]
  assert fetch[4:6] == ["scp", "v4:/home/me/run1"]
  assert "--worker=0" in fetch and "--recurse" in fetch


def test_tpu_dry_run_parallel_one_vm_per_job(tiny_config):
  lines = dry_run(
    tpu_vm.cli, TPU_ARGS + [f"--config={tiny_config}", "--parallel", "--spot"]
  )
  cmds = commands(lines)
  created = [c[5] for c in cmds if c[4:5] == ["create"]]
  deleted = [c[5] for c in cmds if c[4:5] == ["delete"]]
  assert created == deleted == [f"affjax-pod-{i}" for i in range(6)]
  assert all("--spot" in c for c in cmds if c[4:5] == ["create"])
  runs = [
    main_args(shlex.split(_ssh_command(c)))
    for c in cmds
    if c[4:5] == ["ssh"] and "affjax.main" in _ssh_command(c)
  ]
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
    ],
  )
  runs = commands(lines)
  assert [flag(t, "CUDA_VISIBLE_DEVICES") for t in runs] == ["0,1", "2,3"] * 3
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
      while [[ "$1" == --* ]]; do shift; done
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


def test_slurm_rejects_bad_sizes(tiny_config):
  with pytest.raises(ValueError, match="at least 1"):
    dry_run(slurm.cli, [f"--config={tiny_config}", "--workdir=/w", "--nodes=0"])
