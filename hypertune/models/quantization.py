"""Quantised frozen weights (QLoRA's storage): the frozen downstream model's matmul weights kept
as 8- or 4-bit codes with block-wise absmax scales, dequantised inside the matmul.

    params = quantization.quantize_frozen(params, trainable, "int8")  # once, after loading
    y = layers.dot("btd,df->btf", x, w, dtype)  # w: float32, or a QuantizedWeight

A run asks for it with `train.frozen_weights_dtype = "int8"` ("int4", "nf4"; None: float32).
Only frozen parameters are quantised (the trainer's `trainable` mask False) and only the weights
that `layers.dot` reads (`MATMUL_WEIGHTS`: T5's attention, MLP and untied output head; Llama's
projections and `lm_head`). Embeddings, relative-position tables and norm scales are read
otherwise (a gather, a product) and stay float32, as in QLoRA; trainable parameters (the
hypernetwork, LoRA) are never touched.

Numerics are Google's `qwix` (`qwix.quantize` / `qwix.dequantize`): symmetric absmax,
one float32 scale per block of `BLOCK_SIZE` = 64 consecutive elements (row-major, so a block
runs along the last axis and, when that axis is shorter, over the ones before it; axis 0 is
never tiled, because scanned layers stack there and `nn.scan` slices every leaf of a
parameter on it). "int4" and "nf4" (QLoRA's NormalFloat4) codes are packed two to a byte
along the last axis: XLA:CPU stores `jnp.int4` in a whole byte, so packing is what makes 4-bit
weights half the size of 8-bit ones on every backend.

Bytes per weight: int8 1 + 4/64 (26.6% of float32), int4/nf4 0.5 + 4/64 (14.1%).

Training (`train_lib.train_step`): a `QuantizedWeight` is a constant of the step, neither
differentiated nor updated (`split` / `merge`); activations still carry gradients through the
dequantised matmul to LoRA and the hypernetwork. `dot` is rematerialised (`jax.checkpoint`), so
the backward pass dequantises the weight again instead of keeping a float copy of every layer's
weights as a residual, which would undo the saving.
"""
import functools
import logging
import math
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import NamedSharding, PartitionSpec

QTYPES = ("int8", "int4", "nf4")
BLOCK_SIZE = 64
_QWIX_QTYPE = {"int8": jnp.int8, "int4": jnp.int4, "nf4": "nf4"}
# The parameters `layers.dot` reads ('/'-joined paths, fully matched).
MATMUL_WEIGHTS = re.compile(
    r"(.*/)?(query|key|value|out|wi|wi_0|wi_1|wo|q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|"
    r"down_proj|logits_dense/kernel|lm_head/kernel)")


@flax.struct.dataclass
class QuantizedWeight:
  """A frozen weight of float shape `shape` as codes plus block-wise absmax scales.


  qvalue: int8 `[*shape]` ("int8"), or uint8 `[*shape[:-1], shape[-1] // 2]` ("int4", "nf4":
    two 4-bit codes a byte, the even index in the low nibble).
  scale: float32 `[*shape]` with each tiled axis divided by its tile (qwix's layout).
  """
  qvalue: jax.Array
  scale: jax.Array
  qtype: str = flax.struct.field(pytree_node=False, default="int8")

  # From the codes, not a static field: `nn.scan` slices the leaves of a stacked weight.
  @property
  def shape(self) -> Tuple[int, ...]:
    *lead, last = self.qvalue.shape
    return tuple(lead) + (last if self.qtype == "int8" else 2 * last,)

  @property
  def ndim(self) -> int:
    return len(self.shape)


def is_quantized(x) -> bool:
  return isinstance(x, QuantizedWeight)


def check_dtype(frozen_weights_dtype: Optional[str]) -> Optional[str]:
  if frozen_weights_dtype is not None and frozen_weights_dtype not in QTYPES:
    raise ValueError(f"frozen_weights_dtype must be None or one of {QTYPES}, got "
                     f"{frozen_weights_dtype!r}")
  return frozen_weights_dtype


def block_tiles(shape: Tuple[int, ...], block_size: int = BLOCK_SIZE) -> Dict[int, int]:
  """{axis: elements per block along it}: contiguous row-major blocks of `block_size` elements
  (fewer where the shape does not divide), built from the last axis; axis 0 is never tiled."""
  tiles, remaining = {}, block_size
  for axis in range(len(shape) - 1, 0, -1):
    tile = math.gcd(shape[axis], remaining)
    tiles[axis] = tile
    remaining //= tile
    if tile < shape[axis] or remaining == 1:
      break
  return tiles


def _pack4(codes):
  """4-bit codes `[..., n]` (int4 or uint4) -> uint8 `[..., n // 2]`."""
  nibbles = jax.lax.bitcast_convert_type(codes.astype(jnp.int8), jnp.uint8) & 0xF
  return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def _unpack4(packed, qtype: str):
  """uint8 `[..., n // 2]` -> int8 codes `[..., n]` (int4: sign-extended; nf4: 0..15)."""
  codes = jnp.stack([packed & 0xF, packed >> 4], axis=-1).astype(jnp.int8)
  codes = codes.reshape(packed.shape[:-1] + (2 * packed.shape[-1],))
  return (codes ^ 8) - 8 if qtype == "int4" else codes


def quantize(w, qtype: str = "int8", block_size: int = BLOCK_SIZE) -> QuantizedWeight:
  """A float weight `[*shape]` (ndim >= 2) -> its QuantizedWeight."""
  check_dtype(qtype)
  w = jnp.asarray(w, jnp.float32)
  if w.ndim < 2:
    raise ValueError(f"quantize: expected a weight of rank >= 2, got shape {w.shape}")
  if qtype != "int8" and w.shape[-1] % 2:
    raise ValueError(f"quantize: {qtype} packs two codes a byte along the last axis, which "
                     f"must be even; got shape {w.shape}")
  tiles = block_tiles(w.shape, block_size)
  q = qwix.quantize(w, _QWIX_QTYPE[qtype],
                    channelwise_axes=[a for a in range(w.ndim) if tiles.get(a, 1) == 1],
                    tiled_axes={a: t for a, t in tiles.items() if t > 1})
  qvalue = q.qvalue if qtype == "int8" else _pack4(q.qvalue)
  return QuantizedWeight(qvalue, q.scale, qtype)


def dequantize(w: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
  """`[*w.shape]` in `dtype`: codes times their block's scale."""
  codes = w.qvalue if w.qtype == "int8" else _unpack4(w.qvalue, w.qtype)
  qtype = "nf4" if w.qtype == "nf4" else jnp.int8
  return qwix.dequantize(qwix.QArray(codes, w.scale.astype(dtype), qtype=qtype)).astype(dtype)


@functools.partial(jax.checkpoint, static_argnums=(0, 3, 4))
def dot(spec: str, x, w: QuantizedWeight, dtype, result_dtype):
  """`layers.dot` with a quantised weight: dequantised to `dtype` in the matmul, float32
  accumulation, the result in `result_dtype`. Rematerialised: the backward pass dequantises
  again rather than saving the float weight."""
  return jnp.einsum(spec, x.astype(dtype), dequantize(w, dtype),
                    preferred_element_type=jnp.float32).astype(result_dtype)


def is_quantizable(path: str, leaf) -> bool:
  """Whether a parameter at '/'-joined `path` is a matmul weight that can be stored quantised."""
  return (MATMUL_WEIGHTS.fullmatch(path) is not None and len(np.shape(leaf)) >= 2
          and jnp.issubdtype(leaf.dtype, jnp.floating))


def _fit(sharding: NamedSharding, shape) -> NamedSharding:
  """`sharding`'s spec on an array of `shape`, each axis the mesh does not divide replicated."""
  spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))

  def size(names):
    names = names if isinstance(names, tuple) else (names,)
    return math.prod(sharding.mesh.shape[n] for n in names)

  return NamedSharding(sharding.mesh, PartitionSpec(
      *[s if s is None or dim % size(s) == 0 else None for s, dim in zip(spec, shape)]))


def _quantized_paths(abstract_params, trainable) -> Dict[str, Any]:
  mask = flatten_dict(trainable, sep="/")
  return {path: leaf for path, leaf in flatten_dict(abstract_params, sep="/").items()
          if not mask[path] and is_quantizable(path, leaf)}


def quantized_shardings(param_shardings, abstract_params, trainable, qtype: Optional[str],
                        block_size: int = BLOCK_SIZE):
  """`param_shardings` with a QuantizedWeight of shardings where `quantize_frozen` puts a
  QuantizedWeight: codes and scales keep the weight's partition spec, an axis whose quantised
  size the mesh no longer divides (a tiled scale axis, a packed last axis) is replicated."""
  if check_dtype(qtype) is None:
    return param_shardings
  flat = flatten_dict(param_shardings, sep="/")
  for path, leaf in _quantized_paths(abstract_params, trainable).items():
    q = jax.eval_shape(functools.partial(quantize, qtype=qtype, block_size=block_size),
                       jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
    flat[path] = QuantizedWeight(_fit(flat[path], q.qvalue.shape), _fit(flat[path], q.scale.shape),
                                 q.qtype)
  return unflatten_dict(flat, sep="/")


@functools.lru_cache(maxsize=None)
def _quantize_all(qtype: str, block_size: int, out_shardings):
  # One program for all the weights: a compile per weight costs more than the quantising.
  return jax.jit(lambda weights: tuple(quantize(w, qtype, block_size) for w in weights),
                 out_shardings=out_shardings)


def quantize_frozen(params, trainable, qtype: Optional[str], shardings=None,
                    block_size: int = BLOCK_SIZE):
  """`params` with every frozen matmul weight (`trainable` False, `is_quantizable`) replaced by
  its QuantizedWeight (placed as `shardings`, from `quantized_shardings`, when given);
  unchanged when `qtype` is None."""
  if check_dtype(qtype) is None:
    return params
  flat = flatten_dict(params, sep="/")
  paths = sorted(_quantized_paths(params, trainable))
  target = None
  if shardings is not None:
    target = tuple(flatten_dict(shardings, sep="/")[p] for p in paths)
  weights = tuple(flat[p] for p in paths)
  quantized = _quantize_all(qtype, block_size, target)(weights)
  logging.info("%d frozen matmul weights stored as %s: %.2f MiB a device (float32: %.2f MiB)",
               len(paths), qtype, nbytes(quantized) / 2**20, nbytes(weights) / 2**20)
  flat.update(zip(paths, quantized))
  return unflatten_dict(flat, sep="/")


# Stands in for a QuantizedWeight where the gradient and the optimizer look: a float leaf at the
# same path (so trainability regexes label it as before), frozen, empty.
def _placeholder():
  return jnp.zeros((0,), jnp.float32)


def split(params) -> Tuple[Any, Mapping[str, QuantizedWeight]]:
  """(`params` with an empty float32 placeholder at each QuantizedWeight, {path: weight})."""
  flat = flatten_dict(params, sep="/")
  quantized = {k: v for k, v in flat.items() if is_quantized(v)}
  if not quantized:
    return params, {}
  return unflatten_dict({k: _placeholder() if k in quantized else v for k, v in flat.items()},
                        sep="/"), quantized


def merge(params, quantized: Mapping[str, QuantizedWeight]):
  """The inverse of `split`."""
  if not quantized:
    return params
  flat = flatten_dict(params, sep="/")
  flat.update(quantized)
  return unflatten_dict(flat, sep="/")


def nbytes(tree) -> int:
  """Bytes one device holds of a tree's arrays (its buffer as XLA allocated it, which for
  `jnp.int4` on CPU is a byte an element); numpy, abstract and traced leaves by their dtype."""
  def size(x):
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
      return x.addressable_shards[0].data.on_device_size_in_bytes()
    return int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
  return sum(size(x) for x in jax.tree.leaves(tree))
