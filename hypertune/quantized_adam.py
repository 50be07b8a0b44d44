"""Adam with block-wise 8-bit quantized moments (Dettmers et al. 2022, "8-bit Optimizers via
Block-wise Quantization"), as an optax ``GradientTransformation``.

Each moment of a parameter with ``n`` elements is stored as 8-bit codes plus one float32 absmax
per block of ``block_size`` elements of the flattened parameter (the last block zero-padded):
``m`` as int8 codes of the signed dynamic tree map, ``v`` (non-negative) as uint8 codes of the
unsigned one. A step dequantizes both moments, runs the float32 Adam update on them, and stores
them quantized again; the update is computed from the float32 moments of this step, as
bitsandbytes' kernels do, and parameters and updates stay float32.

State layout (:class:`ScaleByAdam8bitState`), per parameter of shape ``S``:
  mu, nu: int8 / uint8 codes ``[*S]`` (float32 ``[*S]`` for a parameter of fewer than
    ``min_quantized_size`` elements, as bitsandbytes keeps small tensors in 32 bits);
  mu_absmax, nu_absmax: ``BlockAbsmax(absmax=float32 [ceil(n / block_size)])``, ``None`` for
    a float32 moment.
The codes have the parameter's shape and key path, so ``partitioning.opt_state_shardings``
gives them the parameter's sharding; the absmax leaves' paths end in ``absmax``, so they are
replicated. Memory: about 2 + 8 / block_size bytes per parameter, against AdamW's 8. Blocks are
(de)quantized without regathering a sharded moment when each device's slice of the parameter's
trailing dimensions holds whole blocks (e.g. a ``[512, 1024]`` kernel split 4 ways along either
dimension with 256-element blocks); otherwise XLA gathers the moment for the step.

Example gin binding (see ``optimizers.adamw_8bit``)::

  train.optimizer = @optimizers.adamw_8bit()
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
  "dynamic_map",
  "quantize_blockwise",
  "dequantize_blockwise",
  "BlockAbsmax",
  "ScaleByAdam8bitState",
  "scale_by_adam_8bit",
]


def dynamic_map(signed: bool, max_exponent_bits: int = 7) -> np.ndarray:
  """The 256 values of Dettmers' dynamic tree quantization map, ascending, in [-1, 1].

  Magnitudes are ``10**-e * f``: decade ``e`` in 0..6 holds fractions ``f`` that are the
  midpoints of a linear grid on [0.1, 1], the grid twice as fine for each decade nearer 1
  (1, 2, ..., 64 fractions signed, where each also appears negated; 2, 4, ..., 128 unsigned),
  plus 0 and 1: fine relative precision for large values, a wide dynamic range for small ones.

  Returns:
    float32 ``[256]``.
  """
  values = [0.0, 1.0]
  for i in range(max_exponent_bits):
    count = 2**i if signed else 2 ** (i + 1)
    grid = np.linspace(0.1, 1.0, count + 1)
    magnitudes = 10.0 ** (i - max_exponent_bits + 1) * (grid[:-1] + grid[1:]) / 2
    values.extend(magnitudes)
    if signed:
      values.extend(-magnitudes)
  table = np.sort(np.asarray(values, np.float64))
  if table.size != 256:
    raise ValueError(f"dynamic map has {table.size} values, expected 256 (max_exponent_bits=7)")
  return table.astype(np.float32)


@functools.lru_cache(maxsize=None)
def _tables(signed: bool) -> Tuple[np.ndarray, np.ndarray]:
  """(values [256], midpoints between consecutive values [255]) of the dynamic map."""
  table = dynamic_map(signed)
  midpoints = ((table[:-1].astype(np.float64) + table[1:]) / 2).astype(np.float32)
  return table, midpoints


def _offset(signed: bool) -> int:
  """Code = map index - offset: int8 codes for the signed map, uint8 for the unsigned one."""
  return 128 if signed else 0


def _blocks(x: jax.Array, block_size: int) -> jax.Array:
  """The blocks of flattened x, ``[..., block_size]``, zero-padded if needed.

  Where the trailing dimensions ``S[k:]`` hold a whole number of blocks, x is reshaped to
  ``[*S[:k], prod(S[k:]) // block_size, block_size]`` (largest such k): the same blocks in the
  same order as ``[num_blocks, block_size]``, with the leading dimensions, and so their
  shardings, kept (no gather of a sharded moment). Otherwise ``[num_blocks, block_size]``.
  """
  shape = tuple(x.shape)
  for k in range(len(shape) - 1, -1, -1):
    inner = int(np.prod(shape[k:]))
    if inner % block_size == 0:
      return x.reshape(*shape[:k], inner // block_size, block_size)
  flat = jnp.ravel(x)
  num_blocks = -(-flat.size // block_size)
  return jnp.pad(flat, (0, num_blocks * block_size - flat.size)).reshape(num_blocks, block_size)


def _unblock(blocks: jax.Array, shape: Tuple[int, ...]) -> jax.Array:
  size = int(np.prod(shape))
  if int(np.prod(blocks.shape)) == size:
    return blocks.reshape(shape)
  return blocks.reshape(-1)[:size].reshape(shape)


def quantize_blockwise(x: jax.Array, block_size: int, signed: bool) -> Tuple[jax.Array, jax.Array]:
  """Block-wise quantization of ``x`` to the nearest dynamic-map code.

  Args:
    x: float array ``[*S]`` (non-negative where ``signed`` is False).
    block_size: elements per block of the flattened ``x``.
    signed: signed map and int8 codes, else the unsigned map and uint8 codes.

  Returns:
    ``(codes [*S] int8/uint8, absmax float32 [ceil(size / block_size)])``.
  """
  _, midpoints = _tables(signed)
  blocks = _blocks(x.astype(jnp.float32), block_size)
  absmax = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
  normed = blocks / jnp.where(absmax > 0, absmax, 1.0)
  index = jnp.searchsorted(jnp.asarray(midpoints), normed).astype(jnp.int32)
  codes = (index - _offset(signed)).astype(jnp.int8 if signed else jnp.uint8)
  return _unblock(codes, x.shape), absmax.reshape(-1)


def dequantize_blockwise(codes: jax.Array, absmax: jax.Array, block_size: int) -> jax.Array:
  """Inverse of :func:`quantize_blockwise`: float32 ``[*S]`` from codes ``[*S]`` and absmax
  ``[num_blocks]`` (the map, signed or not, follows from the codes' dtype)."""
  if codes.dtype not in (jnp.int8, jnp.uint8):
    raise TypeError(f"dequantize_blockwise: codes must be int8 or uint8, got {codes.dtype}")
  signed = codes.dtype == jnp.int8
  table, _ = _tables(signed)
  values = jnp.asarray(table)[codes.astype(jnp.int32) + _offset(signed)]
  blocks = _blocks(values, block_size)
  return _unblock(blocks * absmax.reshape(*blocks.shape[:-1], 1), codes.shape)


class BlockAbsmax(NamedTuple):
  """Per-block scales of one quantized moment: float32 ``[num_blocks]``."""
  absmax: jax.Array


class ScaleByAdam8bitState(NamedTuple):
  """Adam's state with 8-bit moments; see the module docstring for the layout."""
  count: jax.Array  # int32 []
  mu: Any
  mu_absmax: Any
  nu: Any
  nu_absmax: Any


def scale_by_adam_8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    block_size: int = 256,
    min_quantized_size: int = 4096,
) -> optax.GradientTransformation:
  """``optax.scale_by_adam`` (``eps_root=0``) keeping its moments block-wise 8-bit quantized.

  Args:
    b1, b2, eps: as in ``optax.scale_by_adam``.
    block_size: elements per quantization block of a flattened moment (one float32 absmax
      per block, 8 / block_size bytes per element for both moments; the paper uses 2048,
      smaller blocks are more precise).
    min_quantized_size: parameters with fewer elements keep float32 moments.

  Returns:
    A transformation whose state is :class:`ScaleByAdam8bitState`.
  """
  if int(block_size) < 1:
    raise ValueError(f"adamw_8bit: block_size must be a positive integer, got {block_size!r}")
  if int(min_quantized_size) < 0:
    raise ValueError(f"adamw_8bit: min_quantized_size must be >= 0, got {min_quantized_size!r}")
  block_size, min_quantized_size = int(block_size), int(min_quantized_size)

  def store(x, signed):
    """(stored moment, its BlockAbsmax or None) for the float32 moment x."""
    if int(np.size(x)) < min_quantized_size:
      return x, None
    codes, absmax = quantize_blockwise(x, block_size, signed)
    return codes, BlockAbsmax(absmax)

  def load(stored, scales):
    return stored if scales is None else dequantize_blockwise(stored, scales.absmax, block_size)

  def state(count, treedef, mus, nus):
    """The state from per-parameter (stored, scales) pairs in flatten order."""
    trees = [treedef.unflatten([pair[i] for pair in pairs]) for pairs in (mus, nus) for i in (0, 1)]
    return ScaleByAdam8bitState(count, *trees)

  def zeros(p, signed):
    """Stored zero moment for parameter p, built directly (quantizing zeros would make XLA
    constant-fold the block maxima at compile time)."""
    shape = tuple(np.shape(p))
    if int(np.prod(shape)) < min_quantized_size:
      return jnp.zeros(shape, jnp.float32), None
    code = int(np.searchsorted(_tables(signed)[0], 0.0)) - _offset(signed)
    num_blocks = -(-int(np.prod(shape)) // block_size)
    codes = jnp.full(shape, code, jnp.int8 if signed else jnp.uint8)
    return codes, BlockAbsmax(jnp.zeros([num_blocks], jnp.float32))

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    return state(jnp.zeros([], jnp.int32), treedef, [zeros(p, True) for p in leaves],
                 [zeros(p, False) for p in leaves])

  def update_fn(updates, opt_state, params=None):
    del params
    grads, treedef = jax.tree.flatten(updates)
    count = optax.safe_increment(opt_state.count)
    c1 = 1 - jnp.asarray(b1, jnp.float32) ** count
    c2 = 1 - jnp.asarray(b2, jnp.float32) ** count
    steps, mus, nus = [], [], []
    for g, mu, mu_absmax, nu, nu_absmax in zip(grads, *(
        treedef.flatten_up_to(t) for t in opt_state[1:])):
      g = g.astype(jnp.float32)
      m = b1 * load(mu, mu_absmax) + (1 - b1) * g
      v = b2 * load(nu, nu_absmax) + (1 - b2) * jnp.square(g)
      steps.append((m / c1) / (jnp.sqrt(v / c2) + eps))
      mus.append(store(m, True))
      nus.append(store(v, False))
    return treedef.unflatten(steps), state(count, treedef, mus, nus)

  return optax.GradientTransformation(init_fn, update_fn)
