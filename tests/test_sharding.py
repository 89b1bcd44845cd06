"""Tests for affjax.sharding on the 8 fake CPU devices of conftest.py."""

import jax
import numpy as np
import pytest

from affjax import sharding


def test_make_mesh_fills_minus_one_with_auto_axes():
  mesh = sharding.make_mesh([("data", -1)])
  assert mesh.shape == {"data": 8}
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
  mesh = sharding.make_mesh([("data", -1), ("model", 2)])
  assert mesh.shape == {"data": 4, "model": 2}
  mesh = sharding.make_mesh([("data", -1)], devices=jax.devices()[:1])
  assert mesh.shape == {"data": 1}


@pytest.mark.parametrize(
  "axes,match",
  [
    ([("data", 3)], "multiply to 3, expected 8 devices"),
    ([("data", -1), ("model", 3)], "not divisible by 3"),
    ([("data", -1), ("model", -1)], "at most one axis"),
  ],
)
def test_make_mesh_errors(axes, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(axes)


def test_global_batch_and_prefetch_keep_values_and_order():
  mesh = sharding.make_mesh([("data", -1)])
  rng = np.random.default_rng(0)
  batches = [
    {
      "x": rng.normal(size=(16, 3, 2)).astype(np.float32),
      "trial": np.arange(16, dtype=np.int32) + 100 * i,
    }
    for i in range(5)
  ]
  out = list(sharding.prefetch_to_device(iter(batches), mesh, size=2))
  assert len(out) == 5
  for got, want in zip(out, batches):
    assert got["x"].sharding == sharding.data_sharding(mesh)
    # Two rows of the 16 on each of the 8 devices.
    assert got["x"].addressable_shards[0].data.shape == (2, 3, 2)
    np.testing.assert_array_equal(sharding.to_host(got["x"]), want["x"])
    np.testing.assert_array_equal(np.asarray(got["trial"]), want["trial"])
  assert sharding.local_rows(16) == slice(0, 16)
  np.testing.assert_array_equal(sharding.process_rows(16, mesh), np.arange(16))


def test_prefetch_is_lazy_and_bounded():
  mesh = sharding.make_mesh([("data", -1)], devices=jax.devices()[:1])
  pulled = []

  def source():
    for i in range(10):
      pulled.append(i)
      yield {"x": np.full((2,), i, np.float32)}

  it = sharding.prefetch_to_device(source(), mesh, size=3)
  first = next(it)
  assert float(first["x"][0]) == 0
  # The batch handed out plus 2 ahead: 3 pulled, not the whole source.
  assert len(pulled) == 3
  assert [float(b["x"][0]) for b in it] == list(range(1, 10))


def test_check_batch_size():
  mesh = sharding.make_mesh([("data", -1)])
  sharding.check_batch_size(16, mesh, "config.batch_size")
  with pytest.raises(
    ValueError, match="config.batch_size=12 must be divisible by 8"
  ):
    sharding.check_batch_size(12, mesh, "config.batch_size")
