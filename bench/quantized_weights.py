"""Frozen-weight memory and logit error of `train.frozen_weights_dtype` (int8 / int4 / nf4).

Memory: the downstream model's frozen parameters of T5-Large, T5-XL and Llama-2-7B, from
`jax.eval_shape` of `model.init` and of `quantization.quantize_frozen` (nothing is allocated):
float32 bytes against the quantised matmul weights plus the float32 rest (embeddings, norms,
relative-position tables). Error: logits of tiny randomly initialised T5 and Llama, quantised
against float32 (max |difference| / max |float32 logit|, and relative RMS).

    .venv/bin/python bench/quantized_weights.py            # both (~1 min on 2 CPU cores)
    .venv/bin/python bench/quantized_weights.py --no_error # memory only, seconds
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from hypertune.models import quantization as q
from hypertune.models.config import t5_config
from hypertune.models.llama import Llama, causal_mask, llama_config, positions_of
from hypertune.models.t5 import T5

GIB = 2**30


def _tokens(seed, shape):
  return jax.random.randint(jax.random.key(seed), shape, 1, 128)


def _t5(cfg):
  return T5(cfg), (_tokens(1, (2, 10)), _tokens(2, (2, 6)))


def _llama(cfg):
  tokens = _tokens(1, (2, 10))
  key_mask = jnp.ones_like(tokens)
  return Llama(cfg), (tokens, positions_of(key_mask), causal_mask(key_mask))


def memory_rows():
  for name, (model, args) in {"t5 large": _t5(t5_config("large")),
                              "t5 xl": _t5(t5_config("xl")),
                              "llama2_7b": _llama(llama_config("llama2_7b"))}.items():
    params = meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *args)["params"])
    frozen = jax.tree.map(lambda _: False, params)
    row = {"float32": q.nbytes(params)}
    for qtype in ("int8", "int4"):
      row[qtype] = q.nbytes(jax.eval_shape(lambda p, t=qtype: q.quantize_frozen(p, frozen, t),
                                           params))
    yield name, row


def error_rows():
  for name, (model, args) in {"t5 tiny": _t5(t5_config("tiny", vocab_size=128)),
                              "llama tiny": _llama(llama_config("tiny", vocab_size=128))}.items():
    params = meta.unbox(jax.jit(model.init)(jax.random.key(0), *args)["params"])
    apply = jax.jit(lambda p: model.apply({"params": p}, *args))
    ref = np.asarray(apply(params))
    for qtype in q.QTYPES:
      out = np.asarray(apply(q.quantize_frozen(params, jax.tree.map(lambda _: False, params),
                                               qtype)))
      diff = out - ref
      yield name, qtype, (np.max(np.abs(diff)), np.max(np.abs(diff)) / np.max(np.abs(ref)),
                          np.sqrt(np.mean(diff**2) / np.mean(ref**2)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--no_error", action="store_true", help="memory only")
  flags = parser.parse_args()
  print("| model | frozen float32 GiB | int8 GiB (ratio) | int4 / nf4 GiB (ratio) |")
  print("|---|---|---|---|")
  for name, row in memory_rows():
    f = row["float32"]
    print(f"| {name} | {f / GIB:.2f} | {row['int8'] / GIB:.2f} ({row['int8'] / f:.3f}) | "
          f"{row['int4'] / GIB:.2f} ({row['int4'] / f:.3f}) |")
  if flags.no_error:
    return
  print("\n| model | dtype | max abs logit diff | / max abs logit | relative RMS |")
  print("|---|---|---|---|---|")
  for name, qtype, (diff, rel, rms) in error_rows():
    print(f"| {name} | {qtype} | {diff:.4f} | {rel:.4f} | {rms:.4f} |")


if __name__ == "__main__":
  main()
