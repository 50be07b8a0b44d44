"""Training-step throughput: hypertune's T5 (JAX/Flax) against Hugging Face's PyTorch T5, on CPU.

One run builds both models from the same `T5Config` (hypertune's `t5_config(size)`; the PyTorch
model from `config_to_hf`, untied like T5 v1.1 and loaded with the *same* weights via
`hf_convert.params_to_hf_state_dict`), feeds both the same random token batch (with some
padding), and times a full training step on each:

    forward -> token cross-entropy (loss weights = target != pad, mean over real tokens)
    -> backward -> AdamW update

- hypertune: one `jax.jit` function (params and optimizer state donated), `optax.adamw`;
  compile time is measured separately (`lower().compile()`), then `--warmup` steps, then
  `--steps` timed steps, each ended by `block_until_ready`.
- PyTorch: `transformers.T5ForConditionalGeneration` in train mode, `torch.optim.AdamW`
  (same lr / betas / eps / weight decay), `torch.set_num_threads(os.cpu_count())` (or
  `--torch_threads`); at equal precision: float32, or with `--dtype bfloat16` the forward under
  `torch.autocast("cpu", torch.bfloat16)` (float32 weights and optimizer, as hypertune's);
  `--warmup` steps, then `--steps` timed steps.

Throughput is `batch * (inputs_len + targets_len) * steps / seconds` (padding included, the same
for both). With `--repeats N` the timed blocks alternate JAX / PyTorch N times (so background
load hits both alike) and the table shows the median with min-max; the ratio printed is
`hypertune / pytorch` of the medians. The first step's losses of both are printed as a check
that they compute the same thing. Each `--also FIELD=VALUE,...` adds one more hypertune
configuration (those `T5Config` fields changed) to the same alternation, with its ratios to
PyTorch and to the first configuration: on a noisy machine the one way to compare two settings.

Run (from the repository root):

    .venv/bin/python bench/t5_step.py                      # t5-small shape, batch 8, 256/64
    .venv/bin/python bench/t5_step.py --quick              # tiny size, seconds (CI)
    .venv/bin/python bench/t5_step.py --repeats 3 --steps 5
    .venv/bin/python bench/t5_step.py --skip_torch --also scan_layers=False   # in one run
    .venv/bin/python bench/t5_step.py --dtype bfloat16 --bf16_transposed_copies
    .venv/bin/python bench/t5_step.py --skip_torch --profile /tmp/t5_step_trace
    .venv/bin/python bench/t5_step.py --no_scan_layers --xla_flags=--xla_cpu_enable_fast_math=true
    .venv/bin/python bench/t5_step.py --size base --dtype bfloat16 --skip_torch --peak_flops 989e12

`--xla_flags` is appended to `XLA_FLAGS` before JAX is imported. The model FLOPs of a step are
`3 *` the forward pass's (`flops.query_flops`: backward = twice forward, no recompute counted);
hypertune's achieved FLOP/s is that over its median step time, printed as a fraction of the
machine's float32 matmul peak measured in the same run (`bench_util.matmul_peak_flops`, a
jitted 2048^2 matmul, once before each repeat, the best of all), and with `--peak_flops` (the
device's peak FLOP/s for the compute dtype) as model FLOPs utilisation (MFU).
"""
import argparse
import contextlib
import os
import statistics
import sys
import time

import bench_util


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true",
                 help="tiny size, a short batch, 2 steps: seconds, checks only that it runs")
  p.add_argument("--size", default="small", help="t5_config size (tiny, mini, small, base, ...)")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--inputs_len", type=int, default=256)
  p.add_argument("--targets_len", type=int, default=64)
  p.add_argument("--vocab", type=int, default=32128)
  p.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compile")
  p.add_argument("--repeats", type=int, default=1, help="timed blocks per framework")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                 help="compute dtype of both (PyTorch: bf16 autocast of the forward)")
  p.add_argument("--no_scan_layers", action="store_true", help="unroll hypertune's layers")
  p.add_argument("--scan_unroll", type=int, default=1,
                 help="layers per iteration of the scanned loop (T5Config.scan_unroll)")
  p.add_argument("--remat", action="store_true", help="rematerialise hypertune's layers")
  p.add_argument("--remat_policy", default="full", choices=["full", "dense"],
                 help="with --remat: T5Config.remat_policy (what a layer keeps)")
  p.add_argument("--bf16_transposed_copies", action="store_true",
                 help="with --dtype bfloat16: T5Config.bf16_transposed_copies (the CPU switch)")
  p.add_argument("--loss", default="optax", choices=["optax", "logsoftmax"],
                 help="JAX cross-entropy: optax.softmax_cross_entropy_with_integer_labels or "
                      "log_softmax + take_along_axis")
  p.add_argument("--also", action="append", default=[], metavar="FIELD=VALUE[,FIELD=VALUE]",
                 help="one more hypertune configuration: T5Config fields over the flags' (e.g. "
                      "scan_layers=False), timed in the same run, alternating with the others; "
                      "repeatable")
  p.add_argument("--xla_flags", default="", help="extra XLA_FLAGS (set before importing jax)")
  p.add_argument("--lr", type=float, default=1e-4)
  p.add_argument("--weight_decay", type=float, default=0.01)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--torch_threads", type=int, default=os.cpu_count(),
                 help="torch.set_num_threads (default: os.cpu_count())")
  p.add_argument("--skip_torch", action="store_true")
  p.add_argument("--skip_jax", action="store_true")
  p.add_argument("--matmul_peak_n", type=int, default=2048,
                 help="side of the matmul that measures the machine's float32 peak (0: skip)")
  p.add_argument("--profile", default="",
                 help="after timing, write a jax.profiler trace of one hypertune step to this "
                      "directory (TensorBoard / xprof)")
  p.add_argument("--peak_flops", type=float, default=0.0,
                 help="the device's peak FLOP/s (e.g. 989e12: H100 / H200 dense bfloat16); "
                      "> 0 prints hypertune's model FLOPs utilisation")
  args = p.parse_args(argv)
  if args.quick:
    args.size, args.batch, args.inputs_len, args.targets_len, args.vocab = "tiny", 2, 16, 8, 384
    args.steps, args.warmup, args.matmul_peak_n = 2, 1, 256
  if args.peak_flops < 0:
    p.error(f"--peak_flops must be >= 0, got {args.peak_flops}")
  args.also = [_config_fields(spec, p.error) for spec in args.also]
  return args


def _config_fields(spec: str, error) -> dict:
  """'scan_layers=False,remat_policy=dense' -> {"scan_layers": False, "remat_policy": "dense"}."""
  import ast
  fields = {}
  for item in spec.split(","):
    name, sep, value = item.partition("=")
    if not sep or not name.isidentifier():
      error(f"--also {spec!r}: expected FIELD=VALUE[,FIELD=VALUE], got {item!r}")
    try:
      fields[name] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      fields[name] = value  # a bare word: a string
  return fields


def make_batch(args, seed):
  """Random tokens in [2, vocab) with per-row padding; targets end in EOS (1) then pad (0)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  b, s, t = args.batch, args.inputs_len, args.targets_len
  enc = rng.integers(2, args.vocab, size=(b, s), dtype=np.int32)
  tgt = rng.integers(2, args.vocab, size=(b, t), dtype=np.int32)
  # Row i keeps between ~60% and 100% of its positions (the first row is full).
  for i in range(b):
    keep_s = s - (i * (s * 2 // 5)) // max(b - 1, 1)
    keep_t = t - (i * (t * 2 // 5)) // max(b - 1, 1)
    enc[i, keep_s - 1], enc[i, keep_s:] = 1, 0
    tgt[i, keep_t - 1], tgt[i, keep_t:] = 1, 0
  dec_in = np.zeros_like(tgt)  # shift right, decoder_start_id = 0
  dec_in[:, 1:] = tgt[:, :-1]
  weights = (tgt != 0).astype(np.float32)
  return enc, dec_in, tgt, weights


def _median_spread(xs):
  return statistics.median(xs), min(xs), max(xs)


# ----------------------------------------------------------------------------------------------
# hypertune (JAX)


class JaxBench:

  def __init__(self, args, config, batch):
    import jax
    import jax.numpy as jnp
    import optax
    from flax.core import meta
    from hypertune.models.base import EncoderDecoderModel
    from hypertune.models.hypermodel import HyperModel

    self.jax = jax
    enc, dec_in, tgt, weights = batch
    # Through the model contract, as the trainer runs it (a downstream T5, no hypernetwork).
    model = EncoderDecoderModel(HyperModel(config))
    t0 = time.perf_counter()
    shapes = {"encoder_input_tokens": (1, 8), "decoder_input_tokens": (1, 8)}
    params = meta.unbox(jax.jit(lambda rng: model.init_variables(rng, shapes))(
        jax.random.PRNGKey(args.seed))["params"])
    params = jax.block_until_ready(params)
    self.init_s = time.perf_counter() - t0
    self.num_params = sum(x.size for x in jax.tree.leaves(params))
    tx = optax.adamw(args.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=args.weight_decay)
    opt_state = tx.init(params)

    def loss_fn(p, enc, dec_in, tgt, w):
      logits, _ = model.logits(p, {}, {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in},
                               jax.random.PRNGKey(0), deterministic=True)
      if args.loss == "optax":
        xent = optax.softmax_cross_entropy_with_integer_labels(logits, tgt)
      else:
        logp = jax.nn.log_softmax(logits, axis=-1)
        xent = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
      return jnp.sum(xent * w) / jnp.maximum(jnp.sum(w), 1.0)

    def train_step(p, s, enc, dec_in, tgt, w):
      loss, grads = jax.value_and_grad(loss_fn)(p, enc, dec_in, tgt, w)
      updates, s = tx.update(grads, s, p)
      return optax.apply_updates(p, updates), s, loss

    self.batch = tuple(jax.device_put(x) for x in (enc, dec_in, tgt, weights))
    # Keep a host copy of the initial weights for the PyTorch model (params get donated).
    self.initial_params = jax.tree.map(lambda x: jax.device_get(x), params["downstream"])
    t0 = time.perf_counter()
    self.step = jax.jit(train_step, donate_argnums=(0, 1)).lower(
        params, opt_state, *self.batch).compile()
    self.compile_s = time.perf_counter() - t0
    self.params, self.opt_state = params, opt_state
    self.first_loss = None

  def run(self, n):
    """n steps; seconds, ended when the last step's results are ready."""
    t0 = time.perf_counter()
    for _ in range(n):
      self.params, self.opt_state, loss = self.step(self.params, self.opt_state, *self.batch)
    self.jax.block_until_ready((self.params, loss))
    if self.first_loss is None:
      self.first_loss = float(loss)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# Hugging Face PyTorch


class TorchBench:

  def __init__(self, args, config, batch, params):
    import torch
    import transformers
    from hypertune.models import hf_convert
    from hypertune.models.config import config_to_hf

    self.torch = torch
    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**config_to_hf(config)))
    if not config.tie_word_embeddings and model.lm_head.weight is model.shared.weight:
      # transformers >= 5 ties every T5 it builds; T5 v1.1 (and hypertune's config) is untied.
      model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
    if params is not None:  # the same weights as the JAX model
      state = {k: torch.from_numpy(v.copy()) for k, v in
               hf_convert.params_to_hf_state_dict(params, config).items()}
      missing, unexpected = model.load_state_dict(state, strict=False)
      # Missing: HF's per-stack copies of the embedding (views of shared.weight).
      assert all(k.endswith("embed_tokens.weight") for k in missing), missing
      assert not unexpected, unexpected
    model.train()
    self.init_s = time.perf_counter() - t0
    self.num_params = sum(p.numel() for p in model.parameters())
    self.model = model
    self.opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=args.weight_decay)
    enc, dec_in, tgt, weights = (torch.from_numpy(x) for x in batch)
    self.inputs = dict(input_ids=enc.long(), attention_mask=(enc != 0).long(),
                       decoder_input_ids=dec_in.long(),
                       decoder_attention_mask=torch.ones_like(dec_in).long())
    self.tgt, self.weights = tgt.long(), weights
    self.autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if args.dtype == "bfloat16"
                     else contextlib.nullcontext())
    self.first_loss = None

  def _step(self):
    torch = self.torch
    with self.autocast:
      logits = self.model(**self.inputs, use_cache=False).logits
    xent = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), self.tgt.flatten(),
                                             reduction="none")
    loss = (xent * self.weights.flatten()).sum() / self.weights.sum().clamp(min=1.0)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    return loss

  def run(self, n):
    t0 = time.perf_counter()
    for _ in range(n):
      loss = self._step()
    loss = float(loss.detach())
    if self.first_loss is None:
      self.first_loss = loss
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------


def main(argv=None):
  args = parse_args(argv)
  if args.xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
  # Import JAX only now so --xla_flags takes effect.
  from hypertune.models.config import t5_config

  config = t5_config(args.size, vocab_size=args.vocab, dtype=args.dtype,
                     scan_layers=not args.no_scan_layers, scan_unroll=args.scan_unroll,
                     remat=args.remat, remat_policy=args.remat_policy,
                     bf16_transposed_copies=args.bf16_transposed_copies,
                     dropout_rate=0.0)
  variants = {}  # --also: checked before any model is built
  for fields in args.also:
    name = "hypertune[" + ",".join(f"{k}={v}" for k, v in fields.items()) + "]"
    try:
      variants[name] = config.replace(**fields)
    except (TypeError, ValueError) as e:
      raise SystemExit(f"bench/t5_step.py --also: {e}") from None
  batch = make_batch(args, args.seed)
  tokens_per_step = args.batch * (args.inputs_len + args.targets_len)
  print(f"T5 {args.size}: d_model={config.d_model} d_ff={config.d_ff} heads={config.num_heads} "
        f"layers={config.num_encoder_layers}+{config.num_decoder_layers} vocab={config.vocab_size}"
        f" | batch {args.batch} x ({args.inputs_len} + {args.targets_len}) tokens "
        f"| {os.cpu_count()} CPUs", flush=True)
  print(f"hypertune: dtype={config.dtype} scan_layers={config.scan_layers} "
        f"scan_unroll={config.scan_unroll} remat={config.remat}/{config.remat_policy} "
        f"bf16_transposed_copies={config.bf16_transposed_copies} "
        f"loss={args.loss} XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)

  benches = {}
  if not args.skip_jax:
    jb = JaxBench(args, config, batch)
    print(f"hypertune: {jb.num_params / 1e6:.1f}M params, init {jb.init_s:.1f}s, "
          f"compile {jb.compile_s:.1f}s", flush=True)
    benches["hypertune"] = jb
    for name, variant in variants.items():
      benches[name] = JaxBench(args, variant, batch)
      print(f"{name}: compile {benches[name].compile_s:.1f}s", flush=True)
  if not args.skip_torch:
    import torch
    params = benches["hypertune"].initial_params if "hypertune" in benches else None
    tb = TorchBench(args, config, batch, params)
    print(f"pytorch:   {tb.num_params / 1e6:.1f}M params, init {tb.init_s:.1f}s, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'bf16 autocast' if args.dtype == 'bfloat16' else 'float32'}", flush=True)
    benches["pytorch"] = tb
  for b in benches.values():
    if hasattr(b, "initial_params"):
      del b.initial_params

  first_step_s = {}
  for name, b in benches.items():  # warm-up (also the first-step loss check)
    first_step_s[name] = b.run(1)
    if args.warmup > 1:
      b.run(args.warmup - 1)
  if "hypertune" in benches and "pytorch" in benches:
    a, t = benches["hypertune"].first_loss, benches["pytorch"].first_loss
    print(f"first-step loss: hypertune {a:.5f}  pytorch {t:.5f}  (|diff| {abs(a - t):.2e})",
          flush=True)

  times = {name: [] for name in benches}
  peaks = []
  for r in range(args.repeats):
    if args.matmul_peak_n and "hypertune" in benches:
      peaks.append(bench_util.matmul_peak_flops(args.matmul_peak_n))
      print(f"  repeat {r + 1}/{args.repeats} float32 {args.matmul_peak_n}^2 matmul: "
            f"{peaks[-1] / 1e9:.1f} GFLOP/s", flush=True)
    for name, b in benches.items():
      times[name].append(b.run(args.steps))
      print(f"  repeat {r + 1}/{args.repeats} {name}: {times[name][-1] / args.steps:.3f} s/step",
            flush=True)

  if args.profile and "hypertune" in benches:
    import jax
    jax.profiler.start_trace(args.profile)
    benches["hypertune"].run(1)
    jax.profiler.stop_trace()
    print(f"  profile of one hypertune step: {args.profile}", flush=True)

  print()
  width = max(10, *map(len, benches))
  print(f"{'':{width}s} {'tokens/s (median)':>18s} {'min-max':>15s} {'s/step':>8s} "
        f"{'first step s':>13s} {'compile s':>10s}")
  medians = {}
  for name, b in benches.items():
    tps = [tokens_per_step * args.steps / s for s in times[name]]
    med, lo, hi = _median_spread(tps)
    medians[name] = med
    compile_s = f"{b.compile_s:10.1f}" if hasattr(b, "compile_s") else f"{'-':>10s}"
    print(f"{name:{width}s} {med:18.0f} {lo:7.0f}-{hi:<7.0f} {tokens_per_step / med:8.3f} "
          f"{first_step_s[name]:13.2f} {compile_s}")
  print()
  for name in medians:
    for other in ("pytorch", "hypertune"):
      if name.startswith("hypertune") and name != other and other in medians:
        print(f"ratio {name}/{other}: {medians[name] / medians[other]:.2f}x")
  if "hypertune" in medians:
    from hypertune import flops
    step_flops = 3 * args.batch * flops.query_flops(config, args.inputs_len, args.targets_len)
    print("\n" + bench_util.flops_line(
        "a step (3x forward, flops.query_flops)", step_flops, tokens_per_step / medians["hypertune"],
        args.peak_flops, max(peaks, default=0.0)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
