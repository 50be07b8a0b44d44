"""Scaling of a HyperT5-Prefix train step: time and memory as hyper length, shots and depth grow.

Three sweeps, each growing one thing with the others fixed:

- hyper length: `hyper_inputs` tokens `L` (default 64 .. 1024) at `--base_layers` (2) layers;
- shots: `K` demonstrations of `--demo_len` tokens each in the hyper input, `L = K * demo_len`
  (default K = 1 .. 8 of 96 tokens), at `--base_layers` layers;
- layers: `num_encoder_layers = num_decoder_layers` of the T5 (the downstream and the
  hypernetwork's backbone, which share one config; the prefix heads write `[layers, P, ...]`)
  at `--base_hyper_len` hyper tokens.

Each point is the model `gin/models/hypert5_prefix.gin` builds (`HyperModel(t5_config(size),
hypernet=HyperT5(peft_type="prefix"))`, the downstream frozen with `frozen_patterns=
["downstream/.*"]`; `--train_downstream` trains it too, HyperT5+) and the project's one train
step, `train_lib.train_step`, jitted as `PartitionedTrainer.step_fn` jits it (one-device mesh,
state donated, AdamW), on random tokens without padding (exact lengths). Per point:

- step time: `--warmup` untimed steps, then `--steps` steps each timed to `block_until_ready`;
  the table shows their median and min; the fits and the plot use `--time_stat` (default min:
  on a machine shared with other work the least-disturbed step is the better estimate);
- memory: XLA's memory analysis of the compiled step, `temp + argument` bytes (temp: saved
  activations, gradients, the update's intermediates; arguments: parameters, optimizer state,
  batch), for the backend it runs on (on CPU: the CPU compiler's buffer assignment);
- model FLOPs: `hypertune.flops` (2 per multiply-add, attention products included) of the
  hypernetwork's forward over the L tokens (`hypert5_prefix_flops`) and the downstream's over
  the query with P prefixes (`query_flops`); the backward pass counted as twice the forward for
  what trains and once for the frozen downstream (activation gradients, no weight gradients).
  Not XLA's `cost_analysis()`: it counts a scanned layer stack's loop body once, whatever the
  depth.

Points that are the same program (same hyper length and depth; e.g. where a sweep crosses
another's fixed point) are measured once. For every sweep and metric the exponent is the
least-squares slope of log(y) on log(x); the local slopes between neighbouring points show
where it bends. For the hyper-length and shots sweeps a non-negative fit `y = a + b x + c x^2`
also gives the share of the last point's cost that is quadratic (the hyper encoder's
self-attention scores `[batch, heads, L, L]`).

Run (from the repository root):

    .venv/bin/python bench/scaling.py                       # t5-mini shape, CPU: ~10 min
    .venv/bin/python bench/scaling.py --size small --hyper_lens 128,256,512 --layers 2,4,8
    .venv/bin/python bench/scaling.py --quick --out /tmp/s  # tiny, 2 points a sweep, seconds

`--out DIR` writes `DIR/scaling.png` (log-log, time and memory panels) and `DIR/scaling.json`;
`--replot DIR/scaling.json` refits and redraws a saved run (its measured times and bytes; the
model FLOPs and `--time_stat` as now) without measuring anything.
`--xla_flags` is appended to `XLA_FLAGS` before JAX is imported.
"""
import argparse
import functools
import json
import os
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

FROZEN_PATTERNS = ("downstream/.*",)
QUICK = dict(size="tiny", vocab=256, batch=2, inputs_len=16, targets_len=4, prefix_len=4,
             hyper_lens="16,32", demo_len=16, shots="1,2", layers="1,2", base_layers=2,
             base_hyper_len=16, steps=2, warmup=1)
# A slope within this much of 1 counts as linear (timing noise on a shared machine is ~10%).
LINEAR_TOLERANCE = 0.15


def _ints(p, name, text):
  try:
    values = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    p.error(f"--{name} must be comma-separated integers, got {text!r}")
  if len(values) < 2 or any(v < 1 for v in values) or sorted(set(values)) != values:
    p.error(f"--{name} must be at least 2 increasing integers >= 1, got {text!r}")
  return values


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--size", default="mini", help="t5_config size (tiny, mini, small, base, ...)")
  p.add_argument("--vocab", type=int, default=512,
                 help="vocab_size (small by default: the logits are a fixed cost of every point)")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--inputs_len", type=int, default=64, help="query tokens (fixed)")
  p.add_argument("--targets_len", type=int, default=16, help="target tokens (fixed)")
  p.add_argument("--prefix_len", type=int, default=16, help="P (gin/models/hypert5_prefix.gin)")
  p.add_argument("--hyper_lens", default="64,128,256,512,1024", help="hyper-length sweep")
  p.add_argument("--demo_len", type=int, default=96, help="tokens per demonstration (shots)")
  p.add_argument("--shots", default="1,2,4,8", help="shots sweep: K demonstrations")
  p.add_argument("--layers", default="1,2,4,8", help="depth sweep (encoder = decoder layers)")
  p.add_argument("--base_layers", type=int, default=2,
                 help="depth of the length and shots sweeps (0: the size's own)")
  p.add_argument("--base_hyper_len", type=int, default=256, help="hyper length of the depth sweep")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                 help="T5Config.dtype (compute dtype; parameters stay float32)")
  p.add_argument("--remat", action="store_true", help="T5Config.remat: rematerialise layers")
  p.add_argument("--train_downstream", action="store_true",
                 help="train the downstream T5 too (HyperT5+); default: frozen, as the gin file")
  p.add_argument("--steps", type=int, default=5, help="timed steps per point")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps after compile")
  p.add_argument("--time_stat", default="min", choices=["min", "median", "cpu"],
                 help="which step time the fits and the plot use: the min or median wall-clock "
                      "seconds, or the median process CPU seconds (all threads; on CPU only)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="directory for scaling.png and scaling.json")
  p.add_argument("--replot", default=None,
                 help="a saved scaling.json: refit, print and (with --out) redraw it, no runs")
  p.add_argument("--xla_flags", default="", help="extra XLA_FLAGS (set before importing jax)")
  p.add_argument("--quick", action="store_true",
                 help="tiny size, 2 points a sweep, 2 steps: runs in seconds, measures nothing")
  args = p.parse_args(argv)
  if args.quick:
    for k, v in QUICK.items():
      setattr(args, k, v)
  args.hyper_len_list = _ints(p, "hyper_lens", args.hyper_lens)
  args.shot_list = _ints(p, "shots", args.shots)
  args.layer_list = _ints(p, "layers", args.layers)
  for name in ("vocab", "batch", "inputs_len", "targets_len", "prefix_len", "demo_len",
               "base_hyper_len", "steps"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
  if args.warmup < 0:
    p.error(f"--warmup must be >= 0, got {args.warmup}")
  if args.base_layers < 0:
    p.error(f"--base_layers must be >= 0, got {args.base_layers}")
  return args


# ----------------------------------------------------------------------------------------------
# Measuring one point


def step_config(args, layers):
  """The T5 config of a point: `--size` at `layers` encoder and decoder layers."""
  from hypertune.models.config import t5_config
  return t5_config(args.size, vocab_size=args.vocab, dtype=args.dtype, remat=args.remat,
                   dropout_rate=0.0, num_encoder_layers=layers, num_decoder_layers=layers)


def model_flops(args, hyper_len, layers) -> int:
  """Model FLOPs of one train step (`hypertune.flops`): forward of the hypernetwork over
  `hyper_len` tokens and of the downstream over the query with `prefix_len` prefixes; backward
  2x forward where weights train, 1x for the frozen downstream (activation gradients only)."""
  from hypertune import flops
  cfg = step_config(args, layers)
  hyper = flops.hypert5_prefix_flops(cfg, hyper_len, args.prefix_len)
  query = flops.query_flops(cfg, args.inputs_len, args.targets_len, args.prefix_len)
  return args.batch * (3 * hyper + (3 if args.train_downstream else 2) * query)


def pick_time(row, time_stat):
  return {"min": row["step_min_s"], "median": row["step_s"], "cpu": row["cpu_s"]}[time_stat]


class Bench:
  """Builds, compiles and times the train step for a (hyper length, layers) point."""

  def __init__(self, args):
    import jax
    from hypertune import optimizers, partitioning
    self.jax, self.args = jax, args
    self.mesh = partitioning.make_mesh(num_partitions=1, devices=jax.devices()[:1])
    self.rules = partitioning.standard_logical_axis_rules()
    frozen = () if args.train_downstream else FROZEN_PATTERNS
    self.frozen = frozen
    self.tx = optimizers.make_optimizer(optimizers.adamw(1e-4), frozen_patterns=frozen)
    self.rng = np.random.default_rng(args.seed)
    self.trainers = {}  # layers -> PartitionedTrainer (its init_params compiles once)
    self.cache = {}  # (hyper_len, layers) -> measured row

  def trainer(self, layers):
    """HyperT5-Prefix over a T5 of `layers` layers, as gin/models/hypert5_prefix.gin builds it."""
    if layers not in self.trainers:
      from hypertune import train_lib
      from hypertune.hypernets import hypert5
      from hypertune.models import base, hypermodel
      cfg = step_config(self.args, layers)
      hypernet = hypert5.HyperT5(config=cfg, downstream=cfg, peft_type="prefix",
                                 prefix_len=self.args.prefix_len)
      model = base.EncoderDecoderModel(hypermodel.HyperModel(cfg, hypernet=hypernet))
      # Parameter shapes do not depend on the lengths: any batch shapes build the trainer.
      shapes = model.batch_shapes(self.args.batch, {"hyper_inputs": 8, "inputs": 8,
                                                    "targets": 8})
      self.trainers[layers] = train_lib.PartitionedTrainer(
          model, self.tx, self.mesh, self.rules, shapes, frozen_patterns=self.frozen)
    return self.trainers[layers]

  def batch(self, hyper_len, demo_len=None):
    """Random tokens `[batch, length]` in [2, vocab); targets end in EOS (1), no padding.

    With `demo_len`, the hyper input is `hyper_len // demo_len` demonstrations each ended by
    EOS, as a concatenation of K examples reads.
    """
    a, v = self.args, self.args.vocab
    tokens = lambda n: self.rng.integers(2, v, size=(a.batch, n), dtype=np.int32)
    hyper = tokens(hyper_len)
    if demo_len:
      hyper[:, demo_len - 1::demo_len] = 1
    target = tokens(a.targets_len)
    target[:, -1] = 1
    dec_in = np.zeros_like(target)  # shift right, decoder_start_id = 0
    dec_in[:, 1:] = target[:, :-1]
    return {"encoder_input_tokens": tokens(a.inputs_len), "decoder_input_tokens": dec_in,
            "hyper_encoder_input_tokens": hyper, "decoder_target_tokens": target,
            "decoder_loss_weights": np.ones_like(target)}

  def measure(self, hyper_len, layers, demo_len=None):
    key = (hyper_len, layers)
    if key in self.cache:
      return self.cache[key]
    jax, args = self.jax, self.args
    from hypertune import partitioning, train_lib
    trainer = self.trainer(layers)
    # RngBitGenerator keys: XLA:CPU compiles the init faster than with threefry's (as
    # bench/amortisation.py).
    state = trainer.create_state(trainer.init_params(jax.random.key(args.seed, impl="rbg")))
    batch = trainer.shard_batch(self.batch(hyper_len, demo_len))
    rng = jax.random.key(args.seed)
    # As PartitionedTrainer.step_fn jits it; lowered here to read XLA's analyses of it.
    fn = functools.partial(train_lib.train_step, trainer.model, trainer.tx,
                           num_microbatches=1, trainable=trainer.trainable)
    jitted = jax.jit(fn, in_shardings=(trainer.state_shardings, trainer.batch_sharding, None),
                     out_shardings=(trainer.state_shardings, None), donate_argnums=(0,))
    t0 = time.perf_counter()
    with partitioning.axis_rules_and_mesh(trainer.mesh, trainer.rules):
      compiled = jitted.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    mem = {k: int(getattr(ma, f"{k}_size_in_bytes"))
           for k in ("argument", "output", "alias", "temp")}
    times, cpu_times = [], []
    for i in range(args.warmup + args.steps):
      t0, c0 = time.perf_counter(), time.process_time()
      state, metrics = compiled(state, batch, rng)
      jax.block_until_ready((state, metrics))
      if i >= args.warmup:
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
      if i == 0:
        loss = float(metrics["loss"])
        if not np.isfinite(loss):
          raise RuntimeError(f"hyper_len {hyper_len}, layers {layers}: loss is {loss}")
    median, fastest, cpu = statistics.median(times), min(times), statistics.median(cpu_times)
    row = dict(hyper_len=hyper_len, layers=layers, step_s=median, step_min_s=fastest, cpu_s=cpu,
               flops=model_flops(args, hyper_len, layers), memory=mem["temp"] + mem["argument"],
               compile_s=round(compile_s, 2), loss=loss, **mem)
    row["time_s"] = pick_time(row, args.time_stat)
    self.cache[key] = row
    print(f"  L={hyper_len:5d} layers={layers:3d}: {1e3 * median:9.2f} ms/step (min "
          f"{1e3 * fastest:.2f}, CPU {1e3 * cpu:.2f}), temp+argument {row['memory'] / 2**20:9.2f}"
          f" MiB, {row['flops'] / 1e9:8.3f} GFLOP, compile {compile_s:.1f}s", flush=True)
    return row


# ----------------------------------------------------------------------------------------------
# Fits


def loglog_slope(x, y):
  """Least-squares slope (and intercept) of log(y) on log(x)."""
  slope, intercept = np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)
  return float(slope), float(intercept)


def local_slopes(x, y):
  """Slopes of log(y) on log(x) between neighbouring points."""
  lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
  return [float(s) for s in np.diff(ly) / np.diff(lx)]


def quadratic_share(x, y):
  """Non-negative least squares `y = a + b x + c x^2` (relative errors: rows divided by y);
  the fitted terms' shares `(a, b x, c x^2) / fit` at the largest x, or None under 3 points."""
  if len(x) < 3:
    return None
  from scipy.optimize import nnls
  x, y = np.asarray(x, float), np.asarray(y, float)
  design = np.stack([np.ones_like(x), x, x * x], axis=1)
  coef, _ = nnls(design / y[:, None], np.ones_like(y))
  terms = coef * np.array([1.0, x[-1], x[-1] ** 2])
  total = terms.sum()
  return dict(zip(("constant", "linear", "quadratic"), (terms / total).tolist())) if total else None


def growth(slope):
  if slope > 1 + LINEAR_TOLERANCE:
    return "faster than linear"
  if slope < 1 - LINEAR_TOLERANCE:
    return "sublinear"
  return "linear"


# Why each sweep grows as it does (the measured slopes say which case holds).
WHY = {
    "hyper_len": ("the hyper encoder's matmuls and the hyper decoder's cross-attention over the "
                  "L demonstration tokens are linear in L; its self-attention scores "
                  "[batch, heads, L, L] are quadratic; the query's pass through the downstream "
                  "T5 is a fixed cost"),
    "shots": ("HyperT5 reads the K demonstrations as one sequence of L = K * demo_len tokens, "
              "so this is the hyper-length curve at other points: linear per demonstration "
              "plus attention between every pair of demonstrations (quadratic in K)"),
    "layers": ("every layer of the downstream T5 and of the hypernetwork costs the same and the "
               "prefix heads write [layers, P, ...]: linear; the embeddings, logits and the "
               "hyper decoder's learned tokens are a fixed cost (sublinear at few layers)"),
}
AXES = (("hyper_len", "hyper length L (tokens)"), ("shots", "shots K"),
        ("layers", "layers (encoder = decoder)"))
METRICS = (("time_s", "step time"), ("memory", "temp + argument bytes"), ("flops", "model FLOPs"))


def analyse(sweeps):
  """{axis: {metric: {slope, intercept, local, quadratic}}} for every sweep."""
  fits = {}
  for axis, (xs, rows) in sweeps.items():
    fits[axis] = {}
    for metric, _ in METRICS + (("temp", "temp"), ("argument", "argument")):
      ys = [r[metric] for r in rows]
      if not all(np.isfinite(y) and y > 0 for y in ys):
        continue
      slope, intercept = loglog_slope(xs, ys)
      fit = dict(slope=slope, intercept=intercept, local=local_slopes(xs, ys))
      if axis != "layers":
        fit["quadratic"] = quadratic_share(xs, ys)
      fits[axis][metric] = fit
  return fits


def conclusions(fits, sweeps):
  """One sentence per sweep and metric: where cost grows linearly and where not, and why."""
  lines = []
  for axis, label in AXES:
    xs = sweeps[axis][0]
    for metric, name in METRICS[:2]:
      f = fits[axis].get(metric)
      if f is None:
        continue
      last = f["local"][-1]
      line = (f"{name} vs {label.split(' (')[0]}: slope {f['slope']:.2f} -> {growth(f['slope'])}"
              f" overall; {last:.2f} ({growth(last)}) from {xs[-2]} to {xs[-1]}")
      if metric == "time_s" and "flops" in fits[axis]:
        line += f"; model FLOPs slope {fits[axis]['flops']['slope']:.2f}"
      q = f.get("quadratic")
      if q:
        line += (f"; at {xs[-1]}: {100 * q['quadratic']:.0f}% quadratic, "
                 f"{100 * q['linear']:.0f}% linear, {100 * q['constant']:.0f}% fixed")
      lines.append(line + ".")
    lines.append(f"  why: {WHY[axis]}.")
  return lines


# ----------------------------------------------------------------------------------------------
# Output


def table(sweeps):
  head = (f"{'sweep':9s} {'x':>6s} {'L':>6s} {'layers':>6s} {'median ms':>9s} {'min ms':>9s} "
          f"{'CPU ms':>9s} "
          f"{'GFLOP':>9s} {'GFLOP/s':>8s} {'temp MiB':>9s} {'arg MiB':>8s} {'temp+arg':>9s}")
  lines = [head]
  for axis, _ in AXES:
    xs, rows = sweeps[axis]
    for x, r in zip(xs, rows):
      lines.append(f"{axis:9s} {x:6d} {r['hyper_len']:6d} {r['layers']:6d} "
                   f"{1e3 * r['step_s']:9.2f} {1e3 * r['step_min_s']:9.2f} {1e3 * r['cpu_s']:9.2f} "
                   f"{r['flops'] / 1e9:9.3f} {r['flops'] / r['time_s'] / 1e9:8.1f} "
                   f"{r['temp'] / 2**20:9.2f} {r['argument'] / 2**20:8.2f} "
                   f"{r['memory'] / 2**20:9.2f}")
  return "\n".join(lines)


def fits_table(fits):
  names = [m for m, _ in METRICS] + ["temp", "argument"]
  lines = [f"{'sweep':9s} " + " ".join(f"{m:>9s}" for m in names) + "   (log-log slopes)"]
  for axis, _ in AXES:
    cells = [f"{fits[axis][m]['slope']:9.2f}" if m in fits[axis] else f"{'-':>9s}" for m in names]
    lines.append(f"{axis:9s} " + " ".join(cells))
  return "\n".join(lines)


def plot(sweeps, fits, path, title, time_stat):
  """Log-log panels: step time (top) and temp + argument memory (bottom) against each sweep."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(13, 7.5))
  FigureCanvasAgg(fig)
  axes = fig.subplots(2, 3)
  for col, (axis, label) in enumerate(AXES):
    xs, rows = sweeps[axis]
    x = np.asarray(xs, float)
    panels = (("time_s", f"step time, {time_stat}", 1e3, "ms"),
              ("memory", "temp + argument", 2.0**-20, "MiB"))
    for row, (metric, name, scale, unit) in enumerate(panels):
      ax = axes[row, col]
      y = np.asarray([r[metric] for r in rows], float) * scale
      f = fits[axis][metric]
      ax.loglog(x, y, "o-", color="C0", label=f"measured (slope {f['slope']:.2f})")
      ax.loglog(x, np.exp(f["intercept"]) * scale * x ** f["slope"], "--", color="C0", alpha=0.5,
                label="least-squares fit")
      for k, style in ((1, ":"), (2, "-.")):  # reference slopes through the first point
        ax.loglog(x, y[0] * (x / x[0]) ** k, style, color="gray", alpha=0.6,
                  label=f"slope {k}")
      if metric == "memory":
        temp = np.asarray([r["temp"] for r in rows], float) * scale
        ax.loglog(x, temp, "s-", color="C1", alpha=0.7, markersize=4,
                  label=f"temp (slope {fits[axis]['temp']['slope']:.2f})")
      elif "flops" in fits[axis]:  # time if it tracked the FLOPs exactly
        fl = np.asarray([r["flops"] for r in rows], float)
        ax.loglog(x, y[0] * fl / fl[0], "^-", color="C2", alpha=0.6, markersize=4,
                  label=f"model FLOPs, scaled (slope {fits[axis]['flops']['slope']:.2f})")
      low = min(y.min(), temp.min()) if metric == "memory" else y.min()
      ax.set_ylim(low / 1.6, max(y.max(), y[0] * (x[-1] / x[0])) * 1.4)
      ax.set_xlabel(label)
      ax.set_ylabel(f"{name} ({unit})")
      ax.set_xticks(x)
      ax.set_xticklabels([str(v) for v in xs])
      ax.minorticks_off()
      ax.grid(True, which="major", alpha=0.3)
      ax.legend(fontsize=7, loc="upper left")
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def measure_all(args):
  """Runs the three sweeps: (sweeps, title, base_layers)."""
  import jax  # only now, so --xla_flags takes effect
  from hypertune.models.config import t5_config

  cfg = t5_config(args.size, vocab_size=args.vocab)
  base_layers = args.base_layers or cfg.num_encoder_layers
  title = (f"HyperT5-Prefix train step, T5 {args.size} (d_model {cfg.d_model}, d_ff {cfg.d_ff}, "
           f"{cfg.num_heads} heads), vocab {args.vocab}, P={args.prefix_len}, batch "
           f"{args.batch}, query {args.inputs_len} -> {args.targets_len} tokens, {args.dtype},\n"
           f"downstream {'trained' if args.train_downstream else 'frozen'}, remat {args.remat} "
           f"| jax {jax.__version__} {jax.devices()[0].platform}, {os.cpu_count()} CPUs")
  print(title.replace("\n", " "), flush=True)
  print(f"sweeps: hyper length {args.hyper_len_list} at {base_layers} layers; shots "
        f"{args.shot_list} x {args.demo_len} tokens at {base_layers} layers; layers "
        f"{args.layer_list} at hyper length {args.base_hyper_len}", flush=True)
  bench = Bench(args)
  t_start = time.perf_counter()
  sweeps = {
      "hyper_len": (args.hyper_len_list,
                    [bench.measure(n, base_layers) for n in args.hyper_len_list]),
      "shots": (args.shot_list, [bench.measure(k * args.demo_len, base_layers, args.demo_len)
                                 for k in args.shot_list]),
      "layers": (args.layer_list,
                 [bench.measure(args.base_hyper_len, n) for n in args.layer_list]),
  }
  print(f"\n{len(bench.cache)} programs measured in {time.perf_counter() - t_start:.0f}s, "
        f"{args.steps} timed steps each")
  return sweeps, title, base_layers


def load_run(args):
  """A saved run's settings, sweeps, title and base depth, with `time_s` and the model FLOPs
  recomputed (for `args.time_stat` and the FLOPs count as they are now)."""
  with open(args.replot) as f:
    saved = json.load(f)
  run = argparse.Namespace(**saved["args"])
  run.time_stat, run.out, run.replot, run.quick = args.time_stat, args.out, args.replot, False
  sweeps = {a: (v["x"], v["rows"]) for a, v in saved["sweeps"].items()}
  for _, rows in sweeps.values():
    for r in rows:
      r["time_s"] = pick_time(r, run.time_stat)
      r["flops"] = model_flops(run, r["hyper_len"], r["layers"])
  print(saved["title"].replace("\n", " "))
  print(f"replotted from {args.replot} (measured there; model FLOPs recomputed)")
  return run, sweeps, saved["title"], saved["base_layers"]


def main(argv=None):
  args = parse_args(argv)
  if args.xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
  if args.replot:
    args, sweeps, title, base_layers = load_run(args)
  else:
    sweeps, title, base_layers = measure_all(args)
  fits = analyse(sweeps)
  unit = "process CPU seconds, all threads" if args.time_stat == "cpu" else "wall-clock seconds"
  print(f"fits and plot: step time = the {args.time_stat} ({unit}) of each point's timed steps\n")
  print(table(sweeps))
  print()
  print(fits_table(fits))
  print()
  for line in conclusions(fits, sweeps):
    print(line)
  if args.quick:
    print("\n--quick: tiny shapes, two points a sweep; these slopes measure dispatch, not "
          "scaling.")
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    png, js = os.path.join(args.out, "scaling.png"), os.path.join(args.out, "scaling.json")
    plot(sweeps, fits, png, title, args.time_stat)
    with open(js, "w") as f:
      json.dump({"args": {k: v for k, v in vars(args).items()}, "base_layers": base_layers,
                 "title": title,
                 "sweeps": {a: {"x": xs, "rows": rows} for a, (xs, rows) in sweeps.items()},
                 "fits": fits}, f, indent=1)
    print(f"\nwrote {png} and {js}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
