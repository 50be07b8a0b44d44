"""The one train step every method uses, and the train state around it.

    state = TrainState(step, params, opt_state, method_state)
    state, metrics = train_step(state, batch)   # jitted with shardings on a (data, model) mesh

Loss: token cross-entropy summed over `decoder_loss_weights` and divided by the number of target
tokens in the whole batch (so microbatching does not change it), plus any auxiliary losses that
the model sows into the `losses` collection. A method may keep state between steps in the
`method_state` collection (e.g. HART's previous-step states for its consistency loss); its
leaves are per example (leading `batch` axis), so microbatches split it with the batch.
"""
import functools
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import optax
from flax.core import meta

from hypertune import optimizers, partitioning
from hypertune.models import quantization
from hypertune.models.base import BaseModel


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  method_state: Any  # non-parameter collections a method keeps between steps ({} for most)


def _loss_and_metrics(model: BaseModel, params, method_state, batch, rng, total_weight,
                      num_microbatches: int, trainable=None, quantized=None):
  if trainable is not None:
    # Frozen parameters get no weight gradients at all (XLA drops those matmuls); activations
    # still carry gradients through them to the trainable parts.
    params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)
  params = quantization.merge(params, quantized)
  return model.loss(params, method_state, batch, rng, total_weight, num_microbatches)


def train_step(model: BaseModel, tx: optax.GradientTransformation, state: TrainState,
               batch: Mapping[str, jax.Array], rng: jax.Array, num_microbatches: int = 1,
               trainable=None) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """One optimizer update on `batch` (split into `num_microbatches` for gradient accumulation).

  `trainable`: optional pytree of Python bools like `params` (False = frozen: no gradient is
  computed for it, and its gradient counts as zero). Frozen weights stored quantised
  (`quantization.QuantizedWeight`) are constants of the step: the gradient and the optimizer
  see an empty float placeholder at their paths.

  Returns the new state and metrics: loss, cross_entropy, accuracy, aux losses, num_tokens,
  grad_norm.
  """
  rng = jax.random.fold_in(rng, state.step)
  total_weight = jnp.maximum(jnp.sum(batch["decoder_loss_weights"].astype(jnp.float32)), 1.0)
  params, quantized = quantization.split(state.params)
  grad_fn = jax.value_and_grad(functools.partial(_loss_and_metrics, trainable=trainable,
                                                 quantized=quantized),
                               argnums=1, has_aux=True)

  if num_microbatches == 1:
    (loss, (metrics, method_state)), grads = grad_fn(model, params, state.method_state,
                                                     batch, rng, total_weight, 1)
  else:
    batch_size = batch["decoder_target_tokens"].shape[0]
    if batch_size % num_microbatches:
      raise ValueError(f"batch size {batch_size} is not divisible by num_microbatches="
                       f"{num_microbatches}")
    split = lambda x: x.reshape((num_microbatches, x.shape[0] // num_microbatches) + x.shape[1:])
    micro = jax.tree.map(split, dict(batch))
    # method_state rows belong to examples: each microbatch reads and writes its own rows.
    micro_state = jax.tree.map(split, state.method_state)

    def accumulate(carry, xs):
      grads, loss, metrics = carry
      mb, mb_state, i = xs
      (l, (m, new_mb_state)), g = grad_fn(model, params, mb_state, mb,
                                          jax.random.fold_in(rng, i), total_weight,
                                          num_microbatches)
      return (jax.tree.map(jnp.add, grads, g), loss + l,
              jax.tree.map(jnp.add, metrics, m)), new_mb_state or mb_state

    zeros = jax.tree.map(jnp.zeros_like, params)
    first = jax.tree.map(lambda x: x[0], (micro, micro_state))
    metric_shapes = jax.eval_shape(
        lambda: grad_fn(model, params, first[1], first[0], rng, total_weight,
                        num_microbatches)[0][1][0])
    init = (zeros, jnp.zeros(()), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                               metric_shapes))
    (grads, loss, metrics), micro_state = jax.lax.scan(
        accumulate, init, (micro, micro_state, jnp.arange(num_microbatches)))
    method_state = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), micro_state)

  updates, opt_state = tx.update(grads, state.opt_state, params)
  params = quantization.merge(optax.apply_updates(params, updates), quantized)
  metrics = dict(metrics, loss=loss, num_tokens=total_weight, grad_norm=optax.global_norm(grads))
  new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                         method_state=method_state or state.method_state)
  return new_state, metrics


class PartitionedTrainer:
  """Builds the sharded train state and the jitted train step for a model on a mesh.

  One code path for one CPU, a multi-GPU host or a TPU pod: parameters, optimizer state and
  batches get `NamedSharding`s from logical axis rules; `jax.jit` does the rest.

  `frozen_weights_dtype` ("int8", "int4", "nf4"; None: float32): the state stores the frozen
  matmul weights quantised (`hypertune.models.quantization`), sharded as the weights they
  replace; `param_shardings` and `abstract_params` stay those of the float parameters.
  """

  def __init__(self, model: BaseModel, tx: optax.GradientTransformation, mesh,
               rules, batch_shapes: Mapping[str, Tuple[int, ...]], num_microbatches: int = 1,
               trainable_patterns: Sequence[str] = (".*",), frozen_patterns: Sequence[str] = (),
               frozen_weights_dtype: Optional[str] = None):
    self.model, self.tx, self.mesh, self.rules = model, tx, mesh, rules
    self.num_microbatches = num_microbatches
    self.frozen_weights_dtype = quantization.check_dtype(frozen_weights_dtype)
    with partitioning.axis_rules_and_mesh(mesh, rules):
      boxed = jax.eval_shape(lambda: model.init_variables(jax.random.key(0), batch_shapes))
    self.abstract_params = meta.unbox(boxed["params"])
    # Pytree of bools like params: which parameters train (the others get no gradients).
    self.trainable = optimizers.trainable_mask(self.abstract_params, trainable_patterns,
                                               frozen_patterns)
    self.param_shardings = partitioning.tree_shardings(boxed["params"], mesh, rules)
    self.batch_sharding = partitioning.batch_sharding(mesh)
    abstract_opt = jax.eval_shape(tx.init, self.abstract_params)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    method_state = meta.unbox({k: v for k, v in boxed.items() if k == "method_state"})
    self._abstract_method_state = method_state
    self.state_shardings = TrainState(
        step=replicated, params=quantization.quantized_shardings(
            self.param_shardings, self.abstract_params, self.trainable, frozen_weights_dtype),
        opt_state=partitioning.opt_state_shardings(abstract_opt, self.abstract_params,
                                                   self.param_shardings),
        method_state=jax.tree.map(lambda _: replicated, method_state))
    self._batch_shapes = dict(batch_shapes)
    self._step_fn = None

  def init_params(self, rng) -> Any:
    """Freshly initialised parameters, created directly with their shardings."""
    def init(rng):
      return meta.unbox(self.model.init_variables(rng, self._batch_shapes)["params"])
    with partitioning.axis_rules_and_mesh(self.mesh, self.rules):
      return jax.jit(init, out_shardings=self.param_shardings)(rng)

  def create_state(self, params, step: int = 0) -> TrainState:
    """A train state around float `params` (placed onto the mesh, the frozen matmul weights
    quantised if `frozen_weights_dtype`), with a fresh optimizer state."""
    params = jax.device_put(params, self.param_shardings)
    with partitioning.axis_rules_and_mesh(self.mesh, self.rules):
      opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state)(params)
    params = quantization.quantize_frozen(params, self.trainable, self.frozen_weights_dtype,
                                          self.state_shardings.params)
    method_state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                self._abstract_method_state)
    return TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=opt_state,
                      method_state=method_state)

  @property
  def step_fn(self) -> Callable:
    """`(state, batch, rng) -> (state, metrics)`, jitted with shardings, state donated."""
    if self._step_fn is None:
      fn = functools.partial(train_step, self.model, self.tx,
                             num_microbatches=self.num_microbatches, trainable=self.trainable)
      jitted = jax.jit(fn, in_shardings=(self.state_shardings, self.batch_sharding, None),
                       out_shardings=(self.state_shardings, None), donate_argnums=(0,))

      def run(state, batch, rng):
        with partitioning.axis_rules_and_mesh(self.mesh, self.rules):
          return jitted(state, batch, rng)
      self._step_fn = run
    return self._step_fn

  def shard_batch(self, batch: Mapping[str, Any]) -> Dict[str, jax.Array]:
    return partitioning.shard_batch(dict(batch), self.mesh)
