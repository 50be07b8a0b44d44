"""The quickstart (the README's main job): its summary table, and a reduced end-to-end run."""
import json
import math
import re
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
  model_dir, ckpt, flags, all_methods = quickstart.parse_args(
      ["--model_dir=/runs/q", "--downstream_checkpoint=/ckpt/t5", "--gin.TRAIN_STEPS=4"])
  assert (model_dir, ckpt, flags) == ("/runs/q", "/ckpt/t5", ["--gin.TRAIN_STEPS=4"])
  assert not all_methods
  stages = quickstart.stage_flags(model_dir, ckpt)
  assert [s[1] for s in stages] == ["/runs/q/1", "/runs/q/2", "/runs/q/3"]
  starts = [[f for f in s[2] if "INITIAL_CHECKPOINT_PATH" in f] for s in stages]
  assert starts == [["--gin.INITIAL_CHECKPOINT_PATH='/ckpt/t5'"],
                    ["--gin.INITIAL_CHECKPOINT_PATH='/runs/q/1'"],
                    ["--gin.INITIAL_CHECKPOINT_PATH='/runs/q/1'"]]
  assert not [f for f in quickstart.stage_flags("/runs/q")[0][2] if "INITIAL" in f]
  # --methods=all: the other methods also start from stage 1's model, each in its own run.
  more = quickstart.stage_flags("/runs/q", all_methods=True)
  assert [s[0] for s in more[3:]] == [s[0] for s in quickstart.MORE_STAGES]
  assert len({s[1] for s in more}) == len(more)
  assert all("--gin.INITIAL_CHECKPOINT_PATH='/runs/q/1'" in s[2] for s in more[1:])
  assert quickstart.parse_args(["--methods=all"])[3]


def test_stage_lines_show_elapsed_time_and_an_eta_for_the_whole_run():
  weights = [100, 300, 100]
  # Nothing finished: the prior, 0.15 s per unit of 500.
  assert quickstart.stage_line(1, weights, "zero-shot T5", 0.0) == (
      "stage 1/3: zero-shot T5 — elapsed 0:00, ETA for the whole run 1:15 (prior estimate)")
  # The run's own pace, weighted by the stages' steps: 50 s for 100 units, 400 left.
  assert quickstart.stage_line(2, weights, "HyperT5-Prefix", 50.0) == (
      "stage 2/3: HyperT5-Prefix — elapsed 0:50, ETA for the whole run 3:20")
  assert quickstart.stage_line(3, weights, "eval", 4503.0).endswith(
      "elapsed 75:03, ETA for the whole run 18:46")  # 4503 s / 400 units * 100


def test_planned_steps_come_from_the_flags_or_the_stage_gin_file(tmp_path):
  gin_file = tmp_path / "stage.gin"
  gin_file.write_text("include 'quickstart.gin'\nTRAIN_STEPS = 77\n# TRAIN_STEPS = 5\n")
  flags = [f"--gin_file={gin_file}"]
  assert quickstart.planned_steps(flags, []) == 77
  assert quickstart.planned_steps(flags, ["--gin.TRAIN_STEPS=9", "--gin.TRAIN_STEPS='4'"]) == 4
  assert quickstart.planned_steps([], []) == 0
  # The quickstart's own stage files all set their steps.
  assert all(quickstart.planned_steps(f, []) > 0 for _, _, f in quickstart.stage_flags("/q"))


def test_quickstart_help_prints_its_usage(capsys):
  with pytest.raises(SystemExit) as exit_info:
    quickstart.parse_args(["--help"])
  assert exit_info.value.code == 0 and "--model_dir" in capsys.readouterr().out


@pytest.mark.parametrize("arg, message", [
    ("--gin.INITIAL_CHECKPOINT_PATH='/x'", "--downstream_checkpoint"),
    ("--steps=3", "unknown argument '--steps=3'"),
    ("--methods=some", "--methods='some'; use 'default'"),
])
def test_bad_quickstart_arguments_are_named(arg, message):
  with pytest.raises(SystemExit, match=message):
    quickstart.parse_args([arg])


@pytest.mark.slow
def test_quickstart_end_to_end_at_reduced_steps(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "hypertune.quickstart", f"--model_dir={tmp_path}",
       "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=4", "--gin.config.t5_config.size='tiny'",
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
  for name in ("results.png", "curves.png"):
    png = (tmp_path / name).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000, name
  # Every stage's log lines are in train/metrics.jsonl (what curves.png is drawn from).
  for _, run_dir, _ in quickstart.stage_flags(str(tmp_path)):
    records = [json.loads(l) for l in open(f"{run_dir}/train/metrics.jsonl")]
    assert records[-1]["step"] == 2 and math.isfinite(records[-1]["loss"])
  # Overall progress before each of the 6 stages; the first from the prior.
  stage_lines = re.findall(r"^stage (\d)/6: .+ — elapsed \d+:\d\d, ETA for the whole run "
                           r"\d+:\d\d( \(prior estimate\))?", out.stdout, re.MULTILINE)
  assert stage_lines == [("1", " (prior estimate)")] + [(str(i), "") for i in range(2, 7)]
  # Counts print as integers in the training progress lines.
  logged = out.stdout + out.stderr
  assert "step 2/2 | " in logged and re.search(r"\| num_tokens \d[\d,]* \|", logged)
  assert not re.search(r"num_tokens \d+\.\d", logged)
