r"""IR-50's 3x3 convolutions: XLA vs oneDNN, and a Winograd alternative.

The end-to-end step is the frozen IR-50 forward on every frame, and that
forward is its 3x3 convolutions (about 5.4 GFLOP per 40x40 crop, spread
evenly over the four stages). This script times one stride-1 3x3 conv of
each stage on `--crops` crops (stage 1: 40x40x64, 2: 20x20x128, 3: 10x10x256,
4: 5x5x512), cases alternated, medians, and prints GFLOP/s (direct-conv
FLOPs, so Winograd's figure is an equivalent rate):

* `xla`: `affjax.models.iresnet.conv2d` (`lax.conv_general_dilated`, NHWC /
  HWIO), what the backbone runs;
* `xla chunks`: the same with `chunk=64`, as with
  `config.model.backbone.conv_chunk=64`;
* `winograd`: Winograd F(2x2, 3x3) in plain jnp (input and output transforms
  as slices and adds, 16 batched `[tiles, Cin] x [Cin, Cout]` dots), 2.25x
  fewer multiplies; checked against `xla` first;
* `torch`: `torch.nn.functional.conv2d`, NCHW (the reference's layout) and
  channels-last, both oneDNN.

Then the whole backbone forward on `--backbone_crops` crops, affjax (with
and without `config.model.backbone.conv_chunk`) vs PyTorch, in eval mode and
in train mode (BatchNorm batch statistics, as in the train step's frozen
forward).

  python -m benchmarks.backbone_conv --crops=1024 --repeats=3
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import jax.numpy as jnp
import numpy as np

from affjax.models import iresnet
from benchmarks import harness

# Each stage's stride-1 3x3 conv: (height = width, channels) on 40x40 input.
STAGES = ((40, 64), (20, 128), (10, 256), (5, 512))

# XLA:CPU's conv throughput falls as the batch grows; chunks of this many
# crops keep it near its small-batch rate.
CHUNK = 64

# F(2x2, 3x3) kernel transform (Lavin & Gray, 2015).
_G = np.array(
  [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32
)


def _input_transform(r0, r1, r2, r3):
  # B^T applied along one tile axis.
  return r0 - r2, r1 + r2, r2 - r1, r1 - r3


def _output_transform(m0, m1, m2, m3):
  # A^T applied along one tile axis.
  return m0 + m1 + m2, m1 - m2 - m3


def winograd_conv(x, kernel):
  """3x3, stride 1, padding 1: `[N, H, W, Cin] x [3, 3, Cin, Cout]`."""
  n, h, w, c = x.shape
  th, tw = (h + 1) // 2, (w + 1) // 2
  # 4x4 input tiles at stride 2 = pairs of adjacent 2-pixel blocks.
  xp = jnp.pad(x, ((0, 0), (1, 2 * th + 1 - h), (1, 2 * tw + 1 - w), (0, 0)))
  blocks = xp.reshape(n, th + 1, 2, tw + 1, 2, c)
  rows = _input_transform(
    blocks[:, :-1, 0], blocks[:, :-1, 1], blocks[:, 1:, 0], blocks[:, 1:, 1]
  )
  tiles = []
  for r in rows:
    tiles += _input_transform(
      r[:, :, :-1, 0], r[:, :, :-1, 1], r[:, :, 1:, 0], r[:, :, 1:, 1]
    )
  v = jnp.stack(tiles).reshape(16, n * th * tw, c)
  u = jnp.einsum("ai,ijcd,bj->abcd", _G, kernel, _G).reshape(16, c, -1)
  m = jnp.einsum("tpc,tcd->tpd", v, u).reshape(4, 4, n, th, tw, -1)
  cols = [_output_transform(*(m[a, b] for a in range(4))) for b in range(4)]
  out_rows = []
  for i in range(2):
    y0, y1 = _output_transform(*(cols[b][i] for b in range(4)))
    out_rows.append(jnp.stack([y0, y1], 3))
  y = jnp.stack(out_rows, 2).reshape(n, 2 * th, 2 * tw, -1)
  return y[:, :h, :w]


def stage_row(crops: int, hw: int, c: int, repeats: int) -> str:
  """One stage's conv, every implementation, as a table row."""
  import torch  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(hw)
  x = rng.normal(size=(crops, hw, hw, c)).astype(np.float32)
  k = (rng.normal(size=(3, 3, c, c)) * 0.05).astype(np.float32)
  jx, jk = jnp.asarray(x), jnp.asarray(k)
  pad = ((1, 1), (1, 1))
  direct = jax.jit(lambda x, k: iresnet.conv2d(x, k, (1, 1), pad))
  chunked = jax.jit(lambda x, k: iresnet.conv2d(x, k, (1, 1), pad, CHUNK))
  wino = jax.jit(winograd_conv)
  want = np.asarray(direct(jx, jk))
  err = np.max(np.abs(np.asarray(wino(jx, jk)) - want)) / np.max(np.abs(want))
  chunk_err = np.max(np.abs(np.asarray(chunked(jx, jk)) - want))
  tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  tk = torch.from_numpy(k.transpose(3, 2, 0, 1).copy())

  def torch_conv(inp):
    def run():
      with torch.inference_mode():
        return torch.nn.functional.conv2d(inp, tk, padding=1)

    return run

  cases = [
    harness.Case("xla", lambda: harness.block(direct(jx, jk))),
    harness.Case("xla chunks", lambda: harness.block(chunked(jx, jk))),
    harness.Case("winograd", lambda: harness.block(wino(jx, jk))),
    harness.Case("torch NCHW", torch_conv(tx)),
    harness.Case(
      "torch channels-last",
      torch_conv(tx.contiguous(memory_format=torch.channels_last)),
    ),
  ]
  harness.alternate(cases, repeats)
  flops = 2 * crops * hw * hw * c * c * 9
  cells = [
    f"{case.median * 1e3:.0f} ms ({flops / case.median / 1e9:.0f})"
    for case in cases
  ]
  return (
    f"| {hw}x{hw}x{c} | "
    + " | ".join(cells)
    + f" | {chunk_err:.0e} | {err:.1e} |"
  )


def backbone_rows(crops: int, repeats: int, chunk: int) -> list[str]:
  import torch  # pylint: disable=g-import-not-at-top

  net, model, variables = harness.twin_models("frames")
  backbone = model.backbone
  chunked = backbone.clone(conv_chunk=chunk)
  bb_vars = {
    "params": variables["params"]["backbone"],
    "batch_stats": variables["batch_stats"]["backbone"],
  }
  x = np.random.default_rng(1).uniform(-1, 1, (crops, 40, 40, 3))
  x = x.astype(np.float32)
  jx = jnp.asarray(x)

  def forward(module, train):
    def fn(v, x):
      if not train:
        return module.apply(v, x, train=False)
      return module.apply(
        v,
        x,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": jax.random.key(0)},
      )

    return jax.jit(fn).lower(bb_vars, jx).compile()

  jitted = {
    (mode, c): forward(module, mode == "train")
    for mode in ("eval", "train")
    for c, module in ((0, backbone), (chunk, chunked))
  }
  flops = harness.xla_flops(jitted["eval", 0])
  same = np.max(
    np.abs(
      np.asarray(jitted["eval", 0](bb_vars, jx))
      - np.asarray(jitted["eval", chunk](bb_vars, jx))
    )
  )
  tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  spatial = net.spatial

  def torch_fwd(train):
    def run():
      spatial.train(train)
      with torch.inference_mode():
        return spatial(tx)

    return run

  rows = []
  for mode in ("eval", "train"):
    cases = [
      harness.Case(
        f"affjax {c}",
        lambda f=jitted[mode, c]: harness.block(f(bb_vars, jx)),
      )
      for c in (0, chunk)
    ]
    cases.append(harness.Case("pytorch", torch_fwd(mode == "train")))
    harness.alternate(cases, repeats)
    a, a_chunk, t = (c.median for c in cases)
    rows.append(
      f"| {mode} | {a:.2f} s ({flops / a / 1e9:.0f}) | "
      f"{a_chunk:.2f} s ({flops / a_chunk / 1e9:.0f}) | "
      f"{t:.2f} s ({flops / t / 1e9:.0f}) | {t / a:.2f}x | {t / a_chunk:.2f}x |"
    )
  spatial.eval()
  rows.append(f"eval outputs, chunked vs not: max abs diff {same:.1e}")
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--crops", type=int, default=1024, help="per conv; a multiple of 64"
  )
  parser.add_argument("--backbone_crops", type=int, default=600)
  parser.add_argument(
    "--convs",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="time the per-stage convs (--no-convs: backbone only)",
  )
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  harness.set_torch_threads()
  print(
    f"jax {jax.__version__}, {args.crops} crops, "
    f"load average {harness.load_average()}"
  )
  print(
    f"| stage conv | xla | xla, {CHUNK}-crop chunks | winograd | torch NCHW |"
    " torch channels-last | chunks max abs diff | winograd rel. err |"
  )
  print("|---" * 8 + "|")
  for hw, c in STAGES if args.convs else ():
    print(stage_row(args.crops, hw, c, args.repeats), flush=True)
  print("(ms, and GFLOP/s of the direct convolution's FLOPs)\n")
  print(f"{args.backbone_crops} crops")
  print(
    f"| backbone forward | affjax | affjax, conv_chunk={CHUNK} | PyTorch |"
    " PyTorch / affjax | PyTorch / affjax chunked |"
  )
  print("|---" * 6 + "|")
  for row in backbone_rows(args.backbone_crops, args.repeats, CHUNK):
    print(row, flush=True)
  print(f"(s, and XLA GFLOP/s); load average after: {harness.load_average()}")


if __name__ == "__main__":
  main()
