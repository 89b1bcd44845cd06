"""Shared pieces of the launchers: jobs from a config's sweep, command running.

A *job* is one `python -m affjax.main` run: the config file with its variant
(`configs/lfan.py:arousal,fold=2`), its own workdir and `--config.key=value`
overrides. With `--sweep`, the config file's `sweep(add)` function lists the
jobs: every `add(**kwargs)` call is one job; the keyword `arg` is the config
variant (appended to the one given on the command line, comma-separated, so
later keys win in `parse_arg`), every other keyword is an override
(`add(**{"optim.learning_rate": 1e-4})` -> `--config.optim.learning_rate=
0.0001`). Job names come from the values that differ between runs
(`arousal_fold2`) and each job writes to `<workdir>/<name>`.

Every launcher prints its commands with `--dry-run` (`--dry_run`) instead of
running them: one `shlex`-quoted command per line, `#` lines are comments.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_JAX_VERSION = "0.10.2"


@dataclasses.dataclass(frozen=True)
class Job:
  """One training run.

  Attributes:
    name: short unique name, also the last component of `workdir`.
    config: `--config` value, e.g. `configs/lfan.py:valence,fold=0`.
    workdir: the run's `--workdir` (local path or gs://).
    overrides: `(key, value)` pairs passed as `--config.key=value`.
  """

  name: str
  config: str
  workdir: str
  overrides: tuple[tuple[str, str], ...] = ()

  def main_args(
    self, *, distributed: bool = False, extra: Sequence[str] = ()
  ) -> list[str]:
    """Arguments of `python -m affjax.main` for this job."""
    args = [f"--config={self.config}", f"--workdir={self.workdir}"]
    args += [f"--config.{k}={v}" for k, v in self.overrides]
    if distributed:
      args.append("--distributed")
    return args + list(extra)


def format_value(value: Any) -> str:
  """A config value as `ml_collections.config_flags` parses it back."""
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  return str(value)


def _name_part(key: str, value: Any) -> str:
  if key == "arg":
    text = str(value).replace("=", "")
  else:
    text = key.rsplit(".", 1)[-1] + format_value(value)
  return re.sub(r"[^A-Za-z0-9.-]+", "_", text.replace(",", "_")).strip("_")


def load_sweep(config_path: str) -> list[dict[str, Any]]:
  """Calls `sweep(add)` of a config file; returns the kwargs of each `add`.

  Raises:
    FileNotFoundError: if the file does not exist.
    ValueError: if it has no `sweep` function or the sweep adds nothing.
  """
  path = config_path.partition(":")[0]
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"config file {path!r} not found (from --config={config_path})"
    )
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  for folder in (REPO, root):  # configs import `configs.common`
    if folder not in sys.path:
      sys.path.insert(0, folder)
  spec = importlib.util.spec_from_file_location(
    f"_affjax_launch_config_{abs(hash(path))}", path
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  sweep = getattr(module, "sweep", None)
  if sweep is None:
    raise ValueError(
      f"config file {path!r} has no `sweep(add)` function; "
      "drop --sweep to launch one run"
    )
  runs = []
  sweep(lambda **kwargs: runs.append(kwargs))
  if not runs:
    raise ValueError(f"sweep(add) of {path!r} added no run")
  return runs


def make_jobs(
  config: str, workdir: str, *, sweep: bool = False, only: Sequence[str] = ()
) -> list[Job]:
  """The jobs of one launch: the sweep's runs, or the single given config.

  Args:
    config: `--config` value (`path[:arg]`).
    workdir: base workdir; with `sweep`, each job gets `<workdir>/<name>`.
    sweep: expand the config file's `sweep(add)`.
    only: keep only jobs with these names (empty: all).

  Raises:
    ValueError: on an unknown name in `only`.
  """
  if not sweep:
    name = os.path.basename(workdir.rstrip("/")) or "run"
    return [Job(name, config, workdir)]
  path, _, base_arg = config.partition(":")
  runs = load_sweep(config)
  # Names show only what differs between runs (not shared overrides).
  varying = [
    k
    for k in dict.fromkeys(k for r in runs for k in r)
    if len({repr(r.get(k)) for r in runs}) > 1
  ]
  jobs, seen = [], set()
  for kwargs in runs:
    arg = ",".join(a for a in (base_arg, str(kwargs.get("arg", ""))) if a)
    overrides = tuple(
      (k, format_value(v)) for k, v in kwargs.items() if k != "arg"
    )
    name = (
      "_".join(_name_part(k, kwargs[k]) for k in varying if k in kwargs)
      or "run"
    )
    unique, n = name, 1
    while unique in seen:
      unique, n = f"{name}_{n}", n + 1
    seen.add(unique)
    jobs.append(
      Job(
        unique,
        f"{path}:{arg}" if arg else path,
        f"{workdir.rstrip('/')}/{unique}",
        overrides,
      )
    )
  if only:
    unknown = sorted(set(only) - {j.name for j in jobs})
    if unknown:
      raise ValueError(
        f"--only {unknown}: no such job; the sweep has {[j.name for j in jobs]}"
      )
    jobs = [j for j in jobs if j.name in only]
  return jobs


def pinned_jax_version() -> str:
  """jax version pinned in `.ci/constraints.txt` (the one CI tests)."""
  path = os.path.join(REPO, ".ci", "constraints.txt")
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        match = re.match(r"^jax==([\w.]+)\s*$", line.strip())
        if match:
          return match.group(1)
  return DEFAULT_JAX_VERSION


def split_extra(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Splits `argv` at `--`: launcher arguments, extra `affjax.main` args."""
  argv = list(argv)
  if "--" in argv:
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]
  return argv, []


def add_option(
  parser: argparse.ArgumentParser, name: str, **kwargs: Any
) -> None:
  """Adds `--some_name` with the alias `--some-name`."""
  flags = [f"--{name}"]
  if "_" in name:
    flags.append(f"--{name.replace('_', '-')}")
  parser.add_argument(*flags, dest=name, **kwargs)


def add_common_options(
  parser: argparse.ArgumentParser, *, workdir_help: str
) -> None:
  """Options every launcher has: config, workdir, sweep, dry run."""
  add_option(
    parser,
    "config",
    required=True,
    help="config file and variant, e.g. configs/lfan.py:valence",
  )
  add_option(parser, "workdir", required=True, help=workdir_help)
  add_option(
    parser,
    "sweep",
    action="store_true",
    help="one job per run of the config file's sweep(add) (e.g. "
    "6 folds x 2 emotions), each in <workdir>/<name>",
  )
  add_option(
    parser,
    "only",
    default="",
    help="comma-separated job names to keep from the sweep",
  )
  add_option(
    parser,
    "dry_run",
    action="store_true",
    help="print the commands instead of running them",
  )


def anchor_paths(args: argparse.Namespace, run_dir: str = REPO) -> None:
  """Makes local --config/--workdir paths absolute when the jobs will run in
  `run_dir` (the repository root, where `import configs` works) but the
  launcher was started elsewhere."""
  if os.path.abspath(os.getcwd()) == os.path.abspath(run_dir):
    return
  path, sep, arg = args.config.partition(":")
  args.config = os.path.abspath(path) + sep + arg
  if not args.workdir.startswith("gs://"):
    args.workdir = os.path.abspath(args.workdir)


def jobs_from_args(args: argparse.Namespace) -> list[Job]:
  only = [n for n in args.only.split(",") if n]
  return make_jobs(args.config, args.workdir, sweep=args.sweep, only=only)


@dataclasses.dataclass(frozen=True)
class Result:
  """Outcome of one command: exit status and (if captured) its stdout."""

  returncode: int
  stdout: str = ""


class Runner:
  """Runs commands, or only prints them (dry run), one per line.

  `execute` is the one place a command is started, so tests substitute a
  subclass that records the commands and simulates their outcomes; `sleep`
  is the one place a launcher waits (polling), so tests do not wait.
  """

  def __init__(self, dry_run: bool, out: TextIO | None = None):
    self.dry_run = dry_run
    self.out = out or sys.stdout

  def comment(self, text: str) -> None:
    print(f"# {text}", file=self.out, flush=True)

  def write(self, text: str) -> None:
    """Passes text through (e.g. a streamed remote log)."""
    self.out.write(text)
    self.out.flush()

  def run(
    self,
    argv: Sequence[str],
    *,
    check: bool = True,
    capture: bool = False,
    echo: bool = True,
    **popen_kwargs: Any,
  ) -> Result:
    """Prints `argv`; unless dry, runs it.

    Args:
      argv: the command.
      check: raise `CalledProcessError` if it exits non-zero.
      capture: return its stdout (text) instead of passing it through.
      echo: print it when really running (a dry run always prints); polls
        turn this off so the log stream is not drowned in commands.
      **popen_kwargs: for `subprocess.run` (cwd, stdout, ...).

    Returns:
      The exit status and captured stdout; `Result(0)` in a dry run.
    """
    line = shlex.join(argv)
    if self.dry_run or echo:
      print(line if self.dry_run else f"+ {line}", file=self.out, flush=True)
    if self.dry_run:
      return Result(0)
    result = self.execute(list(argv), capture=capture, **popen_kwargs)
    if check and result.returncode:
      raise subprocess.CalledProcessError(result.returncode, list(argv))
    return result

  def execute(
    self, argv: list[str], *, capture: bool, **popen_kwargs: Any
  ) -> Result:
    """Starts `argv` and waits for it."""
    if capture:
      # surrogateescape: undecodable bytes (a log cut inside a UTF-8
      # character) survive and can be encoded back to the exact bytes.
      popen_kwargs.update(
        stdout=subprocess.PIPE, text=True, errors="surrogateescape"
      )
    done = subprocess.run(argv, check=False, **popen_kwargs)
    return Result(done.returncode, done.stdout if capture else "")

  def sleep(self, seconds: float) -> None:
    time.sleep(seconds)


def run_main(
  main: Callable[[argparse.Namespace, list[str], Runner], None],
  parser: argparse.ArgumentParser,
  argv: Sequence[str] | None,
  out: TextIO | None,
) -> None:
  """Parses `argv` (split at `--`) and calls the launcher's `main`."""
  own, extra = split_extra(sys.argv[1:] if argv is None else argv)
  args = parser.parse_args(own)
  main(args, extra, Runner(args.dry_run, out))
