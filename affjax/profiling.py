"""Speed tools of a run: a profiler trace of chosen steps, the compile cache.

`config.train.profile_steps = "a,b"` traces the training steps after step
`a` up to step `b` (global step counts, 0 <= a < b) with `jax.profiler` into
the workdir, where TensorBoard's profile plugin finds it
(`<workdir>/plugins/profile/<time>/`). `config.train.compilation_cache_dir`
turns on JAX's persistent compilation cache, so a restarted or repeated run
loads its compiled steps instead of compiling them again (minutes for the
paper's model).
"""

from __future__ import annotations

import jax
from absl import logging


def parse_profile_steps(text: str) -> tuple[int, int] | None:
  """`"a,b"` -> `(a, b)`; `""` -> None.

  Raises:
    ValueError: not two integers with 0 <= a < b.
  """
  if not text:
    return None
  try:
    start, stop = (int(p) for p in text.split(","))
  except ValueError:
    start = stop = -1
  if not 0 <= start < stop:
    raise ValueError(
      f"config.train.profile_steps={text!r}: expected 'a,b', two step "
      "counts with 0 <= a < b (the trace covers steps a+1..b)"
    )
  return start, stop


class ProfileSteps:
  """Train-loop hook: traces steps `start+1..stop` into `logdir`.

  Called with the number of steps done (`affjax.train.train_epoch` hooks),
  and once with the starting step before the first epoch so that `start`
  may be the run's first step count.
  """

  def __init__(self, start: int, stop: int, logdir: str):
    self.start, self.stop, self.logdir = start, stop, logdir
    self.active = False

  def __call__(self, step: int) -> None:
    if step == self.start and not self.active:
      jax.profiler.start_trace(self.logdir)
      self.active = True
      logging.info("Profiling steps %d..%d.", self.start + 1, self.stop)
    elif step >= self.stop and self.active:
      # The dispatched steps must finish inside the trace.
      jax.effects_barrier()
      jax.profiler.stop_trace()
      self.active = False
      logging.info(
        "Profile of steps %d..%d in %s.", self.start + 1, step, self.logdir
      )

  def close(self) -> None:
    """Stops a trace still running (training ended before `stop`)."""
    if self.active:
      self(self.stop)


def enable_compilation_cache(cache_dir: str) -> None:
  """Persistent compilation cache in `cache_dir` ('' leaves it off).

  Every compiled step is cached, however fast it compiled, so a rerun
  compiles nothing.
  """
  if not cache_dir:
    return
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  logging.info("Persistent compilation cache: %s.", cache_dir)
