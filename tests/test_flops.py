"""`hypertune.flops` against HINT's appendix C.1 (the paper's Tables 1 and 2 reproduced from
its formulas and Table 7's lengths), the formulas' limits, and the T5 count against the real
model: its parameters (`jax.eval_shape`) and XLA's own FLOPs count of the compiled programs.
`bench/amortisation.py --quick` runs at tiny size and prints flops.py's prediction."""
import importlib.util
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax.core import meta

from hypertune import flops
from hypertune.hypernets.hypert5 import HyperT5
from hypertune.models.base import EncoderDecoderModel
from hypertune.models.config import t5_config
from hypertune.models.hypermodel import HyperModel
from hypertune.models.t5 import T5

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# HINT Table 7 (median T5 tokens). S-NI: instance 44, instruction 69, instruction + instance 133,
# instruction + 2 positives 197, + instance 199, output 1. P3: 81, 24, 103, output 6.
SNI = dict(i=44, t_def=69, t_pos=197, concat_def=133, concat_pos=199, o=1)
P3 = dict(i=81, t=24, concat=103, o=6)
N_EXAMPLES = 100  # Tables 1 and 2: "1 task with 100 examples"
SIZES = {"250M": 250e6, "3B": 3e9, "11B": 11e9}  # Table 1's model sizes, as given


def _rel(cost):
  """Table 1's relative FLOPs: to the base-size Tk-Instruct with the definition only."""
  base = flops.concat_flops(SIZES["250M"], N_EXAMPLES, 0, SNI["concat_def"], SNI["o"])
  return cost / base


def _tk(size, setting):
  # The appendix's medians are per format: concatenation's i + t is the joint median.
  return _rel(flops.concat_flops(SIZES[size], N_EXAMPLES, 0, SNI[f"concat_{setting}"], SNI["o"]))


def _hint(size, setting):
  return _rel(flops.hint_flops(SIZES[size], N_EXAMPLES, SNI["i"], SNI[f"t_{setting}"], SNI["o"]))


def test_table1_concatenation_rows_reproduce_from_c1a():
  # Tk-Instruct: x1.5 (250M, Def + 2 Pos.), x12.0 / x17.9 (3B), x65.7 (11B, Def + 2 Pos.).
  assert round(_tk("250M", "def"), 1) == 1.0
  assert round(_tk("250M", "pos"), 1) == 1.5
  assert round(_tk("3B", "def"), 1) == 12.0
  assert round(_tk("3B", "pos"), 1) == 17.9
  assert round(_tk("11B", "pos"), 1) == 65.7


def test_table1_decoder_only_and_hypertune_rows():
  # GPT-2 XL (1.5B, 2N per token, the task's keys / values cached): x4.1 and x4.2.
  gpt2 = lambda t: _rel(flops.decoder_only_flops(1.5e9, N_EXAMPLES, SNI["i"], t, SNI["o"]))
  assert round(gpt2(SNI["t_def"]), 1) == 4.1 and round(gpt2(SNI["t_pos"]), 1) == 4.2
  # Without the cache it would cost as much as concatenating: 2N n (i + t + o).
  assert gpt2(SNI["t_def"]) < 0.35 * _rel(2 * flops.concat_flops(1.5e9, N_EXAMPLES, 0, 133, 1))
  # HyperTune (Phang et al., 3B, Def): x4.1 = (C.1c).
  assert round(_hint("3B", "def"), 1) == 4.1


# Table 1's hypernetwork rows (Hypter, HyperTune, HINT): (size, setting, Rel. FLOPs).
HYPERNET_ROWS = [("250M", "def", 0.4), ("250M", "pos", 0.4), ("3B", "def", 4.3),
                 ("3B", "pos", 4.4), ("3B", "def", 4.1), ("3B", "pos", 4.3), ("3B", "def", 4.5),
                 ("3B", "pos", 4.6), ("11B", "def", 15.3), ("11B", "pos", 15.7),
                 ("11B", "def", 16.1), ("11B", "pos", 16.5)]


@pytest.mark.parametrize("size,setting,paper", HYPERNET_ROWS)
def test_table1_hypernetwork_rows_lie_just_above_c1c(size, setting, paper):
  """(C.1c) drops N' and A >= 0: a lower bound; footnote 5's 'extra (albeit small)
  hypernetwork costs' put the reported values at most ~20% above it (0.05: rounding)."""
  simple = _hint(size, setting)
  assert simple - 0.05 <= paper <= 1.2 * simple + 0.05


def test_table2_p3_rows():
  t0 = flops.concat_flops(SIZES["3B"], N_EXAMPLES, 0, P3["concat"], P3["o"])
  no_prompt = flops.concat_flops(SIZES["3B"], N_EXAMPLES, P3["i"], 0, P3["o"])
  split = flops.hint_flops(SIZES["3B"], N_EXAMPLES, P3["i"], P3["t"], P3["o"])
  joint = flops.hint_flops(SIZES["3B"], N_EXAMPLES, P3["concat"], P3["t"], P3["o"])
  assert round(no_prompt / t0, 1) == 0.8 and round(split / t0, 1) == 0.8  # x0.8, x0.8
  assert joint / t0 - 0.05 <= 1.1 <= 1.2 * joint / t0  # HINT (Joint): x1.1, bounded as above


def test_section_3_3_forms_and_c1b_reduces_to_c1c():
  N, n, i, t = 3e9, 7, 44, 197
  assert flops.concat_flops(N, n, i, t) == N * n * (t + i)
  assert flops.hint_flops(N, n, i, t) == N * (t + n * i)
  assert flops.hint_flops(N, n, i, t, 1, N_prime=0, A=0) == t * N + n * N * (i + 1)
  assert flops.hint_flops(N, n, i, t, 1, N_prime=5, A=2) == t * (N + 5) + n * (N + 2) * (i + 1)


@pytest.mark.parametrize("i,t,o", [(44, 69, 1), (44, 197, 1), (81, 24, 6), (10, 0, 0)])
def test_speedup_limits_and_monotonicity(i, t, o):
  assert flops.hint_speedup(1, i, t, o) == pytest.approx(1.0)  # (C.1c): same cost at n = 1
  assert flops.hint_speedup(1, i, t, o, N=1e9, N_prime=1e8, A=1e7) <= 1.0
  limit = flops.hint_speedup_limit(i, t, o)
  assert limit == pytest.approx((i + t + o) / (i + o))
  assert flops.hint_speedup(1e9, i, t, o) == pytest.approx(limit, rel=1e-6)
  assert flops.hint_speedup_limit(i, t, o, N=1e9, A=1e8) == pytest.approx(limit / 1.1)
  values = [flops.hint_speedup(n, i, t, o) for n in (1, 2, 10, 100, 1000, 10**6)]
  if t > 0:
    assert all(a < b < limit for a, b in zip(values, values[1:]))
    # Longer task data: more saved per query.
    assert flops.hint_speedup(100, i, t + 50, o) > flops.hint_speedup(100, i, t, o)
  else:  # nothing to amortise
    assert values == pytest.approx([1.0] * len(values))


@pytest.mark.parametrize("overrides", [
    {},  # T5 v1.1: gated-GELU, untied lm_head
    dict(mlp_activation="relu", tie_word_embeddings=True, num_decoder_layers=3, num_heads=2,
         d_kv=24, relative_attention_num_buckets=6),  # original T5, unequal depths, inner != d
])
def test_parameter_count_matches_the_model(overrides):
  cfg = t5_config("tiny", vocab_size=96, **overrides)
  ones = jnp.ones((1, 4), jnp.int32)
  shapes = jax.eval_shape(lambda: T5(cfg).init(jax.random.key(0), ones, ones))["params"]
  assert flops.t5_num_params(cfg) == sum(x.size for x in jax.tree.leaves(meta.unbox(shapes)))


def test_paper_n_per_token_holds_at_the_papers_sizes():
  """A token through one stack of an encoder-decoder costs ~N FLOPs at 3B and 11B (the paper's
  convention); at t5-small embeddings are much of N and an encoder token costs far less."""
  for size in ("xl", "xxl"):
    cfg = t5_config(size)
    per_token = flops.query_flops(cfg, 200, 0) / 200  # encoder + cross-attention keys, values
    assert 0.9 < per_token / flops.t5_num_params(cfg) < 1.0
  small = t5_config("small")
  assert flops.query_flops(small, 200, 0) / 200 / flops.t5_num_params(small) < 0.65
  # A decoder token also pays the logits: about N even at t5-small.
  dec = flops.decoder_flops(small, 1, 1, 200) - flops.decoder_flops(small, 0, 0, 200)
  assert 0.9 < dec / flops.t5_num_params(small) < 1.1


def test_amortisation_limits_and_break_even():
  cfg = t5_config("small")
  am = flops.amortisation(cfg, 197, 44, 1, prefix_len=16)
  assert am.concat(10) == 10 * am.concat(1) and am.hyper(0) == am.once > 0
  assert am.speedup(1) < 1.0  # the hypernetwork and the prefixes cost extra for one query
  values = [am.speedup(n) for n in (1, 10, 100, 1000, 10**7)]
  assert all(a < b for a, b in zip(values, values[1:]))
  assert values[-1] == pytest.approx(am.limit, rel=1e-5) and 1 < am.break_even_n < 10
  assert am.speedup(am.break_even_n) == pytest.approx(1.0)
  # The paper's (C.1c) value at the same lengths is of the same size (N per token is coarse).
  assert 0.7 < am.speedup(100) / flops.hint_speedup(100, 44, 197, 1) < 1.3


def test_bad_input_is_a_clear_error():
  cfg = t5_config("tiny")
  with pytest.raises(ValueError, match="inputs_len must be a finite number >= 0"):
    flops.query_flops(cfg, -1, 2)
  with pytest.raises(ValueError, match="n must be a finite number >= 1"):
    flops.hint_speedup(0, 44, 69)
  with pytest.raises(ValueError, match=r"num_hyper_decoder_layers must be in \[1, 2\]"):
    flops.hypert5_prefix_flops(cfg, 10, 4, num_hyper_decoder_layers=3)


def test_t5_count_matches_xla_cost_analysis():
  """flops.py counts the matmuls; XLA counts every op of the same programs (norms, softmax,
  activations too): a few percent more at tiny size. Layers unrolled (XLA counts a loop body
  once). Decoding one token: XLA counts the first step (before the decoding loop) and the loop's
  body once, two decoder steps, so it is compared with the count for two target tokens."""
  cfg = t5_config("tiny", vocab_size=128, scan_layers=False)
  t, i, o, p, b = 24, 8, 1, 4, 2
  model = EncoderDecoderModel(HyperModel(cfg, hypernet=HyperT5(
      cfg, cfg, prefix_len=p, num_hyper_decoder_layers=1)))
  shapes = {"encoder_input_tokens": (1, 4), "decoder_input_tokens": (1, 4),
            "hyper_encoder_input_tokens": (1, 4)}
  params = meta.unbox(jax.eval_shape(lambda: model.init_variables(jax.random.key(0), shapes)))
  params = params["params"]
  ones = lambda *s: jnp.ones(s, jnp.int32)
  demos = ones(1, t)
  task = jax.eval_shape(model.task_parameters, params, {}, demos)
  xla = lambda fn, *args: jax.jit(fn).lower(*args).cost_analysis()["flops"]
  query = {"encoder_input_tokens": ones(b, i), "decoder_input_tokens": ones(b, o),
           "decoder_target_tokens": ones(b, o)}
  concat = dict(query, encoder_input_tokens=ones(b, t + i))
  for decode in (False, True):  # one count: decoding projects the encoded inputs once as well
    am = flops.amortisation(cfg, t, i, o + decode, p, 1)
    run = ((lambda m, pr, tp, x: m.predict(pr, tp, x, o)) if decode else
           (lambda m, pr, tp, x: m.score(pr, tp, x)))
    counted = {
        "once": (am.once, xla(lambda pr, h: model.task_parameters(pr, {}, h), params, demos)),
        "hyper": (b * am.per_query_hyper,
                  xla(lambda pr, tp, x: run(model, pr, tp.repeat(b), x), params, task, query)),
        "concat": (b * am.per_query_concat,
                   xla(lambda pr, x: run(model, pr, None, x), params, concat))}
    for name, (ours, theirs) in counted.items():
      assert 1.0 <= theirs / ours < 1.08, (decode, name, ours, theirs)


def _bench_module():
  spec = importlib.util.spec_from_file_location("amortisation",
                                                os.path.join(REPO, "bench", "amortisation.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_amortisation_benchmark_quick_prints_the_flops_prediction():
  bench = _bench_module()
  with pytest.raises(SystemExit):
    bench.parse_args(["--n", "150", "--batch", "100"])  # neither <= batch nor a multiple of it
  out = subprocess.run([sys.executable, "bench/amortisation.py", "--quick"], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  q = bench.QUICK
  cfg = t5_config(q["size"], vocab_size=q["vocab"])
  am = flops.amortisation(cfg, q["hyper_len"], q["inputs_len"], q["targets_len"],
                          q["prefix_len"], q["num_hyper_decoder_layers"])
  got = re.search(r"downstream ([0-9.]+)M \(flops.t5_num_params ([0-9.]+)M\)", out.stdout)
  assert got and got.group(1) == got.group(2) == f"{flops.t5_num_params(cfg) / 1e6:.2f}"
  row = r"^\s*(\d+)\s+[0-9.]+\s+[0-9.]+\s+[0-9.]+x\s+[0-9.]+-[0-9.]+\s+([0-9.]+)x"
  rows = {int(m.group(1)): float(m.group(2)) for m in re.finditer(row, out.stdout, re.M)}
  assert set(rows) == {1, 2}, out.stdout
  for n, predicted in rows.items():
    assert predicted == pytest.approx(am.speedup(n), abs=0.006)
