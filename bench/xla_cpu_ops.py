"""Two XLA:CPU behaviours `hypertune.models.layers` is shaped around, each timed as two or three
ways of computing the same thing in one run (best of `--repeats`, after one untimed call):

1. the position-bias gradient: a sum over the leading (batch) axis of `[batch, heads, q, k]`
   against a matmul with ones (`layers.add_position_bias`);
2. bfloat16 matmuls: the forward form `[m, k] @ [k, n]` against the backward forms `g @ w.T` and
   `x.T @ g`, which XLA:CPU converts to float32, and the same two reading row-major copies of the
   transposed operand (`T5Config.bf16_transposed_copies`), which it multiplies in bf16.

(The third, the transposed activation copies of a 3-D einsum's weight gradient, shows only inside
the differentiated, scanned model: `bench/t5_step.py --profile DIR` writes a trace of its step.)

Run (from the repository root):

    .venv/bin/python bench/xla_cpu_ops.py
    .venv/bin/python bench/xla_cpu_ops.py --quick      # small shapes, seconds (CI)
"""
import argparse
import sys
import time


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="small shapes: checks only that it runs")
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args(argv)
  # t5-small's encoder: batch 8 x 256 tokens, d_model 512, d_ff 1024, 6 heads.
  args.batch, args.length, args.d_model, args.d_ff, args.heads = 8, 256, 512, 1024, 6
  if args.quick:
    args.batch, args.length, args.d_model, args.d_ff, args.heads, args.repeats = 2, 16, 32, 64, 2, 1
  return args


def best_seconds(fn, *inputs, repeats):
  import jax
  jax.block_until_ready(fn(*inputs))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*inputs))
    best = min(best, time.perf_counter() - t0)
  return best


def main(argv=None):
  args = parse_args(argv)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from hypertune.models import layers

  keys = iter(jax.random.split(jax.random.PRNGKey(0), 8))
  b, t, d, f, h = args.batch, args.length, args.d_model, args.d_ff, args.heads
  rows = []

  def compare(what, flops, ways, inputs):
    results = {name: jax.jit(fn) for name, fn in ways.items()}
    outputs = [np.asarray(fn(*inputs), np.float32) for fn in results.values()]
    for out in outputs[1:]:  # the two ways compute the same thing
      np.testing.assert_allclose(out, outputs[0], rtol=2e-2, atol=2e-2 * np.abs(outputs[0]).max())
    for name, fn in results.items():
      s = best_seconds(fn, *inputs, repeats=args.repeats)
      rate = f"{flops / s / 1e9:7.1f} GFLOP/s" if flops else ""
      rows.append(f"{what:28s} {name:34s} {s * 1e3:9.3f} ms {rate}")

  # 1. Position-bias gradient: sum over the batch.
  g = jax.random.normal(next(keys), (b, h, t, t))
  compare("bias gradient (batch sum)", 0, {
      "jnp.sum(axis=0)": lambda g: jnp.sum(g, axis=0),
      "ones @ g (add_position_bias)": lambda g: (
          jnp.ones((1, b)) @ g.reshape(b, -1)).reshape(g.shape[1:]),
  }, (g,))

  # 2. bfloat16 matmul forms.
  bf = jnp.bfloat16
  xb = jax.random.normal(next(keys), (b * t, d)).astype(bf)
  wb = jax.random.normal(next(keys), (d, f)).astype(bf)
  gb = jax.random.normal(next(keys), (b * t, f)).astype(bf)
  mm = lambda p, q: jnp.matmul(p, q, preferred_element_type=jnp.float32)  # noqa: E731
  copy_t = layers._row_major_transpose
  flops = 2 * b * t * d * f
  compare("bf16 forward", flops, {"x @ w": mm}, (xb, wb))
  compare("bf16 input gradient", flops, {
      "g @ w.T": lambda g, w: mm(g, w.T),
      "g @ copy(w.T) (transposed_copies)": lambda g, w: mm(g, copy_t(w)),
  }, (gb, wb))
  compare("bf16 weight gradient", flops, {
      "x.T @ g": lambda x, g: mm(x.T, g),
      "copy(x.T) @ g (transposed_copies)": lambda x, g: mm(copy_t(x), g),
  }, (xb, gb))

  print(f"jax {jax.__version__}, {jax.devices()[0].platform}; batch {b}, length {t}, d_model {d}, "
        f"d_ff {f}, heads {h}; best of {args.repeats}")
  print("\n".join(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
