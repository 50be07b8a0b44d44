"""Generation throughput: hypertune's greedy / beam decoding against Hugging Face's `generate`, on CPU.

One run builds hypertune's T5 from `t5_config(size)` with random weights, writes them as a
Hugging Face checkpoint (`hf_convert.save_hf_t5`) and loads that into
`transformers.T5ForConditionalGeneration` (untied, as T5 v1.1), so both decode with the *same*
weights. Both read the same random input batch (some rows padded) and decode:

- hypertune: `decoding.greedy_decode` and `decoding.beam_search(num_beams=K)` (one `jax.jit`
  program each, a `lax.while_loop` over the key/value cache); the first call (compile + run)
  is timed separately, then each timed call ends with `block_until_ready`.
- Hugging Face: `model.generate(do_sample=False, num_beams=1 / K, max_new_tokens=N)` under
  `torch.inference_mode()`, `torch.set_num_threads(--torch_threads)` (default 2); one untimed
  warm-up call.

Full length is forced: EOS is set (in both) to id `vocab_size`, which no model can emit, so
every row decodes exactly `--new_tokens` tokens. The tokens actually generated are counted from
the outputs (positions up to the first EOS) and checked to be `batch * new_tokens`.
Throughput is `generated tokens / seconds`, counting the returned sequence per example (beam
search does `K` times the decoder work for the same count). With `--repeats N` the timed calls
alternate hypertune / Hugging Face N times (background load hits both alike); the table shows
the median with min-max, and the ratio `hypertune / transformers` of the medians. The share of
output tokens on which both agree is printed as a check that they decode the same thing
(float32 ties can make long random-weight decodes drift apart after a while).

Run (from the repository root):

    .venv/bin/python bench/generation.py                 # t5-small shape, batch 16, 256 -> 64
    .venv/bin/python bench/generation.py --repeats 3
    .venv/bin/python bench/generation.py --repeats 3 --no_scan_layers
    .venv/bin/python bench/generation.py --repeats 3 --unrolled_decoding
    .venv/bin/python bench/generation.py --quick         # tiny size, a few tokens, seconds
    .venv/bin/python bench/generation.py --size large --dtype bfloat16 --skip_torch \\
        --peak_flops 989e12

Model FLOPs of a decode (`hypertune.flops`): greedy `batch * query_flops`; beam
search the encoder once per example and the decoder for every beam. Achieved FLOP/s is that
over hypertune's median time; with `--peak_flops` (the device's peak FLOP/s for the compute
dtype) the model FLOPs utilisation (MFU) is printed (decoding is memory-bound: expect it low).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

from bench_util import flops_line


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--size", default="small", help="t5_config size (tiny, mini, small, base, ...)")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--inputs_len", type=int, default=256)
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--num_beams", type=int, default=4)
  p.add_argument("--vocab", type=int, default=32128)
  p.add_argument("--repeats", type=int, default=1, help="timed calls per framework and mode")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--torch_threads", type=int, default=2, help="torch.set_num_threads")
  p.add_argument("--no_scan_layers", action="store_true",
                 help="unroll hypertune's layers (a scanned decoder slices every layer's weights "
                      "and caches at every step on XLA:CPU)")
  p.add_argument("--unrolled_decoding", action="store_true",
                 help="T5Config.unrolled_decoding: scanned layers, decoded unrolled from one "
                      "unstacked copy of the decoder's parameters")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                 help="hypertune compute dtype (transformers always runs float32)")
  p.add_argument("--skip_torch", action="store_true",
                 help="hypertune only (no transformers decode, agreement or ratio)")
  p.add_argument("--peak_flops", type=float, default=0.0,
                 help="the device's peak FLOP/s (e.g. 989e12: H100 / H200 dense bfloat16); "
                      "> 0 prints hypertune's model FLOPs utilisation")
  p.add_argument("--quick", action="store_true",
                 help="tiny size, batch 2, 16 input tokens, 4 new tokens (a smoke run)")
  args = p.parse_args(argv)
  if args.quick:
    args.size, args.batch, args.inputs_len, args.new_tokens, args.vocab = "tiny", 2, 16, 4, 384
  for name in ("batch", "inputs_len", "new_tokens", "num_beams", "vocab", "repeats"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
  if args.peak_flops < 0:
    p.error(f"--peak_flops must be >= 0, got {args.peak_flops}")
  return args


def decode_flops(config, args, mode: str) -> int:
  """Model FLOPs of one decode of the batch (`hypertune.flops`): greedy = `query_flops` (the
  encoded inputs projected for cross-attention once); beam search runs the encoder once per example and the decoder per beam."""
  from hypertune import flops
  n, s = args.new_tokens, args.inputs_len
  if mode == "greedy":
    return args.batch * flops.query_flops(config, s, n)
  decoder = flops.decoder_flops(config, n, n, s)
  return args.batch * (flops.encoder_flops(config, s) + args.num_beams * decoder)


def make_inputs(args, seed):
  """Random tokens in [2, vocab) `[batch, inputs_len]`; row i ends in EOS (1) then padding,
  keeping between ~60% (last row) and 100% (first row) of its positions."""
  import numpy as np
  rng = np.random.default_rng(seed)
  b, s = args.batch, args.inputs_len
  enc = rng.integers(2, args.vocab, size=(b, s), dtype=np.int32)
  for i in range(b):
    keep = s - (i * (s * 2 // 5)) // max(b - 1, 1)
    enc[i, keep - 1], enc[i, keep:] = 1, 0
  return enc


def generated_tokens(tokens, eos_id: int) -> int:
  """Tokens decoded `[batch, length]` -> how many were generated (up to each row's first EOS)."""
  import numpy as np
  tokens = np.asarray(tokens)
  is_eos = tokens == eos_id
  first = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, tokens.shape[1])
  return int(first.sum())


def _median_spread(xs):
  return statistics.median(xs), min(xs), max(xs)


def jax_to_host(params):
  """Device params -> a tree of numpy arrays (for the Hugging Face checkpoint)."""
  import jax
  import numpy as np
  return jax.tree.map(np.asarray, params)


# ----------------------------------------------------------------------------------------------
# hypertune (JAX)


class JaxBench:

  def __init__(self, args, config, enc):
    import jax
    import jax.numpy as jnp
    from flax.core import meta
    from hypertune.models import decoding
    from hypertune.models.t5 import T5

    self.jax = jax
    self.model = T5(config)
    t0 = time.perf_counter()
    params = jax.jit(lambda rng: self.model.init(
        rng, jnp.ones((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32))["params"])(
            jax.random.PRNGKey(args.seed))
    self.params = jax.block_until_ready(meta.unbox(params))
    self.init_s = time.perf_counter() - t0
    self.num_params = sum(x.size for x in jax.tree.leaves(self.params))
    self.enc = jax.device_put(enc)
    self.fns = {
        "greedy": lambda: decoding.greedy_decode(self.model, self.params, self.enc,
                                                 max_decode_len=args.new_tokens),
        "beam": lambda: decoding.beam_search(self.model, self.params, self.enc,
                                             max_decode_len=args.new_tokens,
                                             num_beams=args.num_beams)[0][:, 0],
    }
    self.first_call_s, self.outputs = {}, {}

  def run(self, mode):
    """One decode of the batch; seconds, ended when the tokens are ready."""
    t0 = time.perf_counter()
    tokens = self.jax.block_until_ready(self.fns[mode]())
    seconds = time.perf_counter() - t0
    self.outputs[mode] = self.jax.device_get(tokens)
    return seconds


# ----------------------------------------------------------------------------------------------
# Hugging Face PyTorch


class TorchBench:

  def __init__(self, args, config, enc, params):
    import torch
    import transformers
    from hypertune.models import hf_convert

    self.torch = torch
    torch.set_num_threads(args.torch_threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:  # the same weights, through a saved checkpoint
      hf_convert.save_hf_t5(d, config, params)
      model = transformers.T5ForConditionalGeneration.from_pretrained(d).eval()
    if model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr():
      raise RuntimeError("transformers tied lm_head to the embedding; the checkpoint is untied")
    self.init_s = time.perf_counter() - t0
    self.num_params = sum(p.numel() for p in model.parameters())
    self.model = model
    enc = torch.from_numpy(enc).long()
    self.inputs = dict(input_ids=enc, attention_mask=(enc != config.pad_id).long())
    self.kwargs = dict(max_new_tokens=args.new_tokens, do_sample=False,
                       eos_token_id=config.eos_id, pad_token_id=config.pad_id,
                       decoder_start_token_id=config.decoder_start_id)
    self.beams = {"greedy": 1, "beam": args.num_beams}
    self.outputs = {}

  def run(self, mode):
    t0 = time.perf_counter()
    with self.torch.inference_mode():
      out = self.model.generate(**self.inputs, num_beams=self.beams[mode], **self.kwargs)
    seconds = time.perf_counter() - t0
    self.outputs[mode] = out[:, 1:].numpy()  # without the decoder start token
    return seconds


# ----------------------------------------------------------------------------------------------


def main(argv=None):
  args = parse_args(argv)
  import numpy as np
  from hypertune.models.config import t5_config

  # EOS = an id outside the vocabulary: never emitted, so every row decodes full length.
  config = t5_config(args.size, vocab_size=args.vocab, dropout_rate=0.0, eos_id=args.vocab,
                     dtype=args.dtype, scan_layers=not args.no_scan_layers,
                     unrolled_decoding=args.unrolled_decoding)
  enc = make_inputs(args, args.seed)
  expected = args.batch * args.new_tokens
  print(f"T5 {args.size}: d_model={config.d_model} d_ff={config.d_ff} heads={config.num_heads} "
        f"layers={config.num_encoder_layers}+{config.num_decoder_layers} vocab={config.vocab_size}"
        f" | batch {args.batch} x {args.inputs_len} input tokens -> {args.new_tokens} new tokens "
        f"(EOS id {config.eos_id}: never emitted) | greedy and {args.num_beams}-beam "
        f"| {os.cpu_count()} CPUs", flush=True)

  jb = JaxBench(args, config, enc)
  print(f"hypertune:    {jb.num_params / 1e6:.1f}M params, init {jb.init_s:.1f}s, "
        f"dtype={config.dtype} scan_layers={config.scan_layers} "
        f"unrolled_decoding={config.unrolled_decoding}", flush=True)
  benches = {"hypertune": jb}
  if not args.skip_torch:
    import torch
    tb = TorchBench(args, config, enc, jax_to_host(jb.params))
    print(f"transformers: {tb.num_params / 1e6:.1f}M params, init {tb.init_s:.1f}s, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    benches["transformers"] = tb

  modes = ("greedy", "beam")
  first_call_s = {}
  for name, b in benches.items():  # compile (hypertune) / warm up, and the generated count
    for mode in modes:
      first_call_s[name, mode] = b.run(mode)
      n = generated_tokens(b.outputs[mode], config.eos_id)
      if n != expected:
        raise RuntimeError(f"{name} {mode}: generated {n} tokens, expected {expected}")
      print(f"  first call {mode:6s} {name:12s}: {first_call_s[name, mode]:.2f} s", flush=True)
  for mode in modes if "transformers" in benches else ():
    agree = np.mean(jb.outputs[mode] == tb.outputs[mode])
    print(f"{mode:6s}: {expected} tokens generated by each; tokens agreeing "
          f"hypertune vs transformers: {100 * agree:.1f}%", flush=True)

  times = {(name, mode): [] for name in benches for mode in modes}
  for r in range(args.repeats):
    for mode in modes:
      for name, b in benches.items():
        times[name, mode].append(b.run(mode))
        print(f"  repeat {r + 1}/{args.repeats} {mode:6s} {name:12s}: "
              f"{times[name, mode][-1]:.2f} s", flush=True)

  print()
  print(f"{'':21s} {'tokens/s (median)':>18s} {'min-max':>15s} {'s/batch':>8s} "
        f"{'first call s':>13s}")
  medians = {}
  for mode in modes:
    for name in benches:
      tps = [expected / s for s in times[name, mode]]
      med, lo, hi = _median_spread(tps)
      medians[name, mode] = med
      print(f"{mode:6s} {name:14s} {med:18.1f} {lo:7.1f}-{hi:<7.1f} {expected / med:8.2f} "
            f"{first_call_s[name, mode]:13.2f}")
  print()
  for mode in modes if "transformers" in benches else ():
    print(f"ratio hypertune/transformers {mode}: "
          f"{medians['hypertune', mode] / medians['transformers', mode]:.2f}x")
  for mode in modes:
    print(flops_line(f"{mode} (a batch, hypertune.flops)", decode_flops(config, args, mode),
                     expected / medians["hypertune", mode], args.peak_flops))
  return 0


if __name__ == "__main__":
  sys.exit(main())
