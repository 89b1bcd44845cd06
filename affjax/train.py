"""Training and checkpoint evaluation: `train_and_evaluate(config, workdir)`.

Order of a run: mesh -> data -> model and optimiser -> state
(restore the latest checkpoint or initialise, sharded from the start) ->
jitted steps -> epochs. Each epoch follows the reference trainer
(sucv/ABAW2 `base/trainer.py`):

1. `optim.begin_epoch`: at a milestone or when the lr fell below the minimum,
   reload the best weights, release one more backbone group and restart the
   optimiser (or stop when nothing is left to release);
2. one pass over the shuffled training windows (bounded in-flight steps);
3. validation: window predictions -> stitched trials -> CCC per emotion
   (`affjax.evaluate.evaluate_windows`); their mean ranks epochs;
4. `optim.end_epoch`: best record, early stopping, ReduceLROnPlateau;
5. optionally reload the best weights (the reference's
   `load_best_at_each_epoch`), then checkpoint (latest + best kept).

Checkpoints are epoch-granular: an interrupted run resumes at the start of the
epoch after the last checkpoint and, because data order depends only on
(seed, epoch) and dropout keys on the step, continues exactly as an
uninterrupted run would.
"""

import collections
import contextlib
import dataclasses
import functools
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax
import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from clu import metrics as clu_metrics
from flax import traverse_util
from jax.experimental import multihost_utils

from affjax import (
  checkpoints,
  interrupts,
  io,
  logs,
  losses,
  optim,
  profiling,
  required_weights,
  sharding,
)
from affjax import train_state as ts
from affjax.inference import windows
from affjax.train_state import Setup, TrainState

PyTree = Any
Batch = dict[str, Any]
Metrics = dict[str, float]


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output("loss")


# ----------------------------------------------------------------------------
# Steps.


def trace_once(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Wraps a function to be jitted so that a second trace raises.

  Like `chex.assert_max_traces(n=1)`, but counted per wrapped instance (chex
  counts per source location, which forbids building a second run in the
  same process, as the resume tests do). A retrace means an input changed
  shape, dtype or sharding, e.g. a learning rate written with another dtype.
  """
  traces = 0

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    nonlocal traces
    traces += 1
    if traces > 1:
      shapes = jax.tree.map(
        lambda x: (getattr(x, "shape", None), getattr(x, "dtype", None)), args
      )
      raise RuntimeError(
        f"{fn.__name__} traced a second time (it must "
        f"compile once); arguments: {shapes}"
      )
    return fn(*args, **kwargs)

  return wrapped


def make_train_step(
  setup: Setup, loop_key: jax.Array, *, released: int
) -> Callable[[TrainState, Batch], tuple[TrainState, TrainMetrics]]:
  """The (unjitted) train step at one release stage.

  Masked CCC loss, Adam, BatchNorm update. `released` (0..number of release
  groups, `PlateauState.released`) fixes which groups are frozen
  (`optim.frozen_labels`): their parameters enter the model through
  `stop_gradient`, so the step contains no backward pass for them (with the
  backbone fully frozen, none through the backbone at all), and their
  parameters and optimiser state pass through unchanged. That is what the
  all-group step computed anyway: a frozen group has learning rate 0, so its
  Adam update (L2 term included) is a zero and its parameters never moved,
  and its moments are never read before the release that opens it resets the
  whole optimiser (`ts.reset_optimizer`). The forward is unchanged: the frozen
  backbone still runs in train mode and updates its BatchNorm statistics.

  The dropout key is `fold_in(loop_key, step)`, so a resumed run draws the
  same masks as an uninterrupted one. `trace_once` turns any recompilation
  (e.g. a changed dtype in the optimiser state) into an error; each stage is
  its own function, compiled once.

  Raises:
    ValueError: if `released` is out of range.
  """
  model, tx = setup.model, setup.tx
  frozen = optim.frozen_labels(setup.plateau.num_groups, released)
  is_frozen = jax.tree.map(lambda label: label in frozen, setup.labels)

  def keep_frozen(new, old):
    return jax.tree.map(lambda f, n, o: o if f else n, is_frozen, new, old)

  @trace_once
  def train_step(state: TrainState, batch: Batch):
    dropout_key = jax.random.fold_in(loop_key, state.step)

    def loss_fn(params):
      params = jax.tree.map(
        lambda f, p: jax.lax.stop_gradient(p) if f else p, is_frozen, params
      )
      variables = dict(state.variables(), params=params)
      preds, updates = model.apply(
        variables,
        batch,
        train=True,
        rngs={"dropout": dropout_key},
        mutable=["batch_stats"],
      )
      mask = losses.training_mask(batch, setup.padding_in_loss)
      loss = losses.ccc_loss(preds, batch["label"], mask, setup.loss_weights)
      return loss, updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params
    )
    deltas, opt_state = tx.update(grads, state.opt_state, state.params)
    # Groups not yet released keep their state: XLA then drops their
    # (unused) Adam update, a pass over every parameter of those groups.
    opt_state = optim.keep_groups(opt_state, state.opt_state, frozen)
    new_state = state.replace(
      step=state.step + 1,
      params=keep_frozen(
        optax.apply_updates(state.params, deltas), state.params
      ),
      batch_stats=updates.get("batch_stats", state.batch_stats),
      opt_state=opt_state,
    )
    return new_state, TrainMetrics.single_from_model_output(loss=loss)

  return train_step


def jit_train_step(
  setup: Setup, mesh: jax.sharding.Mesh, loop_key: jax.Array, *, released: int
):
  """Jitted `make_train_step`: state replicated and donated, batch sharded."""
  return jax.jit(
    sharding.with_mesh(
      make_train_step(setup, loop_key, released=released), mesh
    ),
    in_shardings=(setup.shardings, sharding.data_sharding(mesh)),
    out_shardings=(setup.shardings, sharding.replicated(mesh)),
    donate_argnums=(0,),
  )


def jit_eval_step(setup: Setup, mesh: jax.sharding.Mesh):
  """Jitted window step: `(state, batch) -> {"preds", "trial", "frame_index"}`.

  `batch` holds the model inputs `[B, T, ...]` plus the windows' identity;
  the predictions `[B, T, outputs]` come back with that identity (see
  `affjax.inference.windows.jit_window_step`).
  """
  model = setup.model

  @trace_once
  def eval_step(state: TrainState, inputs: Batch) -> jax.Array:
    return model.apply(state.variables(), inputs, train=False)

  return windows.jit_window_step(eval_step, mesh, setup.shardings)


@dataclasses.dataclass
class Program:
  """Everything compiled for one (config, mesh): built once per process.

  Train steps are built lazily, one per distinct frozen set (release stage),
  so a run compiles at most `num_groups + 1` of them, each once; stages that
  freeze the same parameters (e.g. all of them when nothing is frozen) share
  one.
  """

  setup: Setup
  eval_step: Callable[[TrainState, Batch], dict[str, jax.Array]]
  mesh: jax.sharding.Mesh
  loop_key: jax.Array
  train_steps: dict[frozenset[str], Callable[..., Any]] = dataclasses.field(
    default_factory=dict
  )

  def train_step(
    self, released: int
  ) -> Callable[[TrainState, Batch], tuple[TrainState, TrainMetrics]]:
    """The jitted train step once `released` release groups are open."""
    used = set(jax.tree.leaves(self.setup.labels))
    frozen = optim.frozen_labels(self.setup.plateau.num_groups, released)
    key = frozenset(frozen & used)
    if key not in self.train_steps:
      self.train_steps[key] = jit_train_step(
        self.setup, self.mesh, self.loop_key, released=released
      )
    return self.train_steps[key]


_PROGRAMS: collections.OrderedDict = collections.OrderedDict()
_MAX_PROGRAMS = 4


def root_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """`(init_key, loop_key)` of a run: one root key, split once."""
  init_key, loop_key = jax.random.split(jax.random.key(seed))
  return init_key, loop_key


def build_program(
  config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
) -> Program:
  """Model, optimiser and jitted steps for `config` on `mesh`, memoised.

  Everything here is a pure function of the config and the mesh, so a second
  run in the same process (resume after a crash, evaluation after training,
  the tests) reuses the compiled executables instead of compiling again.
  """
  key = (config.to_json(), mesh)
  if key not in _PROGRAMS:
    setup = ts.build_setup(config, mesh)
    _PROGRAMS[key] = Program(
      setup=setup,
      eval_step=jit_eval_step(setup, mesh),
      mesh=mesh,
      loop_key=root_keys(config.seed)[1],
    )
    while len(_PROGRAMS) > _MAX_PROGRAMS:
      _PROGRAMS.popitem(last=False)
  return _PROGRAMS[key]


def make_predict_fn(
  eval_step,
  state: TrainState,
  mesh: jax.sharding.Mesh,
  input_keys: Iterable[str],
) -> Callable[[Batch], windows.WindowPredictions]:
  """Host function: a whole numpy eval batch -> its `WindowPredictions`.

  Every process passes the same whole batch; the global array is assembled
  from the rows each process's devices hold (any device order), and every
  process receives all predictions with their windows' identity, so
  evaluation gives the same numbers on every host.
  """
  return windows.make_window_fn(eval_step, state, mesh, input_keys)


# ----------------------------------------------------------------------------
# Epochs.


def check_finite(metrics: Metrics, first_step: int, last_step: int) -> None:
  """Raises FloatingPointError naming the metric and the step range."""
  bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
  if bad:
    raise FloatingPointError(
      f"non-finite training metrics {bad} in steps {first_step}.."
      f"{last_step}; lower config.optim.learning_rate or check the data"
    )


def check_finite_score(results: Mapping[str, Any], epoch: int) -> None:
  """Raises FloatingPointError naming the trials if validation is not finite.

  A NaN validation score must stop the run before it reaches the plateau
  logic or the checkpoint manager: nothing of this epoch is saved, so the
  latest and best checkpoints stay as they were. Non-finite predictions do
  not always show in the CCC (`affjax.metrics.ccc_from_moments` maps an
  undefined denominator, NaN included, to 0) but always in the RMSE, so
  both are checked; a trial is named when its RMSE over its labelled frames
  is not finite.

  Args:
    results: `affjax.evaluate.compute_results` of the validation split.
    epoch: the epoch being validated, for the message.
  """
  overall = results["overall"]
  rmse = {e: m["rmse"] for e, m in overall.items()}
  if np.all(np.isfinite([results["ccc_mean"], *rmse.values()])):
    return
  bad = sorted(
    name
    for name, per_emotion in results["trials"].items()
    if any(
      m["num_frames"] > 0 and not np.isfinite(m["rmse"])
      for m in per_emotion.values()
    )
  )
  raise FloatingPointError(
    f"epoch {epoch}: non-finite validation scores (ccc_mean "
    f"{results['ccc_mean']}, rmse {rmse}); trials with non-finite "
    f"predictions on labelled frames: {bad}. Check their cached features "
    "or lower config.optim.learning_rate; nothing of this epoch was "
    "checkpointed"
  )


def train_epoch(
  state: TrainState,
  train_step,
  batches: Iterable[Batch],
  *,
  max_in_flight: int,
  log_every_steps: int,
  writer: metric_writers.MetricWriter | None = None,
  hooks: Iterable[Callable[[int], None]] = (),
) -> tuple[TrainState, Metrics]:
  """Runs one pass over `batches` (device batches).

  At most `max_in_flight` steps are dispatched but unfinished: with
  cross-device collectives, unbounded async dispatch deadlocks XLA's CPU
  runtime (its collectives wait on threads that the queued steps hold).
  Metrics stay on device until log time.

  Returns:
    The new state and the epoch's mean training metrics.
  """
  in_flight = collections.deque()
  epoch_metrics = window = None
  step = first = int(state.step)
  for batch in batches:
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      state, metrics = train_step(state, batch)
    step += 1
    in_flight.append(metrics.loss.total)
    if len(in_flight) > max_in_flight:
      in_flight.popleft().block_until_ready()
    window = metrics if window is None else window.merge(metrics)
    for hook in hooks:
      hook(step)
    if log_every_steps and step % log_every_steps == 0:
      computed = {k: float(v) for k, v in window.compute().items()}
      check_finite(computed, first + 1, step)
      if writer is not None:
        writer.write_scalars(
          step, {f"train/{k}": v for k, v in computed.items()}
        )
      epoch_metrics = (
        window if epoch_metrics is None else (epoch_metrics.merge(window))
      )
      window, first = None, step
  if window is not None:
    epoch_metrics = (
      window if epoch_metrics is None else epoch_metrics.merge(window)
    )
  if epoch_metrics is None:
    raise ValueError(
      "the training split produced no batch: fewer windows "
      "than config.train.batch_size?"
    )
  computed = {k: float(v) for k, v in epoch_metrics.compute().items()}
  check_finite(computed, first + 1, step)
  return state, computed


def evaluate_split(
  eval_step,
  state: TrainState,
  mesh: jax.sharding.Mesh,
  config: ml_collections.ConfigDict,
  paths: Any,
  split: Any,
  *,
  out_dir: str | None = None,
  plots: bool = False,
) -> dict[str, Any]:
  """Predicts every window of `split`, stitches trials, scores them.

  Every process reads the whole split and feeds the same batches; each
  contributes the rows its devices hold (`affjax.inference.windows`), so the
  results are identical everywhere and equal to one process's whatever the
  mesh's device order; only process 0 writes `out_dir`.
  """
  from affjax import evaluate  # pylint: disable=g-import-not-at-top
  from affjax.data import pipeline  # pylint: disable=g-import-not-at-top

  batches = pipeline.eval_batches(
    config.data, paths, split.name, batch_size=config.train.eval_batch_size
  )
  predict = make_predict_fn(eval_step, state, mesh, ts.model_input_keys(config))
  return evaluate.evaluate_windows(
    predict,
    batches,
    split,
    config.data.emotions,
    out_dir=out_dir if jax.process_index() == 0 else None,
    plots=plots,
  )


def run_metadata(
  config: ml_collections.ConfigDict,
  train_split: Any,
  plateau: optim.PlateauState,
  step: int,
  validation: Mapping[str, Any] | None,
  preprocess_settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """JSON stored with each checkpoint (what evaluation/prediction need).

  `preprocess_settings` are the feature cache's settings (frame size, audio
  rate, VGGish variant, ...), so prediction on a new video computes the same
  features from the workdir alone.
  """
  d = config.data
  return {
    "preprocess_settings": dict(preprocess_settings or {}),
    "epoch": plateau.epoch,
    "step": step,
    "plateau": plateau.to_dict(),
    "emotions": list(d.emotions),
    "features": list(d.features),
    "window_length": d.window_length,
    "hop_length": d.hop_length,
    "crop_size": d.crop_size,
    "time_delay": d.time_delay,
    "fold": d.fold,
    "feature_stats": {
      name: {"mean": np.asarray(mean).tolist(), "std": np.asarray(std).tolist()}
      for name, (mean, std) in sorted(train_split.feature_stats.items())
    },
    "validation": _overall(validation),
  }


def cache_settings(cache_dir: str) -> dict[str, Any]:
  """The preprocessing settings recorded in a feature cache's manifest."""
  from affjax.data.preprocess import cache  # pylint: disable=g-import-not-at-top

  path = os.path.join(cache_dir, cache.MANIFEST)
  return dict(cache.read_json(path).get("settings", {}))


def _overall(results: Mapping[str, Any] | None) -> dict[str, Any] | None:
  if results is None:
    return None
  return {"ccc_mean": results["ccc_mean"], "overall": results["overall"]}


def _prepare_data(config: ml_collections.ConfigDict, workdir: str):
  """Generates/preprocesses on process 0 first, then everywhere (idempotent).

  On a shared file system the other processes then only find finished work;
  on per-host disks each host builds its own copy.
  """
  from affjax.data import prepare as prepare_lib  # pylint: disable=g-import-not-at-top

  if jax.process_index() == 0:
    paths = prepare_lib.prepare(config.data, workdir)
  multihost_utils.sync_global_devices("affjax:prepare_data")
  if jax.process_index() != 0:
    paths = prepare_lib.prepare(config.data, workdir)
  return paths


def _write_hparams(writer, config: ml_collections.ConfigDict) -> None:
  flat = traverse_util.flatten_dict(checkpoints.config_to_json(config), sep=".")
  writer.write_hparams(
    {
      k: v if isinstance(v, (bool, int, float, str)) else str(v)
      for k, v in flat.items()
    }
  )


PARAMETER_TABLE = "parameters.txt"


def _write_parameter_table(params: PyTree, workdir: str) -> None:
  """Writes the table of parameters (name, shape, size, mean, std) to a file.

  The table has one row per parameter array (60 for the demo model, hundreds
  for IR-50): in the log it would bury the epoch lines, so the log gets one
  line with the total and where the table is. Process 0 writes it.
  """
  if jax.process_index() != 0:
    return
  path = io.join(workdir, PARAMETER_TABLE)
  io.write_text(path, parameter_overview.get_parameter_overview(params) + "\n")
  logging.info(
    "Model: %s parameters (table in %s).",
    f"{parameter_overview.count_parameters(params):,}",
    path,
  )


@dataclasses.dataclass
class _Run:
  """Mutable per-run state of the epoch loop (host side)."""

  state: TrainState
  best: dict[str, PyTree]  # params + batch_stats of the best epoch
  plateau: optim.PlateauState
  best_results: dict[str, Any] | None


def _restore_or_init(
  config, setup: Setup, manager, init_key, workdir: str
) -> _Run:
  latest = manager.latest_step()
  if latest is None:
    state = ts.init_state(setup, init_key)
    if config.model.backbone_checkpoint:
      state = ts.load_backbone_checkpoint(
        state, config.model.backbone_checkpoint
      )
    if config.model.head_checkpoint:
      state = ts.load_head_checkpoint(state, config.model.head_checkpoint)
    _write_parameter_table(state.params, workdir)
    return _Run(
      state=state,
      best=ts.copy_tree(ts.weights(state)),
      plateau=optim.init_plateau(setup.plateau),
      best_results=None,
    )
  saved = checkpoints.restore(manager, latest)
  checkpoints.check_config(
    saved.config, config, manager.directory, ignore=checkpoints.RESUME_SAFE_KEYS
  )
  state = checkpoints.restore(manager, latest, setup.abstract_state).state
  best_step = manager.best_step()
  best = checkpoints.restore(manager, best_step, setup.abstract_state)
  logging.info(
    "Resumed %s at epoch %d (step %d); best epoch %d.",
    workdir,
    latest,
    int(state.step),
    best_step,
  )
  return _Run(
    state=state,
    best=ts.weights(best.state),
    plateau=optim.PlateauState.from_dict(saved.metadata["plateau"]),
    best_results=best.metadata["validation"],
  )


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str
) -> dict[str, Any]:
  """Trains (resuming if `workdir` has checkpoints) and returns a summary.

  Args:
    config: see `configs/common.py` for the schema.
    workdir: checkpoints, TensorBoard summaries and (by default) data go here.

  Returns:
    `{"best_epoch", "best_ccc", "validation" (best epoch's overall metrics),
    "epochs", "stop_reason", "step"}`.
  """
  ts.check_model_config(config)
  profile = profiling.parse_profile_steps(config.train.profile_steps)
  profiling.enable_compilation_cache(config.train.compilation_cache_dir)
  workdir = io.absolute(workdir)
  required_weights.check(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(
    config.train.batch_size, mesh, "config.train.batch_size"
  )
  sharding.check_batch_size(
    config.train.eval_batch_size, mesh, "config.train.eval_batch_size"
  )
  logging.info(
    "Mesh %s over %d devices, %d processes.",
    dict(mesh.shape),
    jax.device_count(),
    jax.process_count(),
  )
  writer = metric_writers.create_default_writer(
    workdir, just_logging=jax.process_index() > 0, asynchronous=True
  )

  from affjax.data import pipeline  # pylint: disable=g-import-not-at-top

  paths = _prepare_data(config, workdir)
  train_split = pipeline.load_split(config.data, paths, "train")
  val_split = pipeline.load_split(config.data, paths, "validation")
  for split in (train_split, val_split):
    pipeline.require_trials(split, paths, config.data.fold)
  settings = cache_settings(paths.cache_dir)
  steps_per_epoch = train_split.num_windows // config.train.batch_size
  logging.info(
    "Data: %d training trials (%d windows, %d steps of %d per epoch), %d "
    "validation trials.",
    len(train_split.trial_names),
    train_split.num_windows,
    steps_per_epoch,
    config.train.batch_size,
    len(val_split.trial_names),
  )

  program = build_program(config, mesh)
  setup = program.setup
  init_key, _ = root_keys(config.seed)
  manager = checkpoints.create_manager(workdir)
  run = _restore_or_init(config, setup, manager, init_key, workdir)
  if run.plateau.epoch == 0 and jax.process_index() == 0:
    _write_hparams(writer, config)

  eval_step = program.eval_step
  hooks = []
  if jax.process_index() == 0:
    hooks.append(
      periodic_actions.ReportProgress(
        num_train_steps=steps_per_epoch * config.train.max_epochs,
        writer=writer,
        every_secs=60,
      )
    )
  profiler = None
  if profile is not None:
    profiler = profiling.ProfileSteps(*profile, logdir=workdir)
    profiler(int(run.state.step))
    hooks.append(profiler)
  per_process = config.train.batch_size // jax.process_count()
  timer = logs.EpochTimer()
  saved = {"epochs": manager.latest_step(), "step": int(run.state.step)}

  # A crash still lets pending asynchronous checkpoint writes finish.
  try:
    while True:
      run.plateau, start = optim.begin_epoch(setup.plateau, run.plateau)
      if start.stop:
        logging.info(
          "Training stopped before epoch %d: %s.",
          run.plateau.epoch,
          run.plateau.stop_reason,
        )
        break
      timer.start()
      epoch = run.plateau.epoch
      if start.release:
        run.state = ts.reset_optimizer(
          ts.with_weights(run.state, run.best), setup
        )
      # Epoch 0's milestone reloads the initial weights: nothing to report.
      if start.release and (epoch or run.plateau.released):
        logging.info(
          "Epoch %d: best weights reloaded, %d group(s) released.",
          epoch,
          run.plateau.released,
        )
      run.state = ts.set_learning_rates(run.state, setup, run.plateau)
      batches = pipeline.train_batches(
        config.data,
        paths,
        "train",
        batch_size=per_process,
        epoch=epoch,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
      )
      run.state, train_metrics = train_epoch(
        run.state,
        # The release stage changes only here, between epochs.
        program.train_step(run.plateau.released),
        sharding.prefetch_to_device(batches, mesh, config.train.prefetch),
        max_in_flight=config.train.max_in_flight,
        log_every_steps=config.train.log_every_steps,
        writer=writer,
        hooks=hooks,
      )
      step = int(run.state.step)
      with _timed(hooks, "eval"):
        results = evaluate_split(
          eval_step, run.state, mesh, config, paths, val_split
        )
      check_finite_score(results, epoch)
      during = run.plateau  # this epoch's lr and release stage
      score = ts.selection_score(config, results)
      run.plateau, improved = optim.end_epoch(setup.plateau, run.plateau, score)
      if improved:
        run.best = ts.copy_tree(ts.weights(run.state))
        run.best_results = _overall(results)
      if config.train.load_best_at_each_epoch:
        run.state = ts.with_weights(run.state, run.best)
      # A signal during the save's blocking part is raised once it returns:
      # the save is then issued whole and `finally` waits for it.
      with interrupts.deferred():
        checkpoints.save(
          manager,
          run.plateau.epoch,
          run.state,
          config,
          run_metadata(
            config, train_split, run.plateau, step, results, settings
          ),
          score,
        )
        saved = {"epochs": run.plateau.epoch, "step": step}
        seconds = timer.stop()
        _log_epoch(
          writer,
          step,
          epoch,
          train_metrics,
          results,
          run.plateau,
          improved,
          during=during,
          num_groups=setup.plateau.num_groups,
          seconds=seconds,
          eta=timer.eta(config.train.max_epochs - run.plateau.epoch),
        )
  except interrupts.Interrupted as stop:
    manager.wait_until_finished()
    stop.report = interrupted_report(stop, workdir, saved)
    raise
  finally:
    if profiler is not None:
      profiler.close()
    manager.wait_until_finished()
    writer.flush()
  multihost_utils.sync_global_devices("affjax:train_done")
  return {
    "best_epoch": run.plateau.best_epoch,
    "best_ccc": run.plateau.best_ccc,
    "validation": run.best_results,
    "epochs": run.plateau.epoch,
    "stop_reason": run.plateau.stop_reason,
    "step": int(run.state.step),
  }


def interrupted_report(
  stop: interrupts.Interrupted, workdir: str, saved: Mapping[str, int | None]
) -> str:
  """The one line a stopped run ends with: what is saved, how to resume.

  Args:
    stop: the signal's exception.
    workdir: the run directory.
    saved: `{"epochs": epochs in the latest checkpoint (None: none yet),
      "step": its train step}`. The epoch that was running is not kept:
      checkpoints are epoch-granular.
  """
  where = checkpoints.directory(workdir)
  if saved["epochs"] is None:
    return (
      f"{stop.name}: stopped before the first checkpoint, nothing saved in "
      f"{where} (prepared data is kept). The same command starts again."
    )
  return (
    f"{stop.name}: stopped. Saved: checkpoint {saved['epochs']} (epochs "
    f"0-{saved['epochs'] - 1}, train step {saved['step']}) in {where}. The "
    f"same command resumes from epoch {saved['epochs']}."
  )


def _timed(hooks, name: str):
  """ReportProgress's timer for `name` if process 0 has one, else nothing."""
  for hook in hooks:
    if isinstance(hook, periodic_actions.ReportProgress):
      return hook.timed(name)
  return contextlib.nullcontext()


def _log_epoch(
  writer,
  step: int,
  epoch: int,
  train_metrics: Metrics,
  results: Mapping[str, Any],
  plateau: optim.PlateauState,
  improved: bool,
  *,
  during: optim.PlateauState,
  num_groups: int,
  seconds: float,
  eta: float,
) -> None:
  """Writes the epoch's scalars and logs its one line.

  The line: `epoch E step S: train loss L, validation CCC valence V arousal
  A (mean M, best), lr 3.0e-04, released R/G, 23s, ETA 6m54s`. `best` marks
  a new best epoch; lr and R/G (opened / all backbone release groups) are
  those the epoch trained with (`during`; `plateau` is the state after it);
  the ETA assumes the run goes to `config.train.max_epochs` (the plateau
  rules may stop it earlier).
  """
  from affjax import evaluate  # pylint: disable=g-import-not-at-top

  scalars = {f"train/epoch_{k}": v for k, v in train_metrics.items()}
  scalars.update(evaluate.scalars(results, prefix="validation/"))
  scalars.update(
    {
      "epoch": epoch,
      "learning_rate": plateau.learning_rate,
      "released_groups": plateau.released,
      "best_ccc": plateau.best_ccc,
      "epoch_seconds": seconds,
    }
  )
  writer.write_scalars(step, scalars)
  ccc = " ".join(f"{e} {v['ccc']:.4f}" for e, v in results["overall"].items())
  logging.info(
    "epoch %d step %d: train loss %.4f, validation CCC %s (mean %.4f%s), "
    "lr %.1e, released %d/%d, %s, ETA %s",
    epoch,
    step,
    train_metrics["loss"],
    ccc,
    results["ccc_mean"],
    ", best" if improved else "",
    during.learning_rate,
    during.released,
    num_groups,
    logs.duration(seconds),
    logs.duration(eta),
  )


def train_then_evaluate(
  config: ml_collections.ConfigDict, workdir: str
) -> tuple[dict[str, Any], dict[str, Any] | None]:
  """`--mode=train`: trains, then (if `config.eval.after_training`) scores
  the best checkpoint on `config.eval.split`, writing its files.

  Returns:
    The `train_and_evaluate` summary and the `evaluate_checkpoint` results
    (None when `after_training` is off).
  """
  summary = train_and_evaluate(config, workdir)
  if not config.eval.after_training:
    return summary, None
  return summary, evaluate_checkpoint(config, workdir)


def evaluate_checkpoint(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  split: str | None = None,
  out_dir: str | None = None,
  step: int | None = None,
) -> dict[str, Any]:
  """Restores the best (or a given) checkpoint and scores a split.

  Writes results.json, per-trial predictions and (if `config.eval.plots`)
  plots to `out_dir` (default `<workdir>/eval/<split>_<step>`).

  Returns:
    The results dict of `affjax.evaluate.compute_results` plus `"step"`
    and `"out_dir"`.
  """
  ts.check_model_config(config)
  workdir = io.absolute(workdir)
  split = split or config.eval.split
  manager = checkpoints.create_manager(workdir, read_only=True)
  step = manager.best_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {manager.directory}")
  saved = checkpoints.restore(manager, step)
  checkpoints.check_config(
    saved.config, config, manager.directory, ignore=checkpoints.EVAL_SAFE_KEYS
  )
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(
    config.train.eval_batch_size, mesh, "config.train.eval_batch_size"
  )
  program = build_program(config, mesh)
  setup = program.setup
  state = checkpoints.restore(manager, step, setup.abstract_state).state
  from affjax.data import pipeline  # pylint: disable=g-import-not-at-top

  paths = _prepare_data(config, workdir)
  data_split = pipeline.load_split(config.data, paths, split)
  pipeline.require_trials(data_split, paths, config.data.fold)
  out_dir = out_dir or io.join(workdir, "eval", f"{split}_{step}")
  results = evaluate_split(
    program.eval_step,
    state,
    mesh,
    config,
    paths,
    data_split,
    out_dir=out_dir,
    plots=config.eval.plots,
  )
  logging.info(
    "Checkpoint %d on %s: CCC %s (mean %.4f); wrote %s",
    step,
    split,
    {e: round(v["ccc"], 4) for e, v in results["overall"].items()},
    results["ccc_mean"],
    out_dir,
  )
  multihost_utils.sync_global_devices("affjax:evaluate_done")
  return dict(results, step=step, out_dir=out_dir)
