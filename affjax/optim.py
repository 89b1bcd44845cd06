"""Optimiser, parameter groups and the reference's plateau / release schedule.

The reference (sucv/ABAW2 `base/trainer.py`, `base/parameter_control.py`)
trains with torch Adam (L2 weight decay added to the gradient), a
ReduceLROnPlateau scheduler on validation CCC, and *gradual release*: the
backbone starts frozen and, at a milestone epoch or whenever the learning rate
falls below a minimum, the best weights are reloaded, one more group of
backbone parameters becomes trainable and the optimiser and scheduler are
re-created. Training stops when nothing is left to release, after 20 epochs
without improvement, or at the epoch limit.

Here that becomes two pieces:

* `make_optimizer`: one `optax.inject_hyperparams` Adam per parameter group
  (`head`, `release_0`, `release_1`, ...) inside `optax.partition`, and
  `optax.set_to_zero()` for the `frozen` group that is never released.
  Groups not yet released run with learning rate 0, so their parameters stay
  bit-identical; releasing a group only writes its learning rate into the
  optimiser state (`set_learning_rates`), which keeps every array shape and
  dtype. The train
  step additionally takes the release stage as static (`frozen_labels`): it
  computes no gradient and no update for the frozen groups, and is compiled
  once per stage.
* `PlateauState` with `begin_epoch` / `end_epoch`: a pure, host-side state
  machine over epochs that mirrors the reference's scheduler, release and early
  stopping rules and is stored as JSON in every checkpoint.

Groups are config data, not code: `config.optim.frozen` is a regex over
'/'-joined parameter paths selecting what starts frozen, and release groups are
lists of regexes (see `release_groups`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

PyTree = Any

HEAD = "head"
FROZEN = "frozen"

# torch.optim.lr_scheduler.ReduceLROnPlateau defaults the reference relies on:
# relative threshold 1e-4 and a minimum lr change of 1e-8.
_SCHEDULER_THRESHOLD = 1e-4
_SCHEDULER_EPS = 1e-8
# The reference initialises its "best" records to -1e10 (not -inf), which also
# keeps the state JSON-serialisable.
_NO_BEST = -1e10


def release_label(index: int) -> str:
  """Name of the `index`-th release group (0 = released first)."""
  return f"release_{index}"


def path_name(path: tuple[Any, ...]) -> str:
  """'/'-joined name of a pytree key path, e.g. 'backbone/output_bn/scale'."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def release_groups(
  optim_config: ml_collections.ConfigDict, backbone_name: str
) -> list[list[str]]:
  """Release groups (lists of regexes) for a config, in release order.

  `optim_config.release_groups` names an entry of the backbone's
  `RELEASE_GROUPS` table ('auto' = the model's backbone name, '' = none), and
  `optim_config.release_prefix` is prepended to every regex so that the
  backbone-relative patterns match paths in the full model.

  Raises:
    ValueError: if the named entry does not exist.
  """
  name = optim_config.release_groups
  if not name:
    return []
  if name == "auto":
    name = backbone_name
  from affjax.models import iresnet  # pylint: disable=g-import-not-at-top

  if name not in iresnet.RELEASE_GROUPS:
    raise ValueError(
      f"config.optim.release_groups={optim_config.release_groups!r} "
      f"(resolved to {name!r}) is not one of "
      f"{sorted(iresnet.RELEASE_GROUPS)}"
    )
  prefix = optim_config.release_prefix
  return [
    [prefix + regex for regex in group]
    for group in iresnet.RELEASE_GROUPS[name]
  ]


def param_labels(
  params: PyTree, frozen: str, groups: Sequence[Sequence[str]]
) -> PyTree:
  """Labels every parameter with its group.

  Args:
    params: parameter pytree (arrays or shape structs).
    frozen: regex (`re.search` on the '/'-joined path) of the parameters that
      start frozen; '' freezes nothing.
    groups: release groups in order, each a list of regexes (`re.search`). A
      frozen parameter matching a group gets `release_<i>` of the first group
      it matches; one matching none stays `frozen` for the whole run.

  Returns:
    A pytree like `params` of label strings: `head`, `release_<i>`, `frozen`.

  Raises:
    ValueError: if a release group matches no frozen parameter (a regex that
      no longer fits the model's names would otherwise silently release
      nothing).
  """
  compiled = [[re.compile(r) for r in group] for group in groups]
  frozen_re = re.compile(frozen) if frozen else None
  used = [False] * len(groups)

  def label(path, _):
    name = path_name(path)
    if frozen_re is None or not frozen_re.search(name):
      return HEAD
    for i, group in enumerate(compiled):
      if any(r.search(name) for r in group):
        used[i] = True
        return release_label(i)
    return FROZEN

  labels = jax.tree_util.tree_map_with_path(label, params)
  for i, was_used in enumerate(used):
    if not was_used:
      raise ValueError(
        f"release group {i} {list(groups[i])} matches no parameter frozen "
        f"by config.optim.frozen={frozen!r}; example parameter names: "
        f"{_example_names(params)}"
      )
  return labels


def _example_names(params: PyTree, limit: int = 6) -> list[str]:
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return [path_name(p) for p, _ in leaves[:limit]]


def _adam_l2(
  learning_rate: float, weight_decay: float, b1: float, b2: float, eps: float
) -> optax.GradientTransformation:
  # torch.optim.Adam(weight_decay=wd) adds wd * param to the gradient *before*
  # the moment estimates (L2 regularisation, not AdamW's decoupled decay).
  return optax.chain(
    optax.add_decayed_weights(weight_decay),
    optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
    optax.scale_by_learning_rate(learning_rate),
  )


def group_names(num_groups: int) -> list[str]:
  """All partition labels for `num_groups` release groups."""
  return [HEAD] + [release_label(i) for i in range(num_groups)] + [FROZEN]


def make_optimizer(
  optim_config: ml_collections.ConfigDict, labels: PyTree, num_groups: int
) -> optax.GradientTransformation:
  """Adam + L2 weight decay, one `inject_hyperparams` copy per group.

  Every group starts with learning rate 0; `set_learning_rates` (driven by
  `PlateauState.learning_rates`) opens the trainable ones. The `frozen`
  group (never released) is `optax.set_to_zero()`: it keeps no Adam
  moments, which for a frozen IR-50 would be two copies of ~37M numbers.
  Labels without parameters are harmless: their states are empty.
  """

  def group_tx():
    return optax.inject_hyperparams(_adam_l2)(
      learning_rate=0.0,
      weight_decay=optim_config.weight_decay,
      b1=optim_config.b1,
      b2=optim_config.b2,
      eps=optim_config.eps,
    )

  transforms = {name: group_tx() for name in group_names(num_groups)}
  transforms[FROZEN] = optax.set_to_zero()
  return optax.partition(transforms, labels)


def state_group(path: tuple[Any, ...]) -> str | None:
  """The parameter group of an optimiser-state leaf, from its key path.

  `optax.partition` keeps one state per group in a dict keyed by the group
  name: the first dict key on a leaf's path (`jax.tree_util` key paths,
  public API) is its group. None for leaves outside any group.
  """
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      return str(key.key)
  return None


def keep_groups(new: PyTree, old: PyTree, groups: frozenset[str]) -> PyTree:
  """Optimiser state `new` with the leaves of `groups` taken from `old`."""
  return jax.tree_util.tree_map_with_path(
    lambda path, n, o: o if state_group(path) in groups else n, new, old
  )


def learning_rates_of(opt_state: PyTree) -> dict[str, float]:
  """Current learning rate per group (host floats), for logging and tests.

  Read with `optax.tree_utils.tree_get_all_with_path`; the `frozen` group
  (`set_to_zero`) has no learning rate and reports 0.
  """
  found = optax.tree_utils.tree_get_all_with_path(opt_state, "learning_rate")
  rates = {state_group(path): float(value) for path, value in found}
  return {**rates, FROZEN: 0.0}


def set_learning_rates(
  opt_state: PyTree, learning_rates: Mapping[str, float]
) -> PyTree:
  """Returns `opt_state` with each group's learning rate replaced.

  Uses `optax.tree_utils.tree_set`, filtered to the group's state. The new
  scalar keeps the old one's dtype and sharding, so the jitted step sees
  identical input types and does not retrace (a float64 or uncommitted
  scalar would be a new input type).

  Raises:
    ValueError: if a group name is not in the optimiser state, or the
      `frozen` group is given a learning rate other than 0.
  """
  found = optax.tree_utils.tree_get_all_with_path(opt_state, "learning_rate")
  current = {state_group(path): value for path, value in found}
  for name, lr in learning_rates.items():
    if name == FROZEN and name not in current:
      if lr != 0.0:
        raise ValueError(
          f"the {FROZEN!r} group is never trained (optax.set_to_zero); "
          f"got learning rate {lr}"
        )
      continue
    if name not in current:
      raise ValueError(
        f"unknown parameter group {name!r}; the optimiser has "
        f"{sorted([*current, FROZEN])}"
      )
    old = current[name]
    new = jnp.asarray(lr, dtype=old.dtype)
    if isinstance(old, jax.Array):
      new = jax.device_put(new, old.sharding)
    opt_state = optax.tree_utils.tree_set(
      opt_state,
      lambda path, _, name=name: state_group(path) == name,
      learning_rate=new,
    )
  return opt_state


# ----------------------------------------------------------------------------
# Host-side epoch schedule.


@dataclasses.dataclass(frozen=True)
class PlateauConfig:
  """Settings of the epoch schedule (from `config.optim` / `config.train`)."""

  learning_rate: float = 1e-5  # lr of trainable groups after each (re)start
  factor: float = 0.1  # ReduceLROnPlateau factor
  patience: int = 5  # epochs without improvement before reducing
  min_learning_rate: float = 1e-6  # lr below this triggers a release
  early_stopping: int = 20  # epochs without improvement; 0 = off
  min_num_epochs: int = 0  # early stopping counts only after this epoch
  milestones: tuple[int, ...] = (0,)  # epochs that trigger a release
  release_count: int = 3  # at most this many groups are released
  num_groups: int = 0  # release groups the model has
  max_epochs: int = 100

  @classmethod
  def from_config(
    cls, config: ml_collections.ConfigDict, num_groups: int
  ) -> PlateauConfig:
    o, t = config.optim, config.train
    return cls(
      learning_rate=o.learning_rate,
      factor=o.factor,
      patience=o.patience,
      min_learning_rate=o.min_learning_rate,
      early_stopping=t.early_stopping,
      min_num_epochs=t.min_num_epochs,
      milestones=tuple(o.milestones),
      release_count=o.release_count,
      num_groups=num_groups,
      max_epochs=t.max_epochs,
    )


@dataclasses.dataclass(frozen=True)
class PlateauState:
  """Where the schedule is; JSON-serialisable via `to_dict` / `from_dict`."""

  epoch: int = 0  # the next epoch to run (0-based)
  learning_rate: float = 0.0  # current lr of the trainable groups
  released: int = 0  # release groups opened so far
  scheduler_best: float = _NO_BEST  # ReduceLROnPlateau's best
  num_bad_epochs: int = 0  # ReduceLROnPlateau's counter
  best_ccc: float = _NO_BEST  # best validation CCC (selects checkpoints)
  best_epoch: int = -1
  early_stop_counter: int = 0  # epochs left before early stopping
  finished: bool = False
  stop_reason: str = ""

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> PlateauState:
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class EpochStart:
  """What the loop must do before running an epoch."""

  release: bool  # reload the best weights and reset the optimiser state
  stop: bool  # do not run the epoch; training is over


def init_plateau(cfg: PlateauConfig) -> PlateauState:
  return PlateauState(
    learning_rate=cfg.learning_rate, early_stop_counter=cfg.early_stopping
  )


def learning_rates(cfg: PlateauConfig, state: PlateauState) -> dict[str, float]:
  """Learning rate of every group: trainable ones share the current lr."""
  rates = {HEAD: state.learning_rate, FROZEN: 0.0}
  for i in range(cfg.num_groups):
    rates[release_label(i)] = state.learning_rate if i < state.released else 0.0
  return rates


def frozen_labels(num_groups: int, released: int) -> frozenset[str]:
  """Groups that `learning_rates` keeps at lr 0 once `released` are open.

  The train step takes this set as static: their parameters get no gradient
  (so no backward pass is traced for them) and no optimiser update.

  Raises:
    ValueError: if `released` is not in `0..num_groups`.
  """
  if not 0 <= released <= num_groups:
    raise ValueError(
      f"released={released} groups, but the model has {num_groups}"
    )
  return frozenset(
    [FROZEN] + [release_label(i) for i in range(released, num_groups)]
  )


def begin_epoch(
  cfg: PlateauConfig, state: PlateauState
) -> tuple[PlateauState, EpochStart]:
  """Start-of-epoch rule of the reference's `fit`.

  At a milestone epoch, or when the lr has fallen below `min_learning_rate`,
  one more group is released: the lr goes back to its initial value, the
  scheduler restarts, and the caller reloads the best weights and resets the
  Adam moments (the reference re-creates its optimiser). If the lr trigger
  fires with nothing left to release, training stops. A milestone with
  nothing left to release only reloads the best weights.
  """
  if state.finished:
    return state, EpochStart(release=False, stop=True)
  if state.epoch >= cfg.max_epochs:
    return (
      dataclasses.replace(state, finished=True, stop_reason="max_epochs"),
      EpochStart(release=False, stop=True),
    )
  low_lr = state.learning_rate < cfg.min_learning_rate
  if not (low_lr or state.epoch in cfg.milestones):
    return state, EpochStart(release=False, stop=False)
  if state.released < min(cfg.release_count, cfg.num_groups):
    state = dataclasses.replace(
      state,
      released=state.released + 1,
      learning_rate=cfg.learning_rate,
      scheduler_best=_NO_BEST,
      num_bad_epochs=0,
    )
    return state, EpochStart(release=True, stop=False)
  if low_lr:
    return (
      dataclasses.replace(
        state, finished=True, stop_reason="nothing_left_to_release"
      ),
      EpochStart(release=False, stop=True),
    )
  return state, EpochStart(release=True, stop=False)


def end_epoch(
  cfg: PlateauConfig, state: PlateauState, ccc: float
) -> tuple[PlateauState, bool]:
  """End-of-epoch rule: best record, early stopping, then the lr scheduler.

  Args:
    cfg: schedule settings.
    state: state before this epoch's validation result.
    ccc: validation CCC of the epoch (mean over the trained emotions).

  Returns:
    `(new_state, improved)`; `improved` means this epoch is the new best.
  """
  improved = ccc > state.best_ccc
  best_ccc, best_epoch = state.best_ccc, state.best_epoch
  if improved:
    best_ccc, best_epoch = ccc, state.epoch
  counter, finished, reason = state.early_stop_counter, False, ""
  if cfg.early_stopping and state.epoch > cfg.min_num_epochs:
    counter = cfg.early_stopping if improved else counter - 1
    if counter <= 0:
      finished, reason = True, "early_stopping"
  # ReduceLROnPlateau(mode='max', threshold_mode='rel').
  lr, sched_best, bad = state.learning_rate, state.scheduler_best, 0
  if ccc > sched_best * (1.0 + _SCHEDULER_THRESHOLD):
    sched_best = ccc
  else:
    bad = state.num_bad_epochs + 1
  if bad > cfg.patience:
    new_lr = lr * cfg.factor
    if lr - new_lr > _SCHEDULER_EPS:
      lr = new_lr
    bad = 0
  new_state = dataclasses.replace(
    state,
    epoch=state.epoch + 1,
    learning_rate=lr,
    scheduler_best=sched_best,
    num_bad_epochs=bad,
    best_ccc=best_ccc,
    best_epoch=best_epoch,
    early_stop_counter=counter,
    finished=finished,
    stop_reason=reason,
  )
  return new_state, improved
