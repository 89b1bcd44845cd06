r"""Ahead-of-time compile for a TPU slice on a CPU-only machine: will it fit?

  python -m affjax.aot --config=configs/lfan.py --topology=v5e:2x2 \
      [--mode=all|train|eval] [--json=FILE] [--config.key=value ...]

Needs the `libtpu` wheel (`pip install -e ".[tpu]"`), which compiles for a
TPU topology without any TPU attached (`jax.experimental.topologies`). The
real mesh (`config.mesh` over the slice's chips), the real train step of
every release stage and the eval step are lowered with the real shardings
and batch shapes (abstract `jax.ShapeDtypeStruct` inputs: no data, no
parameters) and compiled by the TPU compiler. One line per stage reports, per
chip:

* memory: arguments, temporaries and their total (arguments + outputs -
  donated aliases + temporaries + code) against the chip's HBM;
* FLOPs and HBM bytes of one step (XLA's cost analysis of the per-chip
  program) and their ratio, the arithmetic intensity, against the chip's
  ridge point (peak FLOP/s / HBM bandwidth): below it a step is memory-bound;
* the collectives in the optimised HLO (count and bytes per kind);
* a roofline step time `max(FLOPs / peak, bytes / bandwidth)` and the MFU it
  implies (compute time / step time). This is an optimistic bound: it ignores
  collectives, host input, launch overheads and imperfect overlap.

These are compile-time estimates, not measurements.

Topologies are the names `jax.experimental.topologies` takes (`v5e:2x2`,
`v5e:4x4`, `v6e:2x2`, `v4:2x2x4`, `v5p:2x2x2`, ...) or Cloud TPU accelerator
types (`ALIASES`: `v5litepod-16` = `v5e:4x4`, `v4-32` = `v4:2x2x4` (16 chips;
v4 and v5p names count TensorCores, two per chip), `v5p-16` = `v5p:2x2x2`).
v4 is compiled in its megacore configuration (one device per chip), as JAX
uses it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from absl import app, flags

from affjax.config_flag import parse_flags

FLAGS = flags.FLAGS

flags.DEFINE_string(
  "topology",
  None,
  "TPU slice: 'v5e:2x2', 'v5p:2x2x2', 'v4:2x2x4', ... or an alias such as "
  "'v5litepod-16', 'v4-32'.",
)
flags.DEFINE_enum(
  "mode", "all", ("all", "train", "eval"), "Which steps to compile."
)
flags.DEFINE_string("json", None, "Also write the results to this JSON file.")

INSTALL_HINT = (
  "compiling for a TPU topology needs the libtpu wheel: "
  'pip install -e ".[tpu]" (or pip install "jax[tpu]==<the installed jax>")'
)


@dataclasses.dataclass(frozen=True)
class Chip:
  """Public per-chip figures of a TPU generation.

  `peak_flops` is the bf16 matrix-unit peak. It is also the float32 figure
  used here: JAX's default matmul/convolution precision on TPU feeds float32
  operands to the matrix units as one bfloat16 pass, so a float32 model runs
  at the bf16 rate (Google publishes no separate float32 peak); float32 costs
  memory and bandwidth instead, which the roofline sees in the bytes.
  """

  name: str
  hbm_bytes: float
  peak_flops: float  # FLOP/s, bf16 (see above)
  hbm_bandwidth: float  # bytes/s
  source: str

  @property
  def ridge_point(self) -> float:
    """FLOPs per HBM byte above which a step is compute-bound."""
    return self.peak_flops / self.hbm_bandwidth


# Keyed by `device.device_kind`. Figures from the Cloud TPU system
# architecture pages (per chip; GB = 1e9 bytes as published).
CHIPS = {
  "TPU v4": Chip(
    "v4", 32e9, 275e12, 1200e9, "https://cloud.google.com/tpu/docs/v4"
  ),
  "TPU v5 lite": Chip(
    "v5e", 16e9, 197e12, 819e9, "https://cloud.google.com/tpu/docs/v5e"
  ),
  "TPU v5": Chip(
    "v5p", 95e9, 459e12, 2765e9, "https://cloud.google.com/tpu/docs/v5p"
  ),
  "TPU v6 lite": Chip(
    "v6e", 32e9, 918e12, 1640e9, "https://cloud.google.com/tpu/docs/v6e"
  ),
}

# Cloud TPU accelerator types -> topology names. v5e/v6e count chips; v4 and
# v5p count TensorCores (two per chip).
ALIASES = {
  **{
    f"{prefix}-{n}": f"{gen}:{shape}"
    for prefix, gen in (("v5litepod", "v5e"), ("v6e", "v6e"))
    for n, shape in (
      (1, "1x1"),
      (4, "2x2"),
      (8, "2x4"),
      (16, "4x4"),
      (32, "4x8"),
      (64, "8x8"),
      (128, "8x16"),
      (256, "16x16"),
    )
  },
  **{
    f"{gen}-{cores}": f"{gen}:{shape}"
    for gen in ("v4", "v5p")
    for cores, shape in (
      (8, "2x2x1"),
      (16, "2x2x2"),
      (32, "2x2x4"),
      (64, "2x4x4"),
      (128, "4x4x4"),
    )
  },
}

COLLECTIVES = (
  "all-reduce",
  "all-gather",
  "reduce-scatter",
  "all-to-all",
  "collective-permute",
)
# `%name = <shape> <op>(` or `<op>-start(`; the shape may be a tuple.
_COLLECTIVE = re.compile(
  r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\("
)
_ARRAY = re.compile(
  r"\b(pred|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|f64)\[([\d,]*)\]"
)
_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "f64": 8,
}


def resolve_topology(name: str) -> tuple[str, str | None]:
  """`(topology name, chip config)` for `get_topology_desc`.

  Raises:
    ValueError: a name that is neither `<gen>:<shape>` nor an alias.
  """
  topology = ALIASES.get(name, name)
  if not re.fullmatch(r"v\d+[a-z]*:\d+(x\d+)*", topology):
    raise ValueError(
      f"--topology={name!r}: expected '<generation>:<shape>' such as "
      f"'v5e:2x2' or 'v5p:2x2x2', or one of {sorted(ALIASES)}"
    )
  # v4 chips hold two TensorCores; JAX drives them as one device each.
  return topology, "megacore" if topology.startswith("v4:") else None


def has_libtpu() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def topology_devices(name: str) -> list[Any]:
  """The compile-only devices of a TPU topology (needs libtpu).

  Raises:
    RuntimeError: libtpu is not installed (with the install command).
  """
  if not has_libtpu():
    raise RuntimeError(INSTALL_HINT)
  # Other processes on this machine (tests, other runs) may have loaded
  # libtpu too; without TPU chips nothing is shared, so its lock file only
  # gets in the way.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  topology, chip_config = resolve_topology(name)
  kwargs = {"chip_config_name": chip_config} if chip_config else {}
  desc = topologies.get_topology_desc(
    platform="tpu", topology_name=topology, **kwargs
  )
  return list(desc.devices)


def chip_of(device: Any) -> Chip:
  try:
    return CHIPS[device.device_kind]
  except KeyError:
    raise ValueError(
      f"no public figures for device kind {device.device_kind!r}; "
      f"known: {sorted(CHIPS)} (affjax/aot.py CHIPS)"
    ) from None


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string, e.g. `(f32[64]{0}, bf16[2,3]{1,0})`."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """`{kind: {"count", "bytes"}}` of the collectives in optimised HLO text.

  Bytes are each collective's result size per chip (an all-gather's gathered
  array, an all-reduce's reduced one); `-start`/`-done` pairs count once.
  """
  found: dict[str, dict[str, int]] = {}
  for shape, kind in _COLLECTIVE.findall(hlo_text):
    entry = found.setdefault(kind, {"count": 0, "bytes": 0})
    entry["count"] += 1
    entry["bytes"] += shape_bytes(shape)
  return found


def analyse(compiled: Any, chip: Chip, num_chips: int) -> dict[str, Any]:
  """Per-chip memory, cost, collectives and roofline of a compiled step."""
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
    cost = cost[0]
  total = (
    mem.argument_size_in_bytes
    + mem.output_size_in_bytes
    - mem.alias_size_in_bytes
    + mem.temp_size_in_bytes
    + mem.generated_code_size_in_bytes
  )
  flops = float(cost.get("flops", 0.0))
  accessed = float(cost.get("bytes accessed", 0.0))
  compute_s = flops / chip.peak_flops
  memory_s = accessed / chip.hbm_bandwidth
  step_s = max(compute_s, memory_s)
  return {
    "chip": chip.name,
    "num_chips": num_chips,
    "argument_bytes": int(mem.argument_size_in_bytes),
    "output_bytes": int(mem.output_size_in_bytes),
    "alias_bytes": int(mem.alias_size_in_bytes),
    "temp_bytes": int(mem.temp_size_in_bytes),
    "code_bytes": int(mem.generated_code_size_in_bytes),
    "total_bytes": int(total),
    "hbm_bytes": chip.hbm_bytes,
    "hbm_fraction": total / chip.hbm_bytes,
    "flops": flops,
    "flops_all_chips": flops * num_chips,
    "bytes_accessed": accessed,
    "intensity": flops / accessed if accessed else float("inf"),
    "ridge_point": chip.ridge_point,
    "bound": "compute" if compute_s >= memory_s else "memory",
    "collectives": collectives(compiled.as_text()),
    "step_seconds": step_s,
    "mfu": compute_s / step_s if step_s else 0.0,
  }


def _gb(n: float) -> str:
  return f"{n / 1e9:.2f}"


def format_line(stage: str, r: dict[str, Any]) -> str:
  """One human-readable line per compiled stage."""
  coll = (
    ", ".join(
      f"{k} x{v['count']} {v['bytes'] / 1e6:.1f} MB"
      for k, v in sorted(r["collectives"].items())
    )
    or "none"
  )
  return (
    f"{stage}: memory/chip args {_gb(r['argument_bytes'])} + temp "
    f"{_gb(r['temp_bytes'])} -> total {_gb(r['total_bytes'])} GB of "
    f"{_gb(r['hbm_bytes'])} ({100 * r['hbm_fraction']:.0f}%); "
    f"{r['flops'] / 1e9:.1f} GFLOP/chip ({r['flops_all_chips'] / 1e12:.3f} "
    f"TFLOP/step), {_gb(r['bytes_accessed'])} GB accessed, "
    f"intensity {r['intensity']:.0f} FLOP/B vs ridge "
    f"{r['ridge_point']:.0f} ({r['bound']}-bound); collectives: {coll}; "
    f"roofline step {1e3 * r['step_seconds']:.1f} ms, MFU <= "
    f"{100 * r['mfu']:.0f}%"
  )


def process_layout(mesh: Any) -> dict[str, Any]:
  """Which process owns each mesh device and which batch shards it feeds.

  `batch_shards[p]` lists the shards (in batch order; one row each for a
  batch of one row per chip) that process `p` feeds under the data
  sharding (`affjax.sharding.process_rows`): not one block when the
  topology interleaves hosts along the mesh.
  """
  from affjax import sharding  # pylint: disable=g-import-not-at-top

  devices = list(mesh.devices.flat)
  processes = sorted({d.process_index for d in devices})
  return {
    "mesh_shape": dict(mesh.shape),
    "device_processes": [d.process_index for d in devices],
    "batch_shards": {
      p: sharding.process_rows(
        sharding.num_batch_shards(mesh), mesh, p
      ).tolist()
      for p in processes
    },
  }


def stages(program: Any, mode: str) -> Iterator[tuple[str, Any, bool]]:
  """`(name, jitted step, is_train)` of every distinct step to compile.

  Release stages that freeze the same parameters share one step (as in
  `affjax.train.Program.train_step`); the name gives the first such stage.
  """
  if mode in ("all", "train"):
    seen = set()
    for released in range(program.setup.plateau.num_groups + 1):
      step = program.train_step(released)
      if id(step) not in seen:
        seen.add(id(step))
        yield f"train[released={released}]", step, True
  if mode in ("all", "eval"):
    yield "eval", program.eval_step, False


def compile_config(
  config: Any, topology: str, mode: str = "all", log=print
) -> dict[str, Any]:
  """Compiles every stage of `config` for `topology`; returns the results.

  Args:
    config: a run config (`configs/*.py`).
    topology: see `resolve_topology`.
    mode: 'all', 'train' or 'eval'.
    log: called with each stage's line as soon as it is compiled.

  Returns:
    `{"topology", "chip", "layout", "stages": {name: analyse(...)}}`.
  """
  import jax  # pylint: disable=g-import-not-at-top

  from affjax import sharding, train  # pylint: disable=g-import-not-at-top
  from affjax import train_state as ts  # pylint: disable=g-import-not-at-top

  ts.check_model_config(config)
  devices = topology_devices(topology)
  chip = chip_of(devices[0])
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  for key in ("batch_size", "eval_batch_size"):
    size = config.train[key]
    if size % sharding.num_batch_shards(mesh):
      raise ValueError(
        f"config.train.{key}={size} must be divisible by the "
        f"{sharding.num_batch_shards(mesh)} chips of {topology}"
      )
  program = train.build_program(config, mesh)
  data = sharding.data_sharding(mesh)
  results = {
    "topology": topology,
    "chip": dataclasses.asdict(chip),
    "layout": process_layout(mesh),
    "stages": {},
  }
  log(
    f"{topology}: {len(devices)} x {chip.name} chips, mesh "
    f"{results['layout']['mesh_shape']}, device processes "
    f"{results['layout']['device_processes']}"
  )
  for name, step, is_train in stages(program, mode):
    size = config.train.batch_size if is_train else config.train.eval_batch_size
    batch = {
      k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=data)
      for k, s in ts.batch_specs(config, size, train=is_train).items()
    }
    if not is_train:
      # The eval step carries each window's identity through the devices.
      t = config.data.window_length
      batch["trial"] = jax.ShapeDtypeStruct((size,), "int32", sharding=data)
      batch["frame_index"] = jax.ShapeDtypeStruct(
        (size, t), "int32", sharding=data
      )
    compiled = step.lower(program.setup.abstract_state, batch).compile()
    result = analyse(compiled, chip, len(devices))
    results["stages"][name] = result
    log(format_line(name, result))
  return results


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.config is None or FLAGS.topology is None:
    raise app.UsageError("needs --config and --topology")
  if not has_libtpu():
    sys.exit(f"affjax.aot: {INSTALL_HINT}")
  if not os.environ.get("JAX_PLATFORMS"):
    import jax  # pylint: disable=g-import-not-at-top

    # Only the compile-only TPU devices are used: keep the default backend
    # on the CPU instead of probing for TPU chips that are not there.
    jax.config.update("jax_platforms", "cpu")
  try:
    resolve_topology(FLAGS.topology)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  results = compile_config(FLAGS.config, FLAGS.topology, FLAGS.mode)
  if FLAGS.json:
    from affjax import io  # pylint: disable=g-import-not-at-top

    io.write_json(FLAGS.json, results)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
