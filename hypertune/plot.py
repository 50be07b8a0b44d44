"""Plots of training runs: `python -m hypertune.plot MODEL_DIR [MODEL_DIR ...] [--out curves.png]`
(console script `hypertune-plot`).

Draws the training loss against the step, one line per run labelled by its directory name, from
`MODEL_DIR/train/metrics.jsonl` (`hypertune.progress`; runs older than that file: their
TensorBoard events in `MODEL_DIR/train`), and, where the runs wrote `eval/results_step*.json`,
each metric of the evaluation average against the step. `plot_results` draws the quickstart's
table as grouped bars. Figures are drawn with matplotlib's headless Agg canvas; pyplot (and
its global backend) is never touched, so this works without a display.
"""
import argparse
import glob
import json
import math
import os
import struct
import sys

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, MaxNLocator

from hypertune import progress

__all__ = ["train_curve", "eval_curves", "plot_runs", "plot_results", "main"]


def _tensorboard_scalars(logdir: str, tag: str):
  """[(step, value)] of scalar `tag` in the tensorboardX event files of `logdir`."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    # TFRecord framing: 8-byte length, its 4-byte CRC, the record, the record's 4-byte CRC.
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      out += [(event.step, v.simple_value) for v in event.summary.value if v.tag == tag]
  return out


def train_curve(run_dir: str, metric: str = "loss"):
  """([step], [value]) of a training metric, one point per log line, sorted by step."""
  records = progress.read_metrics_jsonl(run_dir)
  if records:
    points = [(r["step"], r[metric]) for r in records if metric in r]
  else:
    # The last value per step, as for metrics.jsonl: a resumed run logs some steps twice.
    points = sorted(dict(_tensorboard_scalars(os.path.join(run_dir, "train"), metric)).items())
  return [s for s, _ in points], [v for _, v in points]


def _results_step(path: str) -> int:
  return int(path.rsplit("step", 1)[1].split(".")[0])


def eval_curves(run_dir: str, name: str = "results"):
  """{metric: ([step], [value])} of the average in each `eval/<name>_step<N>.json`; the
  average's `<metric>/num_tasks` counts are left out (they are not scores)."""
  curves = {}
  for path in sorted(glob.glob(os.path.join(run_dir, "eval", f"{name}_step*.json")),
                     key=_results_step):
    with open(path) as f:
      average = json.load(f).get("average", {})
    for metric, value in average.items():
      if not metric.endswith("/num_tasks"):
        steps, values = curves.setdefault(metric, ([], []))
        steps.append(_results_step(path))
        values.append(value)
  return curves


def run_labels(run_dirs):
  """Each run's directory name, or the path as given where two runs share a name."""
  names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
  return [n if names.count(n) == 1 else d for n, d in zip(names, run_dirs)]


def _save(fig: Figure, out: str) -> str:
  """Writes `fig` to `out` (its folder made as needed); returns `out`."""
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  FigureCanvasAgg(fig)  # binds the Agg canvas: PNG output with no display
  fig.savefig(out, dpi=110)
  return out


def _integer_steps(ax) -> None:
  """Whole-step ticks, with room for at least 2 of them: a tiny run's single log line at step 4
  otherwise gets ticks 3.80 ... 4.20."""
  lo, hi = ax.get_xlim()
  if hi - lo < 2:
    ax.set_xlim((lo + hi) / 2 - 1, (lo + hi) / 2 + 1)
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_runs(run_dirs, out: str, labels=None, title: str = "", with_eval: bool = True,
              metric: str = "loss") -> str:
  """Writes `out` (PNG): a training metric (the loss; e.g. "cross_entropy" leaves a method's
  auxiliary losses out) vs step per run and, where any run has `eval/results_step*.json` and
  `with_eval`, each evaluation average vs step. Returns `out`."""
  labels = list(labels or run_labels(run_dirs))
  curves = [train_curve(d, metric) for d in run_dirs]
  evals = [eval_curves(d) for d in run_dirs] if with_eval else [{} for _ in run_dirs]
  with_eval = any(evals)
  fig = Figure(figsize=(12 if with_eval else 7, 4.5), layout="constrained")
  axes = fig.subplots(1, 2 if with_eval else 1, squeeze=False)[0]
  colors = [f"C{i % 10}" for i in range(len(run_dirs))]
  ax = axes[0]
  for (steps, losses), label, color in zip(curves, labels, colors):
    # A run with a single log line (tiny runs) is still visible as a marker.
    ax.plot(steps, losses, marker="o" if len(steps) < 20 else None, label=label, color=color)
  # One panel under a figure title needs no title of its own.
  name = "training loss" if metric == "loss" else f"training {metric}"
  ax.set(xlabel="step", ylabel=name, title="" if title and not with_eval else name)
  _integer_steps(ax)
  positive = [v for _, losses in curves for v in losses if v > 0]
  if positive and max(positive) > 10 * min(positive):
    ax.set_yscale("log")  # losses fall by orders of magnitude: linear hides the late steps
    for set_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
      set_formatter(FormatStrFormatter("%g"))  # 0.3, not 3 x 10^-1
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  if with_eval:
    _plot_evals(axes[1], evals, labels, colors)
  if title:
    fig.suptitle(title)
  return _save(fig, out)


def _plot_evals(ax, evals, labels, colors) -> None:
  """One line per (run, average metric); a marker style per metric, the run's colour."""
  metrics = sorted({m for e in evals for m in e})
  markers = dict(zip(metrics, "osD^v<>ph*"))
  for curves, label, color in zip(evals, labels, colors):
    for metric, (steps, values) in sorted(curves.items()):
      ax.plot(steps, values, marker=markers.get(metric, "o"), color=color,
              label=f"{label}: {metric}")
  ax.set(xlabel="step", ylabel="evaluation average", title="evaluation average")
  _integer_steps(ax)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)


def plot_results(rows, columns, out: str, title: str = "", ylabel: str = "%") -> str:
  """Writes `out` (PNG): grouped bars, one group per column, one bar per row (model), each
  labelled with its value ("n/a" where the column has no tasks of its metric).

  Args:
    rows: [(model name, [value per column])], e.g. `quickstart.summary_rows(...)`.
    columns: group labels, one per value.
    out: the PNG path; returned.
  """
  fig = Figure(figsize=(max(8.0, 2.0 + 0.45 * len(columns) * max(len(rows), 1)), 5),
               layout="constrained")
  ax = fig.subplots()
  width = 0.8 / max(len(rows), 1)
  for i, (name, values) in enumerate(rows):
    xs = [c + (i - (len(rows) - 1) / 2) * width for c in range(len(columns))]
    heights = [0.0 if math.isnan(v) else v for v in values]
    bars = ax.bar(xs, heights, width, label=name, color=f"C{i % 10}")
    ax.bar_label(bars, labels=["n/a" if math.isnan(v) else f"{v:.1f}" for v in values],
                 fontsize=7, padding=2)
  ax.set_xticks(range(len(columns)), columns, fontsize=8)
  ax.set_ylabel(ylabel)
  top = max([v for _, values in rows for v in values if not math.isnan(v)] + [1.0])
  ax.set_ylim(0, top * 1.08)  # room for the value labels above the tallest bar
  # Below the axes, so no legend hides a bar.
  fig.legend(loc="outside lower center", ncols=max(len(rows), 1), fontsize=9)
  ax.grid(axis="y", alpha=0.3)
  if title:
    ax.set_title(title)
  return _save(fig, out)


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog="hypertune-plot",
      description="Training loss vs step (one line per run, labelled by its directory name) "
                  "and, where runs have eval/results_step*.json, the evaluation average vs step.")
  parser.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR", help="run directories")
  parser.add_argument("--out", default="curves.png", help="PNG to write (default: curves.png)")
  parser.add_argument("--title", default="", help="figure title")
  parser.add_argument("--metric", default="loss",
                      help="training metric to draw (default: loss; e.g. cross_entropy)")
  return parser.parse_args(argv)


def main(argv=None) -> None:
  """The CLI; returns None, as a console script's exit status is main()'s return value."""
  args = parse_args(sys.argv[1:] if argv is None else argv)
  for d in args.model_dirs:
    if not os.path.isdir(d):
      raise SystemExit(f"hypertune-plot: no such run directory: {d}")
    if not train_curve(d, args.metric)[0] and not eval_curves(d):
      raise SystemExit(f"hypertune-plot: {d} has no train/metrics.jsonl, TensorBoard training "
                       "loss or eval/results_step*.json to plot")
  print(f"wrote {plot_runs(args.model_dirs, args.out, title=args.title, metric=args.metric)}")


if __name__ == "__main__":
  main()
