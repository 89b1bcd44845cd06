r"""TCN causal convolution: XLA's convolution vs two matmul formulations.

The TCN's dilated causal conv (`affjax.models.tcn.causal_conv`,
`lax.conv_general_dilated` on `[B, T, C]`) against im2col (the K shifted
inputs concatenated on channels, one `[B T, K Cin] x [K Cin, Cout]` dot) and
K shifted dots summed; forward and gradient w.r.t. input and kernel, at the
paper's widths (visual 512->128 and 128->128, audio 32->32), dilations 1 and
8, B x T = 8 x 300, cases alternated, medians. Checked to agree first.

  python -m benchmarks.tcn_conv
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from affjax.models import tcn
from benchmarks import harness


def _padded(x, kernel, dilation):
  pad = (kernel.shape[0] - 1) * dilation
  return jnp.pad(x, ((0, 0), (pad, 0), (0, 0)))


def im2col(x, kernel, dilation):
  xp, t = _padded(x, kernel, dilation), x.shape[1]
  cols = [xp[:, i * dilation : i * dilation + t] for i in range(len(kernel))]
  return jnp.concatenate(cols, -1) @ kernel.reshape(-1, kernel.shape[-1])


def shifted(x, kernel, dilation):
  xp, t = _padded(x, kernel, dilation), x.shape[1]
  return sum(
    xp[:, i * dilation : i * dilation + t] @ kernel[i]
    for i in range(len(kernel))
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=15)
  args = parser.parse_args()
  print(f"jax {jax.__version__}, load average {harness.load_average()}")
  rng = np.random.default_rng(0)
  impls = {"conv": tcn.causal_conv, "im2col": im2col, "shifted": shifted}
  print(
    "| Cin->Cout | dilation | "
    + " | ".join(impls)
    + " | grads: "
    + " | ".join(impls)
    + " |"
  )
  print("|---" * (2 + 2 * len(impls)) + "|")
  for cin, cout in ((512, 128), (128, 128), (32, 32)):
    x = jnp.asarray(rng.normal(size=(8, 300, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(5, cin, cout)) * 0.05, jnp.float32)
    for d in (1, 8):
      fwd, grad = [], []
      for name, f in impls.items():
        fn = jax.jit(lambda x, w, f=f, d=d: f(x, w, d))
        np.testing.assert_allclose(
          fn(x, w), tcn.causal_conv(x, w, d), atol=1e-3, err_msg=name
        )
        gn = jax.jit(
          jax.grad(
            lambda x, w, f=f, d=d: jnp.sum(f(x, w, d) ** 2), argnums=(0, 1)
          )
        )
        fwd.append(
          harness.Case(name, lambda fn=fn, x=x, w=w: harness.block(fn(x, w)))
        )
        grad.append(
          harness.Case(name, lambda gn=gn, x=x, w=w: harness.block(gn(x, w)))
        )
      harness.alternate(fwd + grad, args.repeats)
      print(
        f"| {cin}->{cout} | {d} | "
        + " | ".join(harness.fmt_seconds(c.median) for c in fwd + grad)
        + " |"
      )


if __name__ == "__main__":
  main()
