"""Evaluation data: one tf.data pipeline per task against one for a whole mixture.

Builds and reads every evaluation batch of a mixture's tasks both ways with
`hypertune.data.eval_batches.get_eval_batches` (per task: `[task]` at a time, as seqio's
per-task datasets are built; together: all tasks at once), for generation rows and for
rank-classification rows, checks that the rows are the same, and prints seconds and the
ratio `per task / together`, measured in one run (alternating, median of `--repeats`).

Run (from the repository root):

    .venv/bin/python bench/eval_batches.py                              # built-in held-out tasks
    .venv/bin/python bench/eval_batches.py --mixture builtin_zeroshot_train_sample --split validation
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mixture", default="builtin_heldout")
  parser.add_argument("--split", default="test")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)

  import numpy as np  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  from hypertune.data import eval_batches  # pylint: disable=g-import-not-at-top
  from tasks import builtin, common  # pylint: disable=g-import-not-at-top

  lengths = {"hyper_inputs": 80, "inputs": 16, "targets": 16}
  builtin.register_builtin_suite(k=4, task_feature_lengths=lengths)
  tasks = [seqio.get_mixture_or_task(n) for n in common.mixture_tasks(args.mixture)]

  def read(task_lists, score_choices):
    rows = []
    for task_list in task_lists:
      for batch in eval_batches.get_eval_batches(task_list, args.split, args.batch_size, lengths,
                                                 score_choices=score_choices).as_numpy_iterator():
        rows.append(batch["encoder_input_tokens"])
    return np.concatenate(rows)

  ways = {"per task": [[t] for t in tasks], "together": [tasks]}
  times = {(way, s): [] for way in ways for s in (False, True)}
  for _ in range(args.repeats):
    for score_choices in (False, True):
      outputs = {}
      for way, task_lists in ways.items():
        start = time.perf_counter()
        outputs[way] = read(task_lists, score_choices)
        times[(way, score_choices)].append(time.perf_counter() - start)
      assert (outputs["per task"] == outputs["together"]).all(), "the two ways differ"
  print(f"{len(tasks)} tasks of {args.mixture} ({args.split}), batch {args.batch_size}, "
        f"median of {args.repeats}:")
  for score_choices, rows in ((False, "generation rows"), (True, "rank-classification rows")):
    per_task, together = (statistics.median(times[(w, score_choices)]) for w in ways)
    print(f"  {rows:25s} per task {per_task:6.2f} s   together {together:6.2f} s   "
          f"ratio {per_task / together:5.1f}x")


if __name__ == "__main__":
  main()
