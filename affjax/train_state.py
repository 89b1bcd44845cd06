"""The train state and how a run builds it: model, optimiser, shardings.

`TrainState` is a plain pytree (no `apply_fn` / `tx` fields): the optimiser and
model are closed over by the jitted step, so the state restores with orbax's
`StandardRestore` as an ordinary tree of arrays. `build_setup` derives the
parameter groups and optimiser from abstract shapes (`jax.eval_shape`), and
`init_state` creates the state directly with its shardings, so no full copy
ever lives on one device first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.traverse_util import flatten_dict

from affjax import optim, sharding

PyTree = Any
Batch = dict[str, Any]


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimiser steps taken so far
  params: PyTree  # trainable variables ('params' collection)
  batch_stats: PyTree  # BatchNorm running statistics ({} if none)
  opt_state: PyTree  # optax state (per-group Adam + learning rates)

  def variables(self) -> dict[str, PyTree]:
    """Variables for `model.apply`."""
    if self.batch_stats:
      return {"params": self.params, "batch_stats": self.batch_stats}
    return {"params": self.params}


def model_input_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Batch keys the model reads (visual input + configured audio streams)."""
  audio = ()
  if config.model.name == "av_leader_follower":
    audio = tuple(name for name, _ in config.model.audio_features)
  return (config.model.input,) + audio


def batch_specs(
  config: ml_collections.ConfigDict, batch_size: int, *, train: bool
) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of a batch as the steps receive it (no sharding).

  The model inputs (`model_input_keys`); a training batch adds `label`
  `[B, T, E]` and `mask` `[B, T]` (see `affjax.data.pipeline`).
  """
  t, c = config.data.window_length, config.data.crop_size
  shapes = {"frames": (t, c, c, 3), "embeddings": (t, 512)}
  shapes.update({name: (t, dim) for name, dim in config.model.audio_features})
  specs = {
    k: jax.ShapeDtypeStruct((batch_size,) + shapes[k], np.float32)
    for k in model_input_keys(config)
  }
  if train:
    specs["label"] = jax.ShapeDtypeStruct(
      (batch_size, t, len(config.data.emotions)), np.float32
    )
    specs["mask"] = jax.ShapeDtypeStruct((batch_size, t), np.bool_)
  return specs


def dummy_batch(
  config: ml_collections.ConfigDict, batch_size: int = 1
) -> Batch:
  """Zero model inputs of the configured shapes (for `init`)."""
  specs = batch_specs(config, batch_size, train=False)
  return {k: np.zeros(s.shape, s.dtype) for k, s in specs.items()}


@dataclasses.dataclass
class Setup:
  """What a run builds once: model, optimiser, state layout."""

  model: Any
  tx: optax.GradientTransformation
  labels: PyTree
  plateau: optim.PlateauConfig
  init_fn: Callable[[jax.Array], TrainState]  # jitted, sharded output
  opt_init_fn: Callable[[PyTree], PyTree]  # jitted fresh optimiser state
  abstract_state: TrainState  # ShapeDtypeStructs with shardings
  shardings: TrainState  # NamedSharding per leaf
  # `config.data.padding_in_loss`, `config.train.loss_weights` (None = 1).
  padding_in_loss: bool = False
  loss_weights: tuple[float, ...] | None = None


def build_setup(
  config: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  model: Any | None = None,
) -> Setup:
  """Builds model, parameter groups and optimiser without computing anything.

  Args:
    config: the run config.
    mesh: the run's mesh (state leaves are replicated on it).
    model: a Flax module to use instead of `build_model(config.model)`
      (tests pass tiny fakes).
  """
  if model is None:
    from affjax.models import build_model  # pylint: disable=g-import-not-at-top

    model = build_model(config.model)
  batch = dummy_batch(config)

  def init_variables(key):
    return model.init({"params": key, "dropout": key}, batch, train=False)

  abstract_vars = jax.eval_shape(init_variables, jax.random.key(0))
  groups = optim.release_groups(config.optim, config.model.backbone.name)
  labels = optim.param_labels(
    abstract_vars["params"], config.optim.frozen, groups
  )
  tx = optim.make_optimizer(config.optim, labels, len(groups))

  def init_fn(key):
    variables = init_variables(key)
    params = variables["params"]
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get("batch_stats", {}),
      opt_state=tx.init(params),
    )

  abstract = jax.eval_shape(init_fn, jax.random.key(0))
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
  abstract = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    abstract,
    shardings,
  )
  return Setup(
    model=model,
    tx=tx,
    labels=labels,
    plateau=optim.PlateauConfig.from_config(config, len(groups)),
    init_fn=jax.jit(init_fn, out_shardings=shardings),
    opt_init_fn=jax.jit(tx.init, out_shardings=shardings.opt_state),
    abstract_state=abstract,
    shardings=shardings,
    padding_in_loss=bool(config.data.get("padding_in_loss", False)),
    loss_weights=loss_weights(config),
  )


def selection_score(
  config: ml_collections.ConfigDict, results: Mapping[str, Any]
) -> float:
  """The validation score that picks the best epoch and drives the plateau.

  The mean CCC over `config.data.emotions`, or with `config.train.
  select_by` set, that emotion's CCC (the reference selects by the trained
  emotion also when both heads are trained, `base/trainer.py`).
  """
  emotion = config.train.get("select_by", "")
  if not emotion:
    return float(results["ccc_mean"])
  return float(results["overall"][emotion]["ccc"])


def loss_weights(config: ml_collections.ConfigDict) -> tuple[float, ...] | None:
  """`config.train.loss_weights` checked against the emotions; None if ()."""
  weights = tuple(float(w) for w in config.train.get("loss_weights", ()))
  if not weights:
    return None
  if len(weights) != len(config.data.emotions):
    raise ValueError(
      f"config.train.loss_weights={weights} needs one weight per emotion of "
      f"config.data.emotions={tuple(config.data.emotions)}"
    )
  return weights


def init_state(setup: Setup, key: jax.Array) -> TrainState:
  """Initialises the state directly with its (replicated) shardings."""
  return setup.init_fn(key)


def load_backbone_checkpoint(state: TrainState, path: str) -> TrainState:
  """Replaces the backbone's variables by a reference PyTorch checkpoint.

  Accepts a full reference model (`spatial.*`), the pretrained
  `res50_ir_0.887.pth` layout (`backbone.*` + `logits.*`) or a bare backbone
  state dict (`affjax.convert.load_backbone_variables`).

  Raises:
    ValueError: if the converted shapes differ from the model's.
  """
  from affjax import convert  # pylint: disable=g-import-not-at-top

  loaded = convert.load_backbone_variables(path)
  params = dict(state.params)
  batch_stats = dict(state.batch_stats)
  for tree, collection in ((params, "params"), (batch_stats, "batch_stats")):
    current = tree.get("backbone")
    new = loaded[collection]
    if jax.tree.structure(current) != jax.tree.structure(new) or any(
      a.shape != b.shape
      for a, b in zip(jax.tree.leaves(current), jax.tree.leaves(new))
    ):
      raise ValueError(
        f"backbone checkpoint {path}: its {collection} do not "
        "match config.model.backbone (different architecture "
        "or input size)"
      )
    tree["backbone"] = jax.tree.map(
      lambda old, value: jax.device_put(
        np.asarray(value, old.dtype), old.sharding
      ),
      current,
      new,
    )
  return state.replace(params=params, batch_stats=batch_stats)


def load_head_checkpoint(state: TrainState, workdir: str) -> TrainState:
  """Replaces every non-backbone parameter by another run's best weights.

  The cached-embedding model (`config.model.input = 'embeddings'`) has the
  end-to-end model's parameters minus `backbone`, so its TCNs and fusion (or
  regressor) can start an end-to-end run, which then fine-tunes the backbone
  by gradual release. The backbone (random, or `backbone_checkpoint`) is
  kept.

  Args:
    state: a freshly initialised state.
    workdir: the run whose best checkpoint supplies the head.

  Raises:
    FileNotFoundError: `workdir` has no checkpoint.
    ValueError: the two heads differ; names each differing parameter.
  """
  from affjax import checkpoints  # pylint: disable=g-import-not-at-top

  manager = checkpoints.create_manager(workdir, read_only=True)
  step = manager.best_step()
  if step is None:
    raise FileNotFoundError(
      f"config.model.head_checkpoint: no checkpoint in {manager.directory}"
    )
  loaded = checkpoints.restore_params(manager, step)
  manager.close()
  current = {k: v for k, v in state.params.items() if k != "backbone"}
  loaded = {k: v for k, v in loaded.items() if k != "backbone"}
  only_saved = sorted(set(loaded) - set(current))
  only_model = sorted(set(current) - set(loaded))
  want = {k: v.shape for k, v in flatten_dict(current, sep=".").items()}
  have = {k: v.shape for k, v in flatten_dict(loaded, sep=".").items()}
  shapes = [
    f"{k}: checkpoint {have[k]}, model {want[k]}"
    for k in sorted(set(want) & set(have))
    if want[k] != have[k]
  ]
  if only_saved or only_model or shapes or want.keys() != have.keys():
    problems = []
    if only_model:
      problems.append(f"missing in the checkpoint: {only_model}")
    if only_saved:
      problems.append(f"not in this model: {only_saved}")
    problems += shapes[:10]
    raise ValueError(
      f"config.model.head_checkpoint={workdir} (step {step}) does not fit "
      f"config.model: {'; '.join(problems) or 'different parameter names'}"
    )
  head = jax.tree.map(
    lambda old, value: jax.device_put(
      np.asarray(value, old.dtype), old.sharding
    ),
    current,
    loaded,
  )
  return state.replace(params={**state.params, **head})


def copy_tree(tree: PyTree) -> PyTree:
  """Device copy (same shardings) that survives donation of the original."""
  return jax.tree.map(
    lambda x: jax.device_put(x, x.sharding, may_alias=False), tree
  )


def set_learning_rates(
  state: TrainState, setup: Setup, plateau: optim.PlateauState
) -> TrainState:
  """Writes the plateau state's per-group learning rates into the state."""
  return state.replace(
    opt_state=optim.set_learning_rates(
      state.opt_state, optim.learning_rates(setup.plateau, plateau)
    )
  )


def reset_optimizer(state: TrainState, setup: Setup) -> TrainState:
  """Fresh Adam moments and counts (the reference re-creates its optimiser).

  Same tree, shapes and dtypes as before, so the train step does not retrace.
  """
  return state.replace(opt_state=setup.opt_init_fn(state.params))


def check_model_config(config: ml_collections.ConfigDict) -> None:
  """Checks `config.model` fits `config.data` before anything is traced.

  `model.backbone.conv_chunk` is an integer >= 0, `model.num_outputs` is
  the number of `data.emotions`, and every input the model reads is in
  `data.features`; each would otherwise fail deep inside jit.

  Raises:
    ValueError: naming the config keys that disagree.
  """
  chunk = config.model.backbone.get("conv_chunk", 0)
  if not isinstance(chunk, int) or chunk < 0:
    raise ValueError(
      f"config.model.backbone.conv_chunk must be an integer >= 0 (images "
      f"per backbone convolution, 0 = the whole batch), got {chunk!r}"
    )
  if config.model.num_outputs != len(config.data.emotions):
    raise ValueError(
      f"config.model.num_outputs={config.model.num_outputs} but "
      f"config.data.emotions={tuple(config.data.emotions)} has "
      f"{len(config.data.emotions)}"
    )
  select = config.train.get("select_by", "")
  if select and select not in config.data.emotions:
    raise ValueError(
      f"config.train.select_by={select!r} is not one of "
      f"config.data.emotions={tuple(config.data.emotions)}"
    )
  loss_weights(config)
  missing = [
    k for k in model_input_keys(config) if k not in config.data.features
  ]
  if missing:
    raise ValueError(
      f"the model reads {missing}, which are not in "
      f"config.data.features={tuple(config.data.features)}"
    )


def weights(state: TrainState) -> dict[str, PyTree]:
  """The model weights: params and BatchNorm statistics."""
  return {"params": state.params, "batch_stats": state.batch_stats}


def with_weights(state: TrainState, new: Mapping[str, PyTree]) -> TrainState:
  """`state` with a copy of `new` weights (the originals stay valid)."""
  new = copy_tree(dict(new))
  return state.replace(params=new["params"], batch_stats=new["batch_stats"])
