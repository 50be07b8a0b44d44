"""Quickstart: `python -m hypertune.quickstart [--model_dir=DIR] [--downstream_checkpoint=PATH]
[--gin.MACRO=VALUE ...]`.

On the built-in meta-learning suite (no files, byte vocabulary, 2 CPU cores), each stage
through the real binaries:
  1. train a tiny downstream T5 on the training families' `inputs` alone (T5-MTF,
     gin/quickstart/1_downstream.gin): the zero-shot baseline;
  2. freeze it and train HyperT5-Prefix over it on the same families (2_hypert5.gin): the
     hypernetwork reads the demonstrations, the frozen model reads `inputs` plus the
     generated prefixes;
  3. fine-tune stage 1's model further with the demonstrations concatenated before `inputs`
     (3_fewshot.gin): the few-shot concatenation baseline;
then evaluate each on the held-out tasks and on new queries of seen tasks (every 20th
training task's validation split), and print a table per held-out subset. Writes
`MODEL_DIR/results.txt` (the table), `results.png` (the table as grouped bars) and `curves.png`
(the training loss of the three stages). Before each stage it prints the run's elapsed time and
an ETA for the whole run. Extra `--gin.*` flags go to every stage (e.g. `--gin.TRAIN_STEPS=100`
for a smoke run, `--gin.SEED=1` for another initialisation).
`--methods=all` also trains, over the same stage-1 model and at HyperT5's budget, HyperT5 with
fusion-in-decoder, HART without and with its consistency loss (HART's Table 5 ladder) and HINT
(docs/hart_hint_builtin.md).
`--downstream_checkpoint=PATH` starts stage 1 from your checkpoint (a Hugging Face T5
directory or a hypertune run) instead of random weights; pass the flags that match it
(`--gin.config.t5_config.size=...`, vocabulary).
"""
import glob
import json
import os
import re
import subprocess
import sys
import time

# Training stages: (table row, run directory, flags; "{model_dir}" is filled in).
STAGES = (
    ("zero-shot T5", "1", ["--gin_file=quickstart/1_downstream.gin"]),
    ("HyperT5-Prefix", "2", ["--gin_file=quickstart/2_hypert5.gin",
                             "--gin.INITIAL_CHECKPOINT_PATH='{model_dir}/1'"]),
    ("few-shot concatenation", "3", ["--gin_file=quickstart/3_fewshot.gin",
                                     "--gin.INITIAL_CHECKPOINT_PATH='{model_dir}/1'"]),
)
# `--methods=all` adds the other methods over the same frozen stage-1 model, at the budget of
# HyperT5-Prefix (docs/hart_hint_builtin.md): HART's Table 5 ladder and HINT.
MORE_STAGES = (
    ("HyperT5 + fusion", "2f", ["--gin_file=quickstart/2_hypert5.gin",
                                "--gin.hypert5.HyperT5.fusion_in_decoder=True",
                                "--gin.INITIAL_CHECKPOINT_PATH='{model_dir}/1'"]),
    ("HART, no consistency", "4a", ["--gin_file=quickstart/2_hart.gin",
                                    "--gin.CONSISTENCY_ALPHA=0.0",
                                    "--gin.INITIAL_CHECKPOINT_PATH='{model_dir}/1'"]),
    ("HART", "4", ["--gin_file=quickstart/2_hart.gin",
                   "--gin.INITIAL_CHECKPOINT_PATH='{model_dir}/1'"]),
    ("HINT", "5", ["--gin_file=quickstart/2_hint.gin",
                   "--gin.INITIAL_CHECKPOINT_PATH='{model_dir}/1'"]),
)
# Seen tasks, new queries (split "validation"): the eval mixture of each run directory; the
# hypernetworks' runs read the demonstrations, as in training.
SEEN = {"1": "builtin_zeroshot_train_sample", "3": "builtin_concat_train_sample"}
SEEN_DEFAULT = "builtin_train_sample"
# (column, task list: a held-out subset, "train_sample" or None = all held-out, metric)
COLUMNS = (
    ("seen acc", "train_sample", "accuracy"),
    ("seen EM", "train_sample", "exact_match"),
    ("families acc", "heldout_families", "accuracy"),
    ("families EM", "heldout_families", "exact_match"),
    ("compos. EM", "heldout_compositions", "exact_match"),
    ("new words acc", "heldout_label_words", "accuracy"),
    ("new words EM", "heldout_label_words", "exact_match"),
    ("held-out acc", None, "accuracy"),
    ("held-out EM", None, "exact_match"),
)

# results.png's group labels for COLUMNS.
PLOT_LABELS = {
    "seen acc": "seen tasks\naccuracy", "seen EM": "seen tasks\nEM",
    "families acc": "held-out families\naccuracy", "families EM": "held-out families\nEM",
    "compos. EM": "compositions\nEM", "new words acc": "new label words\naccuracy",
    "new words EM": "new label words\nEM", "held-out acc": "all held-out\naccuracy",
    "held-out EM": "all held-out\nEM",
}
# Whole-run ETA, in units of one training step: a training stage costs its steps plus
# TRAIN_OVERHEAD_STEPS (start-up, compilation, its evaluation over the held-out tasks), an
# evaluation EVAL_STEPS, whatever the steps (at 4 steps a stage, on 2 shared cores, training
# stages took 50-165 s and evaluations 45-100 s, about 3/4 of a training stage). The ETA is the
# run's own seconds per unit so far times the units left (stage 1, the cheapest per step, makes
# the first of these low); before any stage has finished, PRIOR_SECONDS_PER_STEP: the default
# run's 9:47 on 2 cores over its 1,700 steps + 3 * 400 + 3 * 300 units.
TRAIN_OVERHEAD_STEPS = 400
EVAL_STEPS = 300
PRIOR_SECONDS_PER_STEP = 0.15


def _step_of(path: str) -> int:
  """N of `.../<name>_step<N>.json`."""
  return int(path.rsplit("step", 1)[1].split(".")[0])


def _results_files(run_dir: str, name: str):
  """A run's `eval/<name>_step<N>.json` files, oldest step first."""
  return sorted(glob.glob(os.path.join(run_dir, "eval", f"{name}_step*.json")), key=_step_of)


def latest_results(run_dir: str, name: str = "results") -> dict:
  """The newest `eval/<name>_step<N>.json` of a run."""
  files = _results_files(run_dir, name)
  if not files:
    raise FileNotFoundError(f"{run_dir}: the run wrote no eval/{name}_step*.json")
  with open(files[-1]) as f:
    return json.load(f)


def latest_step(run_dir: str, name: str = "results") -> int:
  """The step of the newest `eval/<name>_step<N>.json` of a run: the steps it trained."""
  return _step_of(_results_files(run_dir, name)[-1])


def subset_lists(seed: int = 0) -> dict:
  """{held-out subset or "train_sample": [source task names]} from the suite's split files."""
  from hypertune.data import builtin_suite  # pylint: disable=g-import-not-at-top
  out = {}
  for subset in builtin_suite.HELDOUT_SUBSETS + ("train_sample",):
    with open(os.path.join(builtin_suite.default_cache_dir(seed), "splits",
                           f"{subset}_tasks.txt")) as f:
      out[subset] = [line.strip() for line in f if line.strip()]
  return out


def summary_rows(results_by_stage, subsets):
  """[(row, [mean of each COLUMNS metric over the subset's tasks, NaN where none])]."""
  rows = []
  for name, results in results_by_stage:
    values = []
    for _, subset, metric in COLUMNS:
      keep = set(subsets[subset]) if subset else set().union(
          *(v for k, v in subsets.items() if k != "train_sample"))
      # Result keys are "<variant>.<source task>", e.g. "builtin_zeroshot.task501_last_n".
      vals = [r[metric] for task, r in results.items()
              if task != "average" and metric in r and
              task.split(".", 1)[-1] in keep]
      values.append(sum(vals) / len(vals) if vals else float("nan"))
    rows.append((name, values))
  return rows


def format_table(rows) -> str:
  width = max(len(n) for n, _ in rows)
  lines = [f"{'':{width}s} " + " ".join(f"{c:>13s}" for c, _, _ in COLUMNS)]
  lines += [f"{n:{width}s} " + " ".join(f"{v:13.1f}" for v in vals) for n, vals in rows]
  return "\n".join(lines)


def parse_args(argv):
  """-> (model_dir, downstream_checkpoint or None, the `--gin.*` flags for every stage,
  whether `--methods=all`)."""
  model_dir, downstream_checkpoint, gin_flags = "/tmp/hypertune_quickstart", None, []
  all_methods = False
  for arg in argv:
    if arg in ("--help", "-h"):
      print(__doc__)
      raise SystemExit(0)
    if arg.startswith("--model_dir="):
      model_dir = arg.split("=", 1)[1]
    elif arg.startswith("--methods="):
      value = arg.split("=", 1)[1]
      if value not in ("default", "all"):
        raise SystemExit(f"quickstart: --methods={value!r}; use 'default' (the 3 rows) or 'all'")
      all_methods = value == "all"
    elif arg.startswith("--downstream_checkpoint="):
      downstream_checkpoint = arg.split("=", 1)[1]
    elif arg.startswith("--gin.INITIAL_CHECKPOINT_PATH"):
      # Every stage gets the flags: stages 2 and 3 would load it instead of stage 1's model.
      raise SystemExit("quickstart: INITIAL_CHECKPOINT_PATH is set per stage; pass "
                       "--downstream_checkpoint=PATH to start the downstream model from yours")
    elif arg.startswith("--gin.") or arg.startswith("--gin_file=") or arg.startswith(
        "--gin_search_paths="):
      gin_flags.append(arg)
    else:
      raise SystemExit(f"quickstart: unknown argument {arg!r}; use --model_dir=DIR, "
                       "--downstream_checkpoint=PATH, --methods=all or --gin.NAME=VALUE")
  return model_dir, downstream_checkpoint, gin_flags, all_methods


def planned_steps(flags, gin_flags) -> int:
  """TRAIN_STEPS of a stage: the last `--gin.TRAIN_STEPS=N` of `gin_flags`, else its gin file's
  `TRAIN_STEPS = N` (0 where neither sets it: the ETA then counts only its overhead). For the
  ETA only: a `--gin_file` of the user's that sets TRAIN_STEPS is not read."""
  for flag in reversed(gin_flags):
    if flag.startswith("--gin.TRAIN_STEPS="):
      return int(flag.split("=", 1)[1].strip("'\""))
  from hypertune import gin_utils  # pylint: disable=g-import-not-at-top
  for flag in flags:
    if flag.startswith("--gin_file="):
      with open(os.path.join(gin_utils.REPO_GIN_DIR, flag.split("=", 1)[1])) as f:
        found = re.findall(r"^TRAIN_STEPS\s*=\s*(\d+)", f.read(), re.MULTILINE)
      if found:
        return int(found[-1])
  return 0


def format_clock(seconds: float) -> str:
  """M:SS (minutes past 59 stay minutes: 75:03)."""
  minutes, secs = divmod(int(round(max(seconds, 0.0))), 60)
  return f"{minutes}:{secs:02d}"


def whole_run_eta(weights, done: int, elapsed: float):
  """(seconds left for the whole run, whether from the prior): `weights` are the stages' costs
  in training steps (see TRAIN_OVERHEAD_STEPS), the first `done` of them finished."""
  done_weight = sum(weights[:done])
  if done == 0 or done_weight <= 0 or elapsed <= 0:
    return PRIOR_SECONDS_PER_STEP * sum(weights), True
  return elapsed / done_weight * sum(weights[done:]), False


def stage_line(i: int, weights, name: str, elapsed: float) -> str:
  """The line "stage i/n: <name> — elapsed M:SS, ETA for the whole run M:SS" (i from 1)."""
  eta, prior = whole_run_eta(weights, i - 1, elapsed)
  return (f"stage {i}/{len(weights)}: {name} — elapsed {format_clock(elapsed)}, ETA for the "
          f"whole run {format_clock(eta)}" + (" (prior estimate)" if prior else ""))


def write_plots(model_dir: str, rows, stages) -> list:
  """`results.png` (the table as grouped bars) and `curves.png` (each stage's training loss)
  in `model_dir`; `stages`: [(row, run directory)]. Returns their paths."""
  from hypertune import plot  # pylint: disable=g-import-not-at-top
  from hypertune.data import builtin_suite  # pylint: disable=g-import-not-at-top
  suite = f"built-in suite v{builtin_suite.SUITE_VERSION}"
  steps = ", ".join(f"{name} {latest_step(run_dir):,d}" for name, run_dir in stages)
  results = plot.plot_results(
      rows, [PLOT_LABELS.get(c, c) for c, _, _ in COLUMNS],
      os.path.join(model_dir, "results.png"),
      title=f"Quickstart, {suite}; training steps: {steps}", ylabel="% (mean over tasks)")
  curves = plot.plot_runs([run_dir for _, run_dir in stages],
                          os.path.join(model_dir, "curves.png"),
                          labels=[name for name, _ in stages], with_eval=False,
                          title=f"Quickstart training loss, {suite}")
  return [results, curves]


def stage_flags(model_dir: str, downstream_checkpoint=None, all_methods: bool = False):
  """[(row, run directory, flags)] of the training stages; stage 1 starts from
  `downstream_checkpoint` (a Hugging Face T5 directory or a hypertune run) when given."""
  out = []
  for i, (name, run_name, flags) in enumerate(STAGES + (MORE_STAGES if all_methods else ())):
    flags = [f.format(model_dir=model_dir) for f in flags]
    if i == 0 and downstream_checkpoint:
      flags.append(f"--gin.INITIAL_CHECKPOINT_PATH='{downstream_checkpoint}'")
    out.append((name, os.path.join(model_dir, run_name), flags))
  return out


def main(argv=None):
  model_dir, downstream_checkpoint, gin_flags, all_methods = parse_args(
      list(sys.argv[1:] if argv is None else argv))
  results = []
  start = time.time()
  stages = stage_flags(model_dir, downstream_checkpoint, all_methods)
  # Cost of each training stage and each seen-task evaluation in training steps, for the ETA.
  weights = [planned_steps(flags, gin_flags) + TRAIN_OVERHEAD_STEPS for _, _, flags in stages]
  weights += [EVAL_STEPS] * len(stages)

  # One persistent compilation cache for the stages: the seen-task evaluations (and the
  # --methods=all stages) reuse what earlier stages compiled.
  env = dict(os.environ)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(model_dir, "jax_cache"))
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

  def run(i, name, run_dir, binary, flags):
    cmd = [sys.executable, "-m", f"hypertune.{binary}", f"--gin.MODEL_DIR='{run_dir}'"] + flags
    print(f"\n{stage_line(i, weights, name, time.time() - start)} ({binary}, {run_dir})",
          flush=True)
    subprocess.run(cmd + gin_flags, check=True, env=env)

  for i, (name, run_dir, flags) in enumerate(stages, 1):
    run(i, name, run_dir, "train", flags)
    results.append((name, latest_results(run_dir)))
  for i, ((name, run_dir, _), (_, row)) in enumerate(zip(stages, results), len(stages) + 1):
    mixture = SEEN.get(os.path.basename(run_dir), SEEN_DEFAULT)
    run(i, f"{name}, seen tasks", run_dir, "eval",
        [f"--gin.EVAL_MIXTURE_OR_TASK_NAME='{mixture}'",
         "--gin.evaluate_checkpoint.split='validation'"])
    row.update(latest_results(run_dir, f"{mixture}_validation"))
  rows = summary_rows(results, subset_lists())
  table = format_table(rows)
  with open(os.path.join(model_dir, "results.txt"), "w") as f:
    f.write(table + "\n")
  pngs = write_plots(model_dir, rows, [(name, run_dir) for name, run_dir, _ in stages])
  print(f"\nquickstart finished in {format_clock(time.time() - start)}; held-out results in % "
        f"({os.path.join(model_dir, 'results.txt')}; plots: {', '.join(pngs)}):\n{table}")


if __name__ == "__main__":
  main()
