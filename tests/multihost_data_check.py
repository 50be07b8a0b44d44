"""One process of a multi-process CPU job on localhost: reads this process's shard of the
training stream (`trainer.host_train_batches`) and assembles global batch arrays
(`partitioning.shard_batch`).

Run by tests/test_trainer.py with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID set (the variables `maybe_initialize_distributed` reads); prints one JSON
object as its last stdout line.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

# Cross-process collectives on CPU (process_allgather below) need gloo.
jax.config.update("jax_cpu_collectives_implementation", "gloo")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import seqio  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from hypertune import partitioning, trainer  # noqa: E402
from hypertune.data import fewshot  # noqa: E402
from tasks import common  # noqa: E402

NUM_EXAMPLES = 12
GLOBAL_BATCH = 4
LENGTHS = {"hyper_inputs": 32, "inputs": 8, "targets": 8}


def main():
  assert partitioning.maybe_initialize_distributed(), "JAX_* variables did not trigger it"
  train = [fewshot.TaskExample(f"tr{i}", (f"a{i}", f"b{i}")) for i in range(NUM_EXAMPLES)]
  task = fewshot.TaskData(name="mh", splits={"train": train}, instruction="Copy.",
                          eval_pool=[e.demonstration() for e in train])
  common.register_three_input_task("multihost.toy", task, fewshot.HyperConfig(k=1),
                                   seqio.ByteVocabulary())
  out = {}
  # num_partitions=1: a (4, 1) mesh, each process its own data shard; num_partitions=4: a
  # (1, 4) mesh, both processes in one shard, loading the same rows.
  for num_partitions in (1, 4):
    mesh = partitioning.make_mesh(num_partitions=num_partitions)
    batches = trainer.host_train_batches("multihost.toy", GLOBAL_BATCH, LENGTHS, data_seed=0,
                                         mesh=mesh)
    out[num_partitions] = {"mesh_data": mesh.shape["data"], "batches": []}
    for _ in range(6):
      local = next(batches)["encoder_input_tokens"]
      g = partitioning.shard_batch({"encoder_input_tokens": local}, mesh)["encoder_input_tokens"]
      out[num_partitions]["batches"].append({
          "local": local.tolist(),
          "global_shape": list(g.shape),
          "global": np.asarray(multihost_utils.process_allgather(g, tiled=True)).tolist(),
          "global_sum": int(jax.jit(jnp.sum)(g)),  # a computation over every process's rows
      })
  print(json.dumps({"process_index": jax.process_index(), "process_count": jax.process_count(),
                    "meshes": out}))


if __name__ == "__main__":
  main()
