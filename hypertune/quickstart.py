"""Quickstart: `python -m hypertune.quickstart [--model_dir=DIR] [--gin.MACRO=VALUE ...]`.

On the built-in meta-learning suite (no files, byte vocabulary, 2 CPU cores):
  1. train a small downstream T5 zero-shot on the training families (gin/quickstart/1_*.gin),
  2. freeze it and train HyperT5-Prefix on the same families (2_*.gin),
  3. baseline: fine-tune it with the demonstrations concatenated to the inputs (3_*.gin),
each through the real `hypertune.train` binary, then print held-out results side by side.
Extra `--gin.*` flags are passed to every stage (e.g. `--gin.TRAIN_STEPS=100` for a smoke run).
"""
import glob
import json
import os
import subprocess
import sys
import time

STAGES = (
    ("zero-shot T5 (MTF)", "quickstart/1_downstream.gin", None),
    ("HyperT5-Prefix", "quickstart/2_hypert5.gin", "1"),
    ("few-shot concatenation (MTF-few-shot)", "quickstart/3_fewshot_concat.gin", "1"),
)


def latest_results(run_dir: str) -> dict:
  files = sorted(glob.glob(os.path.join(run_dir, "eval", "results_step*.json")),
                 key=lambda p: int(p.rsplit("step", 1)[1].split(".")[0]))
  if not files:
    raise FileNotFoundError(f"{run_dir}: the run wrote no evaluation results")
  with open(files[-1]) as f:
    return json.load(f)


def summary_rows(results_by_stage):
  """[(stage, accuracy on classification families, exact match on generation families)]."""
  rows = []
  for name, results in results_by_stage:
    avg = results["average"]
    rows.append((name, avg.get("accuracy", float("nan")), avg.get("exact_match", float("nan")),
                 avg.get("rougeL", float("nan"))))
  return rows


def format_table(rows) -> str:
  lines = [f"{'held-out families':40s} {'accuracy':>9s} {'exact match':>12s} {'ROUGE-L':>8s}"]
  lines += [f"{n:40s} {a:9.1f} {e:12.1f} {r:8.1f}" for n, a, e, r in rows]
  return "\n".join(lines)


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  model_dir = "/tmp/hypertune_quickstart"
  for arg in list(argv):
    if arg.startswith("--model_dir="):
      model_dir = arg.split("=", 1)[1]
      argv.remove(arg)
  results = []
  start = time.time()
  for i, (name, gin_file, init_from) in enumerate(STAGES, 1):
    run_dir = os.path.join(model_dir, str(i))
    cmd = [sys.executable, "-m", "hypertune.train", f"--gin_file={gin_file}",
           f"--gin.MODEL_DIR='{run_dir}'"]
    if init_from:
      cmd.append(f"--gin.INITIAL_CHECKPOINT_PATH='{os.path.join(model_dir, init_from)}'")
    print(f"\n=== stage {i}/{len(STAGES)}: {name} -> {run_dir} "
          f"({time.time() - start:.0f}s elapsed)", flush=True)
    subprocess.run(cmd + argv, check=True)
    results.append((name, latest_results(run_dir)))
  table = format_table(summary_rows(results))
  with open(os.path.join(model_dir, "results.txt"), "w") as f:
    f.write(table + "\n")
  print(f"\nquickstart finished in {time.time() - start:.0f}s; held-out results "
        f"({os.path.join(model_dir, 'results.txt')}):\n{table}")


if __name__ == "__main__":
  main()
