"""The train state: everything a step updates and a checkpoint stores.

A plain pytree (no `apply_fn` / `tx` fields): the optimiser and model are
closed over by the jitted step, so the state restores with orbax's
`StandardRestore` as an ordinary tree of arrays.
"""

from __future__ import annotations

from typing import Any

import flax
import jax

PyTree = Any


@flax.struct.dataclass
class TrainState:
  step: jax.Array         # int32 scalar: optimiser steps taken so far
  params: PyTree          # trainable variables ('params' collection)
  batch_stats: PyTree     # BatchNorm running statistics ({} if none)
  opt_state: PyTree       # optax state (per-group Adam + learning rates)

  def variables(self) -> dict[str, PyTree]:
    """Variables for `model.apply`."""
    if self.batch_stats:
      return {"params": self.params, "batch_stats": self.batch_stats}
    return {"params": self.params}
