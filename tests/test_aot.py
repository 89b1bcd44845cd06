"""affjax.aot: topology names, HLO collective parsing, and real TPU compiles.

The compiles run `python -m affjax.aot` in child processes: the test session
has JAX on 8 fake CPU devices, and the TPU compiler (libtpu, the `[tpu]`
extra) is loaded only by the child. On a loaded 2-core machine the TPU
compiler needs minutes even for the demo model, so each topology compiles
only one kind of step here.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from affjax import aot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, *args],
    check=False,
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=3000,
  )


@pytest.mark.parametrize(
  "name, topology, chip_config",
  [
    ("v5e:2x2", "v5e:2x2", None),
    ("v5litepod-16", "v5e:4x4", None),
    ("v4-32", "v4:2x2x4", "megacore"),
    ("v4:2x2x2", "v4:2x2x2", "megacore"),
    ("v5p-16", "v5p:2x2x2", None),
  ],
)
def test_resolve_topology(name, topology, chip_config):
  assert aot.resolve_topology(name) == (topology, chip_config)


def test_resolve_topology_rejects_unknown_names():
  with pytest.raises(ValueError, match="v5litepod-16"):
    aot.resolve_topology("v5e-17")


def test_collectives_counts_and_sizes_from_hlo_text():
  hlo = textwrap.dedent("""
    %a = f32[512]{0:T(512)} all-reduce(%x), channel_id=1
    %b = (f32[64]{0}, bf16[2,3]{1,0}) all-reduce(%y, %z), channel_id=2
    %c = bf16[16,128]{1,0} all-gather-start(%w), dimensions={0}
    %d = bf16[16,128]{1,0} all-gather-done(%c)
    %e = f32[8]{0} fusion(%all-reduce.1), kind=kLoop
  """)
  assert aot.collectives(hlo) == {
    "all-reduce": {"count": 2, "bytes": 512 * 4 + 64 * 4 + 6 * 2},
    "all-gather": {"count": 1, "bytes": 16 * 128 * 2},
  }


def test_roofline_of_chip_table():
  v5e = aot.CHIPS["TPU v5 lite"]
  assert v5e.hbm_bytes == 16e9
  assert v5e.ridge_point == pytest.approx(197e12 / 819e9)


def test_without_libtpu_the_error_says_how_to_install(monkeypatch):
  monkeypatch.setattr(aot, "has_libtpu", lambda: False)
  with pytest.raises(RuntimeError, match=r'pip install -e "\.\[tpu\]"'):
    aot.topology_devices("v5e:2x2")


# An independent FLOP count: a [256, 1024] x [1024, 512] matmul sharded by
# rows over the 4 chips of v5e:2x2 is 2 * 64 * 1024 * 512 FLOPs per chip.
_MATMUL = """
import json, jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from affjax import aot
devices = aot.topology_devices("v5e:2x2")
mesh = jax.make_mesh((4,), ("data",), devices=devices)
x = jax.ShapeDtypeStruct((256, 1024), jnp.float32,
                         sharding=NamedSharding(mesh, P("data")))
w = jax.ShapeDtypeStruct((1024, 512), jnp.float32,
                         sharding=NamedSharding(mesh, P()))
compiled = jax.jit(jnp.dot).lower(x, w).compile()
print(json.dumps(aot.analyse(compiled, aot.chip_of(devices[0]), 4)))
"""


def test_matmul_flops_and_memory_match_a_hand_count(tmp_path):
  proc = _run(["-c", _MATMUL], tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert r["flops"] == pytest.approx(2 * 64 * 1024 * 512, rel=0.01)
  # Arguments per chip: its 64 rows of x and the whole (replicated) w.
  assert r["argument_bytes"] == 4 * (64 * 1024 + 1024 * 512)
  assert r["output_bytes"] == 4 * 64 * 512
  assert r["collectives"] == {}
  compute = r["flops"] / 197e12
  memory = r["bytes_accessed"] / 819e9
  assert r["step_seconds"] == pytest.approx(max(compute, memory))
  assert r["mfu"] == pytest.approx(compute / max(compute, memory))


def _compile_demo(tmp_path, topology, mode):
  out = tmp_path / "aot.json"
  proc = _run(
    [
      "-m",
      "affjax.aot",
      "--config=configs/demo.py",
      f"--topology={topology}",
      f"--mode={mode}",
      f"--json={out}",
    ],
    tmp_path,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout, json.loads(out.read_text())


def _check_sane(stage, chips):
  assert stage["num_chips"] == chips
  assert 0 < stage["argument_bytes"] <= stage["total_bytes"]
  assert stage["total_bytes"] < stage["hbm_bytes"]
  assert stage["flops"] > 0 and stage["bytes_accessed"] > 0
  assert stage["flops_all_chips"] == pytest.approx(chips * stage["flops"])
  assert 0 < stage["mfu"] <= 1 and stage["step_seconds"] > 0


def test_demo_train_step_compiles_for_v5e_2x2(tmp_path):
  stdout, result = _compile_demo(tmp_path, "v5e:2x2", "train")
  # The demo trains everything from the start: one train stage.
  assert list(result["stages"]) == ["train[released=0]"]
  stage = result["stages"]["train[released=0]"]
  _check_sane(stage, 4)
  # Replicated parameters, batch-sharded data: gradients and BatchNorm
  # statistics are all-reduced, nothing is gathered.
  assert set(stage["collectives"]) == {"all-reduce"}
  assert result["layout"]["device_processes"] == [0, 0, 0, 0]
  assert "train[released=0]: memory/chip" in stdout


def test_demo_eval_step_compiles_for_v5p_and_reports_processes(tmp_path):
  stdout, result = _compile_demo(tmp_path, "v5p-16", "eval")
  assert result["topology"] == "v5p-16" and result["chip"]["name"] == "v5p"
  _check_sane(result["stages"]["eval"], 8)
  # Two hosts of 4 chips; each process owns 4 of the 8 batch shards.
  layout = result["layout"]
  assert sorted(layout["device_processes"]) == [0] * 4 + [1] * 4
  shards = layout["batch_shards"]
  assert sorted(shards) == ["0", "1"]
  assert sorted(shards["0"] + shards["1"]) == list(range(8))
  # The shards each device holds are the ones its process feeds.
  devices = layout["device_processes"]
  for shard, process in enumerate(devices):
    assert shard in shards[str(process)]
  assert "device processes" in stdout
