"""hypertune.plot: training curves of run directories, the quickstart's bar chart, the CLI."""
import subprocess
import sys

import matplotlib.image
import pytest

from hypertune import evaluation, plot, progress

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_width=300):
  """`path` is a non-empty PNG that decodes to an image at least `min_width` pixels wide."""
  data = path.read_bytes()
  assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, (path, len(data))
  height, width = matplotlib.image.imread(str(path)).shape[:2]
  assert width >= min_width and height >= 200, (width, height)


def tiny_run(run_dir, losses, eval_steps=(), jsonl=True):
  """A run directory as hypertune.train leaves it: progress logs every 2 steps (metrics.jsonl
  or only TensorBoard events) and eval/results_step<N>.json at `eval_steps`."""
  log = progress.ProgressLogger(str(run_dir), total_steps=len(losses), log_every_steps=2,
                                write_jsonl=jsonl, print_fn=lambda _: None)
  for step, loss in enumerate(losses, 1):
    log.update(step, {"loss": loss, "cross_entropy": loss / 2}, num_tokens=64,
               learning_rate=1e-3)
  log.close()
  for step in eval_steps:
    evaluation.write_results(str(run_dir), step, {
        "average": {"accuracy": 10.0 * step, "accuracy/num_tasks": 3},
        "builtin.task1_last_n": {"accuracy": 10.0 * step}})
  return run_dir


def test_curves_of_tiny_runs_with_and_without_evaluations(tmp_path):
  a = tiny_run(tmp_path / "run_a", [4.0, 3.0, 2.0, 1.0], eval_steps=(2, 4))
  b = tiny_run(tmp_path / "run_b", [5.0, 5.0, 4.0, 2.0], jsonl=False)  # TensorBoard only
  # Each log line is the mean over its 2 steps.
  assert plot.train_curve(str(a)) == ([2, 4], [3.5, 1.5])
  assert plot.train_curve(str(b)) == ([2, 4], [5.0, 3.0])
  assert plot.eval_curves(str(a)) == {"accuracy": ([2, 4], [20.0, 40.0])}  # no num_tasks
  assert plot.eval_curves(str(b)) == {}
  out = tmp_path / "plots" / "curves.png"
  plot.main([str(a), str(b), "--out", str(out)])
  assert_png(out, min_width=1000)  # two panels: loss and evaluation average
  loss_only = tmp_path / "loss.png"
  plot.plot_runs([str(b)], str(loss_only))
  assert_png(loss_only)
  # Another training metric (a method's loss without its auxiliary terms).
  assert plot.train_curve(str(a), "cross_entropy") == ([2, 4], [1.75, 0.75])
  plot.main([str(a), "--metric", "cross_entropy", "--out", str(tmp_path / "ce.png")])
  assert_png(tmp_path / "ce.png", min_width=1000)


def test_labels_are_directory_names_unless_two_runs_share_one():
  assert plot.run_labels(["/r/a/", "/r/b"]) == ["a", "b"]
  assert plot.run_labels(["/x/run", "/y/run", "/y/c"]) == ["/x/run", "/y/run", "c"]


def test_results_bars_from_a_fake_table(tmp_path):
  rows = [("zero-shot T5", [10.0, float("nan"), 55.5]),
          ("HyperT5-Prefix", [20.0, 5.0, 60.0]),
          ("few-shot concatenation", [0.0, 12.5, 100.0])]
  out = tmp_path / "results.png"
  plot.plot_results(rows, ["seen tasks\nEM", "compositions\nEM", "all held-out\naccuracy"],
                    str(out), title="Quickstart, built-in suite v10; training steps: 4")
  assert_png(out)


def test_missing_directory_is_a_one_line_error_naming_it(tmp_path):
  missing = tmp_path / "no_such_run"
  with pytest.raises(SystemExit, match=f"no such run directory: {missing}$"):
    plot.main([str(missing)])
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(SystemExit, match=f"{empty} has no train/metrics.jsonl"):
    plot.main([str(empty)])
  out = subprocess.run([sys.executable, "-m", "hypertune.plot", str(missing)],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines() == [f"hypertune-plot: no such run directory: {missing}"]


def test_help():
  out = subprocess.run([sys.executable, "-m", "hypertune.plot", "--help"],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert "MODEL_DIR" in out.stdout and "--out" in out.stdout
