"""What the benchmarks share: the machine's measured matmul peak and the achieved-FLOP/s line.

Imported by the scripts next to it (`bench/` is their `sys.path[0]`); JAX is imported inside the
functions so that a script's `--xla_flags` still take effect before it.
"""
import time


def matmul_peak_flops(n: int = 2048, dtype: str = "float32", repeats: int = 5) -> float:
  """The FLOP/s of one jitted `[n, n] @ [n, n]` matmul on the default device, best of `repeats`
  (after one untimed call): the peak this machine reaches right now, which a benchmark states
  its model's achieved FLOP/s against, measured in the same run."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
  matmul = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
  matmul(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best


def flops_line(what: str, model_flops: float, seconds: float, peak_flops: float = 0.0,
               measured_peak: float = 0.0) -> str:
  """`model FLOPs <what>: X GFLOP ...; hypertune Y TFLOP/s[; MFU z% of P TFLOP/s peak]
  [; w% of the measured matmul peak M GFLOP/s]` for `model_flops` done in `seconds`."""
  achieved = model_flops / seconds
  line = (f"model FLOPs {what}: {model_flops / 1e9:.4g} GFLOP; hypertune "
          f"{achieved / 1e12:.4g} TFLOP/s")
  if peak_flops:
    line += f"; MFU {100 * achieved / peak_flops:.3g}% of {peak_flops / 1e12:.0f} TFLOP/s peak"
  if measured_peak:
    line += (f"; {100 * achieved / measured_peak:.3g}% of the measured matmul peak "
             f"{measured_peak / 1e9:.1f} GFLOP/s")
  return line
