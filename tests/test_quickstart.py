"""The quickstart (the README's main job): its summary table, and a reduced end-to-end run."""
import math
import subprocess
import sys

import pytest

from hypertune import quickstart


def test_summary_rows_average_each_subset_and_metric():
  subsets = {"heldout_families": ["task1_last_n", "task2_last_letter"],
             "heldout_compositions": ["task3_a_then_b"],
             "heldout_label_words": ["task4_contains"],
             "train_sample": ["task0_letter_word"]}
  results = {"average": {"accuracy": 99.0},
             "builtin_zeroshot.task0_letter_word": {"accuracy": 90.0},
             "builtin_zeroshot.task1_last_n": {"exact_match": 10.0, "rougeL": 10.0},
             "builtin_zeroshot.task2_last_letter": {"accuracy": 60.0},
             "builtin_zeroshot.task3_a_then_b": {"exact_match": 30.0, "rougeL": 40.0},
             "builtin_zeroshot.task4_contains": {"accuracy": 80.0, "exact_match": 50.0}}
  [(name, values)] = quickstart.summary_rows([("zero-shot", results)], subsets)
  by_column = dict(zip([c for c, _, _ in quickstart.COLUMNS], values))
  assert name == "zero-shot"
  assert by_column["seen acc"] == 90.0 and math.isnan(by_column["seen EM"])
  assert by_column["families acc"] == 60.0 and by_column["families EM"] == 10.0
  assert by_column["compos. EM"] == 30.0 and by_column["new words acc"] == 80.0
  assert by_column["new words EM"] == 50.0
  # Held-out averages leave the seen tasks out.
  assert by_column["held-out acc"] == 70.0 and by_column["held-out EM"] == 30.0
  table = quickstart.format_table([(name, values)])
  assert table.splitlines()[1].split()[1:4] == ["90.0", "nan", "60.0"]


def test_downstream_checkpoint_starts_stage_one_only():
  """A user's checkpoint initialises the downstream model; HyperT5 and the concatenation
  baseline still start from stage 1's result, and gin flags reach every stage."""
  model_dir, ckpt, flags = quickstart.parse_args(
      ["--model_dir=/runs/q", "--downstream_checkpoint=/ckpt/t5", "--gin.TRAIN_STEPS=4"])
  assert (model_dir, ckpt, flags) == ("/runs/q", "/ckpt/t5", ["--gin.TRAIN_STEPS=4"])
  stages = quickstart.stage_flags(model_dir, ckpt)
  assert [s[1] for s in stages] == ["/runs/q/1", "/runs/q/2", "/runs/q/3"]
  starts = [[f for f in s[2] if "INITIAL_CHECKPOINT_PATH" in f] for s in stages]
  assert starts == [["--gin.INITIAL_CHECKPOINT_PATH='/ckpt/t5'"],
                    ["--gin.INITIAL_CHECKPOINT_PATH='/runs/q/1'"],
                    ["--gin.INITIAL_CHECKPOINT_PATH='/runs/q/1'"]]
  assert not [f for f in quickstart.stage_flags("/runs/q")[0][2] if "INITIAL" in f]


@pytest.mark.parametrize("arg, message", [
    ("--gin.INITIAL_CHECKPOINT_PATH='/x'", "--downstream_checkpoint"),
    ("--steps=3", "unknown argument '--steps=3'"),
])
def test_bad_quickstart_arguments_are_named(arg, message):
  with pytest.raises(SystemExit, match=message):
    quickstart.parse_args([arg])


@pytest.mark.slow
def test_quickstart_end_to_end_at_reduced_steps(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "hypertune.quickstart", f"--model_dir={tmp_path}",
       "--gin.TRAIN_STEPS=4", "--gin.BATCH_SIZE=8", "--gin.config.t5_config.size='tiny'",
       "--gin.PREFIX_LEN=2", "--gin.optimizers.linear_warmup_decay.warmup_steps=0"],
      capture_output=True, text=True, timeout=1500)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = (tmp_path / "results.txt").read_text().splitlines()
  assert [l.split("  ")[0] for l in lines[1:]] == [s[0] for s in quickstart.STAGES]
  for line in lines[1:]:
    values = [float(v) for v in line.rsplit(None, len(quickstart.COLUMNS))[1:]]
    assert all(0.0 <= v <= 100.0 for v in values if not math.isnan(v))
    assert not any(math.isnan(v) for v in values)  # every column has tasks of its metric
  assert "held-out results" in out.stdout
