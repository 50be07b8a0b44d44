"""Evaluation compiles per shape, never per task or per batch: after one evaluation (the
warm-up), evaluating a different, larger set of tasks with the same shapes compiles nothing."""
import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from hypertune.evaluation import Evaluator
from hypertune.models.base import EncoderDecoderModel
from hypertune.models.config import t5_config
from hypertune.models.hypermodel import HyperModel
from hypertune.models.peft import PeftParams

LENGTHS = {"hyper_inputs": 48, "inputs": 16, "targets": 8}
# Lowering to MLIR happens on every miss of a jitted function's cache (a backend compile may
# then be served by the persistent compilation cache the test session shares).
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


@contextlib.contextmanager
def count_compilations():
  """Yields {event: count} of the compile events recorded inside the block."""
  counts = {e: 0 for e in _COMPILE_EVENTS}

  def listener(event, duration_secs, **kwargs):
    del duration_secs, kwargs
    if event in counts:
      counts[event] += 1
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield counts
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


class _MemoryHypernet(nn.Module):
  """A small hypernetwork: encoder memory `[batch, 4, d_model]` (fusion-in-decoder) from the
  first hyper tokens; its parameters are per task, as any hypernetwork's."""
  d_model: int = 64
  vocab_size: int = 384

  @nn.compact
  def __call__(self, hyper_input_tokens, deterministic: bool = True, downstream=None
               ) -> PeftParams:
    tokens = hyper_input_tokens[:, :4]
    memory = nn.Dense(self.d_model)(nn.Embed(self.vocab_size, self.d_model)(tokens))
    return PeftParams(extra_memory=memory, extra_memory_mask=(tokens != 0).astype(jnp.int32))


def _tiny_model():
  """A tiny T5 with a hypernetwork, and its (random) parameters."""
  model = EncoderDecoderModel(HyperModel(t5_config("tiny", vocab_size=384),
                                         hypernet=_MemoryHypernet()))
  variables = jax.jit(lambda rng: model.init_variables(rng, model.batch_shapes(1, LENGTHS)))(
      jax.random.PRNGKey(0))
  return model, meta.unbox(variables["params"])


def _heldout_tasks():
  """(classification tasks, generation tasks) of the built-in held-out suite."""
  from tasks import builtin, common  # pylint: disable=g-import-not-at-top
  builtin.register_builtin_suite(k=2)
  names = common.mixture_tasks("builtin_heldout")
  is_cls = {n: bool(common.get_examples(n, "test")[0].get("answer_choices")) for n in names}
  return [n for n in names if is_cls[n]], [n for n in names if not is_cls[n]]


def test_evaluating_more_tasks_of_the_same_shapes_compiles_nothing():
  classification, generation = _heldout_tasks()
  assert len(classification) >= 4 and len(generation) >= 4
  model, params = _tiny_model()
  # Batches of 12 over tasks of 16 queries (and 16 x choices rows): every batch holds the rows
  # of one or two tasks (hypernetwork calls over 1 or 2 tasks, in both passes), each task's
  # parameters generated once; rank classification and greedy decoding of every task.
  ev = Evaluator(model, LENGTHS, batch_size=12, generate_classification=True)
  hyper_sizes = []  # tasks per hypernetwork call (padded to a power of two), per pass
  jitted = ev._task_parameters  # pylint: disable=protected-access

  def spy(params, method_state, hyper):
    hyper_sizes[-1].add(hyper.shape[0])
    return jitted(params, method_state, hyper)
  ev._task_parameters = spy  # pylint: disable=protected-access

  def evaluate(tasks):
    hyper_sizes.append(set())
    with count_compilations() as counts:
      results = ev.evaluate(params, tasks, "test")
    assert all(t in results for t in tasks)
    return counts, (jitted._cache_size(), ev._score._cache_size(),  # pylint: disable=protected-access
                    ev._predict._cache_size())  # pylint: disable=protected-access

  first, cache_sizes = evaluate([classification[0], generation[0]])
  assert first[_COMPILE_EVENTS[0]] > 0, first  # the listener sees the warm-up's compiles
  second, cache_sizes_after = evaluate(classification[1:4] + generation[1:4])
  # The same shapes (else the check below would prove nothing about per-task compiles) ...
  assert hyper_sizes[1] <= hyper_sizes[0], hyper_sizes
  # ... and not one compilation, of the evaluator's functions or of anything else.
  assert second == {e: 0 for e in _COMPILE_EVENTS}, second
  assert cache_sizes_after == cache_sizes
  assert np.all(np.asarray(cache_sizes) >= 1)
