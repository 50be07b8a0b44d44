"""Inference FLOPs of few-shot concatenation against a hypernetwork that reads the task once
(HINT, Ivison et al., section 3.3 "Inference" and appendix C.1).

The paper's notation (appendix C.1): `n` same-task queries, each of `i` input and `o` output
tokens; `t` tokens of task data (instruction and / or demonstrations); `N` the model's
parameters; `N'` the hypernetwork generator's cost and `A` that of the inserted PEFT modules
(both per token, as `N`). A token through an encoder-decoder costs `N` FLOPs (section 3.3; our
reading: 2 FLOPs per multiply-add, as Kaplan et al. 2020, of the roughly N / 2 weights of the one
stack it passes through). A decoder-only model's tokens meet all its weights: 2N (appendix D).

The appendix does not number its formulas; the labels here are ours:

    (C.1a) concatenation (Tk-Instruct, T0, few-shot concatenation):  N n (i + t + o)
    (C.1b) HINT:                          t (N + N') + n (N + A) (i + o)
    (C.1c) HINT with N >> N', N >> A:     t N + n N (i + o)
    (3.3)  section 3.3 ignores outputs (o = 0): N n (t + i) against N (t + n i)
    (D)    a decoder-only model (2N per token) that caches the task's keys / values:
                                          2N (t + n (i + o))

The speed-up `(C.1a) / (C.1b)` is 1 at n = 1 under (C.1c), grows with n and tends to
`(i + t + o) / (i + o)` (times `N / (N + A)` under (C.1b)).

`amortisation(config, ...)` counts the same two costs for hypertune's T5 (`T5Config`) and
HyperT5-Prefix term by term: 2 FLOPs per multiply-add of every weight matrix a token meets, plus
the attention products the paper leaves out (`4 * keys * num_heads * d_kv` per query token and
attention: q.k and the weighted sum of values; Kaplan et al.'s context term is
`2 n_layer n_ctx d_attn`). Embedding lookups, norms, softmax, biases and activations are not
counted (XLA's own count of the same programs is a few percent higher at tiny size,
tests/test_flops.py). Attention over masked positions is counted (it is computed).
"""
import dataclasses
import math
import numbers
from typing import Optional

from hypertune.models.config import T5Config


def _check(name: str, value, minimum=0):
  if not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= minimum):
    raise ValueError(f"flops: {name} must be a finite number >= {minimum}, got {value!r}")


# ----------------------------------------------------------------------------------------------
# The paper's formulas (appendix C.1, section 3.3, appendix D).


def concat_flops(N: float, n: float, i: float, t: float, o: float = 0) -> float:
  """(C.1a) `N n (i + t + o)`: every query carries the task data in its input.

  With `o = 0` it is section 3.3's `N n (t + i)`.
  """
  for name, v in (("N", N), ("n", n), ("i", i), ("t", t), ("o", o)):
    _check(name, v)
  return N * n * (i + t + o)


def hint_flops(N: float, n: float, i: float, t: float, o: float = 0, N_prime: float = 0,
               A: float = 0) -> float:
  """(C.1b) `t (N + N') + n (N + A) (i + o)`: the task data once through the hypernetwork
  (its encoder is the size of the model's), then every query without it, through the model with
  the PEFT modules inserted.

  With `N_prime = A = 0` it is (C.1c) `t N + n N (i + o)`; with `o = 0` too, section 3.3's
  `N (t + n i)`.
  """
  for name, v in (("N", N), ("n", n), ("i", i), ("t", t), ("o", o), ("N_prime", N_prime),
                  ("A", A)):
    _check(name, v)
  return t * (N + N_prime) + n * (N + A) * (i + o)


def hint_speedup(n: float, i: float, t: float, o: float = 0, N: float = 1.0,
                 N_prime: float = 0, A: float = 0) -> float:
  """(C.1a) / (C.1b): how many times cheaper the hypernetwork is for `n` queries.

  Under (C.1c) (`N_prime = A = 0`, then `N` cancels) it is `n (i + t + o) / (t + n (i + o))`:
  1 at n = 1, tending to `(i + t + o) / (i + o)`.
  """
  _check("n", n, minimum=1)
  return concat_flops(N, n, i, t, o) / hint_flops(N, n, i, t, o, N_prime, A)


def hint_speedup_limit(i: float, t: float, o: float = 0, N: float = 1.0, A: float = 0) -> float:
  """The n -> infinity limit of `hint_speedup`: `N (i + t + o) / ((N + A) (i + o))`."""
  for name, v in (("i", i), ("t", t), ("o", o), ("N", N), ("A", A)):
    _check(name, v)
  if i + o <= 0:
    raise ValueError("flops: i + o must be > 0 for a finite limit")
  return N * (i + t + o) / ((N + A) * (i + o))


def decoder_only_flops(N: float, n: float, i: float, t: float, o: float = 0) -> float:
  """(D) `2N (t + n (i + o))`: a decoder-only model at 2N FLOPs per token (appendix D, after
  Kaplan et al.) that processes the task data once and caches its keys and values (section 5.1);
  the reading that reproduces Table 1's GPT-2 XL rows (x4.1, x4.2)."""
  for name, v in (("N", N), ("n", n), ("i", i), ("t", t), ("o", o)):
    _check(name, v)
  return 2 * N * (t + n * (i + o))


# ----------------------------------------------------------------------------------------------
# Counted for hypertune's T5 and HyperT5-Prefix.


def t5_num_params(config: T5Config) -> int:
  """Parameters of `hypertune.models.t5.T5(config)`: N of the paper's formulas.

  Embedding `[vocab, d_model]`; per encoder layer q, k, v `[d_model, heads, d_kv]`, out
  `[heads, d_kv, d_model]`, the MLP (`wi_0`, `wi_1`, `wo` gated-GELU; `wi`, `wo` ReLU) and two
  RMS norms; per decoder layer a second attention and a third norm; one relative-position table
  `[buckets, heads]` and a final norm per stack; an untied `lm_head` `[d_model, vocab]`.
  """
  d, inner = config.d_model, config.inner_dim
  mlp = (3 if config.mlp_activation == "gated-gelu" else 2) * d * config.d_ff
  relpos = config.relative_attention_num_buckets * config.num_heads
  encoder = config.num_encoder_layers * (4 * d * inner + mlp + 2 * d) + relpos + d
  decoder = config.num_decoder_layers * (8 * d * inner + mlp + 3 * d) + relpos + d
  lm_head = 0 if config.tie_word_embeddings else d * config.vocab_size
  return config.vocab_size * d + encoder + decoder + lm_head


def _mlp_weights(config: T5Config) -> int:
  return (3 if config.mlp_activation == "gated-gelu" else 2) * config.d_model * config.d_ff


def encoder_flops(config: T5Config, length: int, prefix_len: int = 0) -> int:
  """Encoder stack over `length` tokens, `prefix_len` prefix keys in every self-attention:

      length * L_enc * (2 (4 d inner + mlp) + 4 (length + prefix_len) inner)
  """
  d, inner, layers = config.d_model, config.inner_dim, config.num_encoder_layers
  per_token = 2 * (4 * d * inner + _mlp_weights(config)) + 4 * (length + prefix_len) * inner
  return length * layers * per_token


def decoder_flops(config: T5Config, length: int, keys: int, memory_len: int,
                  prefix_len: int = 0, cross_kv_passes: int = 1, logits: bool = True) -> int:
  """Decoder stack: `length` tokens, each attending to `keys` positions of its own (the target
  length teacher-forced, the cache length when decoding) and `memory_len` encoded ones, plus
  `prefix_len` prefix keys in both attentions:

      length * L_dec * (2 (6 d inner + mlp) + 4 (keys + memory_len + 2 prefix_len) inner)
      + cross_kv_passes * memory_len * L_dec * 2 (2 d inner)      cross-attention keys, values
      + length * 2 d vocab                                       logits (`logits=True`)

  Decoding projects the encoded memory once, at its first step (the keys/values are cached:
  `layers.Attention(fixed_kv=True)`), so `cross_kv_passes` is 1 there too.
  """
  d, inner, layers = config.d_model, config.inner_dim, config.num_decoder_layers
  per_token = (2 * (6 * d * inner + _mlp_weights(config)) +
               4 * (keys + memory_len + 2 * prefix_len) * inner)
  cross_kv = cross_kv_passes * memory_len * layers * 4 * d * inner
  head = length * 2 * d * config.vocab_size if logits else 0
  return length * layers * per_token + cross_kv + head


def query_flops(config: T5Config, inputs_len: int, targets_len: int, prefix_len: int = 0) -> int:
  """One query through T5: encoder over `inputs_len` tokens, decoder over `targets_len`.

  The same count for teacher-forced scoring (`BaseModel.score`) and for greedy decoding of
  `targets_len` tokens with a cache of that length (`BaseModel.predict`): decoding projects the
  encoded inputs for cross-attention once, at its first step.
  """
  for name, v in (("inputs_len", inputs_len), ("targets_len", targets_len),
                  ("prefix_len", prefix_len)):
    _check(name, v)
  enc = encoder_flops(config, inputs_len, prefix_len)
  dec = decoder_flops(config, targets_len, targets_len, inputs_len, prefix_len)
  return enc + dec


def hypert5_prefix_flops(config: T5Config, hyper_len: int, prefix_len: int,
                         num_hyper_decoder_layers: Optional[int] = None,
                         hyper_config: Optional[T5Config] = None) -> int:
  """`HyperT5(peft_type="prefix")` once over `hyper_len` task tokens (the paper's `t (N + N')`):
  the hyper encoder over them, the non-causal hyper decoder over 2P learned tokens attending to
  them, and the four MLP heads (LayerNorm -> d x d -> tanh -> d x layers*inner) over P rows
  each: enc_k, enc_v -> `[L_enc, P, heads, d_kv]`, dec_k, dec_v -> `[L_dec, P, heads, d_kv]`.

  `config` is the downstream's; `hyper_config` the hypernetwork's backbone (default: the same).
  """
  _check("hyper_len", hyper_len)
  _check("prefix_len", prefix_len)
  hcfg = hyper_config or config
  layers = num_hyper_decoder_layers or hcfg.num_decoder_layers
  if not 1 <= layers <= hcfg.num_decoder_layers:
    raise ValueError(f"flops: num_hyper_decoder_layers must be in [1, "
                     f"{hcfg.num_decoder_layers}], got {num_hyper_decoder_layers!r}")
  tokens = 2 * prefix_len
  encoder = encoder_flops(hcfg, hyper_len)
  decoder = decoder_flops(hcfg.replace(num_decoder_layers=layers), tokens, tokens, hyper_len,
                          logits=False)
  hd = hcfg.d_model
  out = (config.num_encoder_layers + config.num_decoder_layers) * config.inner_dim
  heads = prefix_len * 2 * 2 * (2 * hd * hd + hd * out)  # (k, v) x 2 FLOPs x both kinds
  return encoder + decoder + heads


@dataclasses.dataclass(frozen=True)
class Amortisation:
  """FLOPs of `n` same-task queries both ways, from the costs of one query and of the task.

      concat(n) = n * per_query_concat                 (C.1a)  N n (i + t + o)
      hyper(n)  = once + n * per_query_hyper           (C.1b)  t (N + N') + n (N + A) (i + o)
  """
  per_query_concat: float  # [demonstrations; query] through the model
  once: float  # the hypernetwork over the demonstrations
  per_query_hyper: float  # the query alone, with the generated PEFT

  def concat(self, n: float) -> float:
    _check("n", n)
    return n * self.per_query_concat

  def hyper(self, n: float) -> float:
    _check("n", n)
    return self.once + n * self.per_query_hyper

  def speedup(self, n: float) -> float:
    """concat(n) / hyper(n): increasing in n (when once > 0), from
    `per_query_concat / (once + per_query_hyper)` at n = 1 to `limit`."""
    _check("n", n, minimum=1)
    return self.concat(n) / self.hyper(n)

  @property
  def limit(self) -> float:
    """n -> infinity: `per_query_concat / per_query_hyper`."""
    return self.per_query_concat / self.per_query_hyper

  @property
  def break_even_n(self) -> float:
    """The n at which both cost the same: `once / (per_query_concat - per_query_hyper)` (inf
    when a query with the PEFT costs at least as much as one with the demonstrations)."""
    saved = self.per_query_concat - self.per_query_hyper
    return self.once / saved if saved > 0 else math.inf


def amortisation(config: T5Config, hyper_len: int, inputs_len: int, targets_len: int,
                 prefix_len: int = 16, num_hyper_decoder_layers: Optional[int] = None,
                 hyper_config: Optional[T5Config] = None) -> Amortisation:
  """Few-shot concatenation (a plain T5 over `[demonstrations; query]`, `hyper_len + inputs_len`
  input tokens) against HyperT5-Prefix (the hypernetwork once over the `hyper_len`
  demonstration tokens, then the `inputs_len` query tokens with `prefix_len` prefixes in every
  attention), `targets_len` target tokens each, scored or greedily decoded (`query_flops`).

  The paper's t, i, o are `hyper_len`, `inputs_len`, `targets_len`.
  """
  return Amortisation(
      per_query_concat=query_flops(config, hyper_len + inputs_len, targets_len),
      once=hypert5_prefix_flops(config, hyper_len, prefix_len, num_hyper_decoder_layers,
                                hyper_config),
      per_query_hyper=query_flops(config, inputs_len, targets_len, prefix_len))
