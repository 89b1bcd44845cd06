"""orbax checkpoints: latest + best kept, config and run metadata beside them.

Layout: `<workdir>/checkpoints/<step>/{state,config,metadata}` where `step` is
the number of finished epochs. Each checkpoint holds

* `state`: the train state (params, batch stats, optimiser state, step),
* `config`: the run's config as JSON (checked on resume / evaluation),
* `metadata`: JSON the evaluator and the predictor need without the data
  pipeline: the per-feature normalisation statistics of the fold's training
  split, feature and window settings, emotions, the plateau / release state and
  the validation metrics of that epoch.

Retention uses a preservation policy (latest 1 + best 1 by mean validation
CCC): `max_to_keep` with `best_fn` alone can delete the newest checkpoint and
break resuming.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from orbax.checkpoint import checkpoint_managers

from affjax import io

PyTree = Any

BEST_METRIC = "ccc_mean"


# The one table of which config keys each use of a checkpoint reads: resume
# (train.py), evaluate (train.py) and predict (predict.py).
# Config keys allowed to differ from the checkpoint's when resuming: they
# change where data lives, how often things are logged, or how far training
# may go, not what an epoch computes.
RESUME_SAFE_KEYS = (
  "data.raw_dir",
  "data.cache_dir",
  "data.tfds_dir",
  "data.memory_cache_gb",
  "train.log_every_steps",
  "train.max_in_flight",
  "train.prefetch",
  "train.profile_steps",
  "train.compilation_cache_dir",
  "train.eval_batch_size",
  "train.max_epochs",
  "eval",
  "mesh",
  # A speed setting with the same results (affjax.models.iresnet.conv2d).
  "model.backbone.conv_chunk",
  # Preprocessing parallelism, and guards that only stop a run at its start.
  "data.preprocess.num_workers",
  "data.allow_random_vggish",
  "model.allow_random_backbone",
)
# For evaluating a checkpoint only the model, the data layout and the state's
# tree structure matter; the optimiser's parameter groups (frozen and release
# regexes) shape the saved optimiser state, its scalars do not.
EVAL_SAFE_KEYS = RESUME_SAFE_KEYS + (
  "train",
  "seed",
  "data.synthetic",
  # Activation dtype only: the checkpoint's tree and dtypes are the same.
  "model.dtype",
  "model.backbone_checkpoint",
  "model.head_checkpoint",
  *(
    f"optim.{k}"
    for k in (
      "learning_rate",
      "weight_decay",
      "b1",
      "b2",
      "eps",
      "factor",
      "patience",
      "min_learning_rate",
      "milestones",
      "release_count",
    )
  ),
)
# What `--mode=predict` compares when given a --config: the keys that change
# what the model computes from a video (minus EVAL_SAFE_KEYS).
MODEL_KEYS = (
  "model",
  "data.emotions",
  "data.features",
  "data.window_length",
  "data.hop_length",
  "data.crop_size",
  "data.time_delay",
)


def directory(workdir: str) -> str:
  """Where a run keeps its checkpoints."""
  return io.join(io.absolute(workdir), "checkpoints")


def _best_metric(metrics: Mapping[str, float]) -> float:
  """The ranking score of a checkpoint; non-finite scores rank lowest.

  orbax sorts by this value, and NaN compares false with everything, so an
  unguarded NaN can sort above the real best and have it deleted.
  """
  value = float(metrics[BEST_METRIC])
  return value if math.isfinite(value) else -math.inf


def create_manager(
  workdir: str, *, read_only: bool = False
) -> ocp.CheckpointManager:
  """Opens (or creates) `<workdir>/checkpoints`.

  Args:
    workdir: the run's working directory.
    read_only: for evaluation and prediction: never writes or deletes.

  Raises:
    FileNotFoundError: when `read_only` and the directory does not exist.
  """
  path = directory(workdir)
  if read_only and not io.isdir(path):
    raise FileNotFoundError(
      f"no checkpoint directory {path}; train first with --workdir={workdir}"
    )
  policy = checkpoint_managers.AnyPreservationPolicy(
    [
      checkpoint_managers.LatestN(n=1),
      # BestN keeps the *last* n after sorting ascending (reverse=False), i.e.
      # the highest CCC.
      checkpoint_managers.BestN(get_metric_fn=_best_metric, reverse=False, n=1),
    ]
  )
  options = ocp.CheckpointManagerOptions(
    best_fn=_best_metric,
    best_mode="max",
    preservation_policy=policy,
    # orbax warns that it sets this to 0 itself for a read-only manager.
    save_interval_steps=0 if read_only else 1,
    read_only=read_only,
    create=not read_only,
  )
  return ocp.CheckpointManager(path, options=options)


def config_to_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as plain JSON data (tuples become lists)."""
  return json.loads(config.to_json())


def save(
  manager: ocp.CheckpointManager,
  step: int,
  state: PyTree,
  config: ml_collections.ConfigDict,
  metadata: Mapping[str, Any],
  ccc_mean: float,
) -> None:
  """Saves asynchronously; call `manager.wait_until_finished()` before exit.

  Args:
    manager: from `create_manager`.
    step: number of finished epochs.
    state: train state (a pytree of jax.Arrays).
    config: the run's config.
    metadata: JSON-serialisable run metadata (see module docstring).
    ccc_mean: the epoch's mean validation CCC, ranks checkpoints for "best"
      (a non-finite value ranks below every finite one).
  """
  manager.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      config=ocp.args.JsonSave(config_to_json(config)),
      metadata=ocp.args.JsonSave(_jsonable(metadata)),
    ),
    metrics={BEST_METRIC: float(ccc_mean)},
  )


def _jsonable(tree: Any) -> Any:
  # Fail here, naming the problem, rather than inside orbax's writer thread.
  return json.loads(json.dumps(tree, default=_to_list))


def _to_list(x: Any) -> Any:
  if hasattr(x, "tolist"):
    return x.tolist()
  raise TypeError(
    f"checkpoint metadata value of type {type(x).__name__} is "
    "not JSON-serialisable"
  )


@dataclasses.dataclass
class Restored:
  state: PyTree | None
  config: dict[str, Any]
  metadata: dict[str, Any]


def _check_step(manager: ocp.CheckpointManager, step: int) -> None:
  if step not in manager.all_steps():
    raise FileNotFoundError(
      f"checkpoint step {step} not in {manager.directory}; available: "
      f"{sorted(manager.all_steps())}"
    )


def restore(
  manager: ocp.CheckpointManager,
  step: int,
  abstract_state: PyTree | None = None,
) -> Restored:
  """Restores checkpoint `step`.

  Args:
    manager: from `create_manager`.
    step: which checkpoint (`manager.latest_step()` or `manager.best_step()`).
    abstract_state: pytree of `jax.ShapeDtypeStruct`s with shardings; the state
      is restored onto those shardings. None restores only config + metadata.

  Raises:
    FileNotFoundError: if the checkpoint does not exist.
  """
  _check_step(manager, step)
  items = {"config": ocp.args.JsonRestore(), "metadata": ocp.args.JsonRestore()}
  if abstract_state is not None:
    items["state"] = ocp.args.StandardRestore(abstract_state)
  out = manager.restore(step, args=ocp.args.Composite(**items))
  return Restored(
    state=out.get("state") if abstract_state is not None else None,
    config=out["config"],
    metadata=out["metadata"],
  )


def restore_params(manager: ocp.CheckpointManager, step: int) -> PyTree:
  """The `params` of checkpoint `step` as saved (host numpy arrays).

  Needs no abstract state, so it reads checkpoints of runs with another model
  (e.g. the cached-embedding head for an end-to-end run). The target is
  built from the saved shapes and dtypes, on this process's first device:
  the saved arrays' own shardings name devices of the topology that wrote
  them (e.g. 4 devices), which need not exist here.

  Raises:
    FileNotFoundError: if the checkpoint does not exist.
  """
  _check_step(manager, step)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  saved = ocp.StandardCheckpointer().metadata(
    manager.directory / str(step) / "state"
  )
  target = jax.tree.map(
    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
    saved.item_metadata.tree,
  )
  out = manager.restore(
    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
  )
  return jax.tree.map(np.asarray, out["state"]["params"])


def _dotted(config_json: Mapping[str, Any]) -> dict[str, Any]:
  """`{'a': {'b': 1}}` -> `{'a.b': 1}`; empty groups hold no key."""
  return traverse_util.flatten_dict(dict(config_json), sep=".")


def config_differences(
  saved: Mapping[str, Any],
  current: ml_collections.ConfigDict,
  ignore: Sequence[str] = (),
  only: Sequence[str] = (),
) -> list[str]:
  """Dotted keys whose values differ between a saved and the current config.

  Keys equal to or under an `ignore` entry (e.g. 'data.cache_dir' or 'eval')
  are skipped: they change where or how often things happen, not what is
  computed. With `only`, just the keys equal to or under its entries count.
  """
  a, b = _dotted(saved), _dotted(config_to_json(current))

  def under(key, prefixes):
    return any(key == p or key.startswith(p + ".") for p in prefixes)

  return sorted(
    k
    for k in set(a) | set(b)
    if not under(k, ignore)
    and (not only or under(k, only))
    and a.get(k, "<missing>") != b.get(k, "<missing>")
  )


def check_config(
  saved: Mapping[str, Any],
  current: ml_collections.ConfigDict,
  where: str,
  ignore: Sequence[str] = (),
  *,
  only: Sequence[str] = (),
  advice: str = "Use the same config (and overrides) or a new --workdir.",
) -> None:
  """Raises ValueError naming every key that differs (see config_differences).

  Args:
    saved: config JSON restored from a checkpoint.
    current: the config of this invocation.
    where: the checkpoint directory, for the message.
    ignore: key prefixes allowed to differ (e.g. `RESUME_SAFE_KEYS`).
    only: if given, the key prefixes compared (e.g. `MODEL_KEYS`).
    advice: the last sentence of the message: what to do.
  """
  diffs = config_differences(saved, current, ignore, only)
  if diffs:
    a, b = _dotted(saved), _dotted(config_to_json(current))
    lines = "; ".join(
      f"{k}: checkpoint {a.get(k, '<missing>')!r}, given "
      f"{b.get(k, '<missing>')!r}"
      for k in diffs
    )
    raise ValueError(
      f"the checkpoint in {where} was written with a different config "
      f"({len(diffs)} keys differ): {lines}. {advice}"
    )
