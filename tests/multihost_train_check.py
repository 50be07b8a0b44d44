"""One process of a 2-process CPU training job on localhost: `trainer.train` for a few steps
of a tiny model with an evaluation at the end, every process on the same MODEL_DIR.

Run by tests/test_trainer.py with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID set; argv[1] is MODEL_DIR, argv[2] num_partitions (2: a (2, 2) mesh, each
process its own data shard; 4: a (1, 4) mesh, one data shard loaded by both). Prints one
JSON object as its last stdout line.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

# Cross-process collectives on CPU (gathering sharded parameters) need gloo.
jax.config.update("jax_cpu_collectives_implementation", "gloo")

from hypertune import gin_utils, partitioning, trainer  # noqa: E402
from tasks import builtin, common  # noqa: E402


def main(model_dir, num_partitions):
  assert partitioning.maybe_initialize_distributed(), "JAX_* variables did not trigger it"
  builtin.register_builtin_suite()
  task = common.mixture_tasks("builtin_zeroshot_heldout_label_words")[0]
  gin_utils.parse(["quickstart/1_downstream.gin"], [
      "config.t5_config.size = 'tiny'", "BATCH_SIZE = 8", "TRAIN_STEPS = 3",
      f"partitioning.make_mesh.num_partitions = {num_partitions}",
      "optimizers.linear_warmup_decay.warmup_steps = 0", "EVAL_PERIOD = 3",
      "TASK_FEATURE_LENGTHS = {'hyper_inputs': 1, 'inputs': 24, 'targets': 12}",
      f"EVAL_MIXTURE_OR_TASK_NAME = '{task}'", f"MODEL_DIR = '{model_dir}'"])
  out = trainer.train()
  # An array split over all 4 devices, half on each process: jax.device_get fails on it,
  # to_host gathers it (as for parameters split across hosts by model parallelism).
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
  split = jax.make_array_from_callback(
      (8,), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x")),
      lambda index: np.arange(8, dtype=np.float32)[index])
  print(json.dumps({"process_index": jax.process_index(), "losses": out["losses"],
                    "eval": out["eval"], "task": task,
                    "gathered": partitioning.to_host({"w": split})["w"].tolist()}))


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]))
