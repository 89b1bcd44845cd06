"""Shared pieces of the benchmarks: timing, machine rates, twin models.

The benchmarks compare affjax with the PyTorch transcription of the reference
(`tests/torch_reference/`) on the same weights: the PyTorch model is built and
randomised, and affjax's converter (`affjax.convert`) turns its state dict
into Flax variables, so both sides compute the same function (checked by
`max_abs_diff` in the outputs).

Timing: every case is warmed up once, then the cases run in alternation
(A B B A A B ...) so that the load of this shared machine drifts over all of
them alike; medians are reported. Nothing here asserts a time.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

AUDIO = (("vggish", 128), ("mfcc", 39))
FACE = 40


def load_average() -> str:
  one, five, fifteen = os.getloadavg()
  return f"{one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def set_torch_threads() -> None:
  import torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(os.cpu_count() or 1)


@dataclasses.dataclass
class Case:
  """One timed computation; `run()` does one step and waits for it."""

  name: str
  run: Callable[[], Any]
  times: list[float] = dataclasses.field(default_factory=list)

  @property
  def median(self) -> float:
    return statistics.median(self.times) if self.times else float("nan")


def alternate(cases: Sequence[Case], repeats: int, warmup: int = 1) -> None:
  """Warms each case up, then times `repeats` rounds in alternating order."""
  for case in cases:
    for _ in range(warmup):
      case.run()
  for r in range(repeats):
    for case in cases if r % 2 == 0 else reversed(cases):
      start = time.perf_counter()
      case.run()
      case.times.append(time.perf_counter() - start)


def block(tree: Any) -> Any:
  return jax.block_until_ready(tree)


def xla_flops(compiled: Any) -> float:
  """FLOPs of a compiled XLA executable (multiply-add = 2), cost analysis."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


def _best_time(fn: Callable[[], Any], repeats: int) -> float:
  fn()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def machine_rates(repeats: int = 5) -> dict[str, float]:
  """Measured float32 GFLOP/s of big matmuls and IR-50-like convolutions.

  XLA (jnp.dot, lax.conv NHWC) and PyTorch (oneDNN, NCHW), all threads.
  Best of `repeats`: the rate the hardware can reach between other users'
  bursts, which is what a floor should use.
  """
  import torch  # pylint: disable=g-import-not-at-top

  rates = {}
  n = 2048
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
  dot = jax.jit(jnp.dot)
  t = _best_time(lambda: block(dot(a, a)), repeats)
  rates["xla_matmul"] = 2 * n**3 / t / 1e9
  ta = torch.from_numpy(np.array(a))
  t = _best_time(lambda: ta @ ta, repeats)
  rates["torch_matmul"] = 2 * n**3 / t / 1e9
  # A stage-3 IR-50 conv: 256 -> 256 channels, 3x3, on 10x10 maps.
  b, hw, c = 256, 10, 256
  x = jnp.asarray(
    np.random.default_rng(1).normal(size=(b, hw, hw, c)), jnp.float32
  )
  k = jnp.asarray(
    np.random.default_rng(2).normal(size=(3, 3, c, c)) * 0.01, jnp.float32
  )
  conv = jax.jit(
    lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
  )
  flops = 2 * b * hw * hw * c * c * 9
  t = _best_time(lambda: block(conv(x, k)), repeats)
  rates["xla_conv"] = flops / t / 1e9
  tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
  tk = torch.from_numpy(np.asarray(k).transpose(3, 2, 0, 1).copy())
  with torch.inference_mode():
    t = _best_time(
      lambda: torch.nn.functional.conv2d(tx, tk, padding=1), repeats
    )
  rates["torch_conv"] = flops / t / 1e9
  return rates


def model_config(
  visual_input: str, backbone: str = "ir50", conv_chunk: int = 0
) -> ml_collections.ConfigDict:
  """`config.model` of the paper's audio-visual model (configs/common.py)."""
  from configs import common  # pylint: disable=g-import-not-at-top

  config = common.base_config()
  config.model.input = visual_input
  config.model.backbone.name = backbone
  config.model.backbone.conv_chunk = conv_chunk
  return config.model


def twin_models(
  visual_input: str, backbone: str = "ir50", seed: int = 0, conv_chunk: int = 0
):
  """The PyTorch reference model and the affjax model, same weights.

  `conv_chunk` is `config.model.backbone.conv_chunk` of the affjax model.

  Returns:
    `(torch_model, flax_model, flax_variables)`; the PyTorch model is in
    eval mode with its backbone frozen (`requires_grad=False`).
  """
  import torch  # pylint: disable=g-import-not-at-top

  from affjax import convert  # pylint: disable=g-import-not-at-top
  from affjax.models import build_model  # pylint: disable=g-import-not-at-top
  from tests.torch_reference import iresnet as torch_iresnet  # pylint: disable=g-import-not-at-top
  from tests.torch_reference import lfan  # pylint: disable=g-import-not-at-top

  torch.manual_seed(seed)
  spatial = None
  if visual_input == "frames":
    if backbone != "ir50":
      raise ValueError(f"only the ir50 twin is built, got {backbone!r}")
    spatial = torch_iresnet.randomize_(torch_iresnet.Backbone(), seed)
  net = lfan.LeaderFollowerNet(spatial, audio_dims=[d for _, d in AUDIO])
  net = lfan.randomize_(net, seed)
  # Smaller head weights keep the 4-level TCN's activations O(1).
  with torch.no_grad():
    for name, p in net.named_parameters():
      if not name.startswith("spatial.") and not name.endswith("weight_g"):
        p.mul_(0.25)
  if spatial is not None:
    for p in spatial.parameters():
      p.requires_grad_(False)
  config = model_config(visual_input, backbone, conv_chunk)
  variables = convert.from_reference_state_dict(
    lfan.state_dict_numpy(net), config
  )
  variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), variables)
  return net.eval(), build_model(config), variables


def random_batch(
  batch: int, frames: int, visual_input: str, seed: int = 0
) -> dict[str, np.ndarray]:
  """A batch in the pipeline's layout (numpy, float32 inputs)."""
  rng = np.random.default_rng(seed)
  out = {}
  if visual_input == "frames":
    out["frames"] = rng.uniform(-1, 1, (batch, frames, FACE, FACE, 3))
  else:
    emb = rng.normal(size=(batch, frames, 512))
    out["embeddings"] = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
  for name, dim in AUDIO:
    out[name] = rng.normal(size=(batch, frames, dim))
  out["label"] = rng.uniform(-1, 1, (batch, frames, 2))
  out = {k: v.astype(np.float32) for k, v in out.items()}
  out["mask"] = np.ones((batch, frames), bool)
  return out


def torch_inputs(batch: dict[str, np.ndarray]):
  """The reference model's positional inputs (frames NCHW) + label."""
  import torch  # pylint: disable=g-import-not-at-top

  visual = batch.get("frames")
  if visual is not None:
    visual = visual.transpose(0, 1, 4, 2, 3)
  else:
    visual = batch["embeddings"]
  args = [torch.from_numpy(np.ascontiguousarray(visual))]
  args += [torch.from_numpy(batch[name]) for name, _ in AUDIO]
  return args, torch.from_numpy(batch["label"])


def torch_ccc_loss(pred, target):
  """The reference's CCCLoss: population covariance, unbiased variances."""
  import torch  # pylint: disable=g-import-not-at-top

  p_mean = pred.mean(dim=1, keepdim=True)
  t_mean = target.mean(dim=1, keepdim=True)
  cov = ((pred - p_mean) * (target - t_mean)).mean(dim=1)
  p_var = torch.var(pred, dim=1)
  t_var = torch.var(target, dim=1)
  ccc = 2 * cov / (p_var + t_var + (p_mean - t_mean).squeeze(1) ** 2 + 1e-8)
  return (1 - ccc).mean()


def fmt_seconds(s: float) -> str:
  return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"
