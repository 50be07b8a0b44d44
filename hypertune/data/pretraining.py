"""Hyperpretraining objectives over token sequences (pure, seeded functions).

All functions take a list of token ids and a `random.Random` (seed it per document
with `fewshot.stable_seed(seed, doc_index)`: split points are then independent of
everything else) and return a three-input example of token lists::

    {"hyper_inputs": [...], "inputs": [...], "targets": [...]}

* `caclm_split` - HyperT5's Context-Augmented Conditional LM (section 4.2): "we sample a
  512-token sequence from a pretraining corpus and split it into four consecutive segments
  A-D. The downstream model receives segment B as input and predicts segment C [...] The
  hypermodel receives segments A and D as input", with "segment B very short (32 tokens)"
  and "Segments A and D are marked by sentinel tokens": the hypernetwork reads
  ``<s0> A <s1> D``, the downstream model reads B and predicts C.
* `hint_split` - HINT: three random-length chunks a -> b -> c; the hypernetwork reads
  a, the downstream model reads b and predicts c.
* `gist_split` - HyperLlama's compression hyperpretraining for decoder-only models:
  A and D concatenated (``A <sep> D``) are compressed into gist tokens (appended by
  the model), the downstream model reads B and predicts C.

CACLM and gist cut A, B, C, D the same way (`_abcd`). The paper fixes only the window
(512) and |B| (32); the rest is ours: |C| is drawn uniformly from
``[min_len, max_target_length - 1]`` (C must fit the 128-token target length of
appendix A, with one position to spare for an EOS, or the feature converter trims it
and D no longer follows the predicted tokens), then |A| uniformly with |A|, |D| >=
`min_len` (8: each context side has a few tokens to read). Documents shorter than the
window are split whole.
"""

from __future__ import annotations

import random
from typing import Dict, List, Sequence

# T5 sentinels for CACLM's A/D markers. <extra_id_0>/<extra_id_1> are the <x>/<y>
# few-shot markers, so the pretraining sentinels are <extra_id_2>/<extra_id_3>.
T5_CACLM_SENTINELS = (32097, 32096)


def _window(tokens: Sequence[int], length: int, rng: random.Random) -> List[int]:
  tokens = list(tokens)
  if len(tokens) <= length:
    return tokens
  start = rng.randint(0, len(tokens) - length)
  return tokens[start:start + length]


def _cuts(n: int, k: int, rng: random.Random, min_len: int) -> List[int]:
  """k sorted cut points splitting n tokens into k+1 pieces of >= min_len each."""
  if n < (k + 1) * min_len:
    raise ValueError(f"sequence of {n} tokens too short for {k + 1} pieces of >= {min_len}")
  free = n - (k + 1) * min_len
  pts = sorted(rng.randint(0, free) for _ in range(k))
  return [p + (i + 1) * min_len for i, p in enumerate(pts)]


def _abcd(tokens, rng, length, b_length, min_len, max_target_length):
  """Consecutive A, B, C, D of one window: |B| = b_length, min_len <= |C| < max_target_length,
  |A|, |D| >= min_len."""
  if max_target_length - 1 < min_len:
    raise ValueError(f"max_target_length={max_target_length} leaves no room for a C of "
                     f">= {min_len} tokens")
  w = _window(tokens, length, rng)
  rest = len(w) - b_length  # |A| + |C| + |D|
  if rest < 3 * min_len:
    raise ValueError(f"sequence of {len(w)} tokens too short for CACLM with |B|={b_length} "
                     f"and segments of >= {min_len}")
  c_len = rng.randint(min_len, min(max_target_length - 1, rest - 2 * min_len))
  a_len = rng.randint(min_len, rest - c_len - min_len)
  c_start = a_len + b_length
  return w[:a_len], w[a_len:c_start], w[c_start:c_start + c_len], w[c_start + c_len:]


def caclm_split(tokens: Sequence[int], rng: random.Random, length: int = 512,
                b_length: int = 32, sentinels: Sequence[int] = T5_CACLM_SENTINELS,
                min_len: int = 8, max_target_length: int = 128) -> Dict[str, List[int]]:
  """One CACLM example from a window of `length` tokens of `tokens` (see the module doc)."""
  a, b, c, d = _abcd(tokens, rng, length, b_length, min_len, max_target_length)
  return {"hyper_inputs": [sentinels[0]] + a + [sentinels[1]] + d, "inputs": b, "targets": c}


def hint_split(tokens: Sequence[int], rng: random.Random, length: int = 512,
               min_len: int = 1) -> Dict[str, List[int]]:
  w = _window(tokens, length, rng)
  i, j = _cuts(len(w), 2, rng, min_len)
  return {"hyper_inputs": w[:i], "inputs": w[i:j], "targets": w[j:]}


def gist_split(tokens: Sequence[int], rng: random.Random, length: int = 512,
               b_length: int = 32, separator: Sequence[int] = (), min_len: int = 8,
               max_target_length: int = 128) -> Dict[str, List[int]]:
  a, b, c, d = _abcd(tokens, rng, length, b_length, min_len, max_target_length)
  return {"hyper_inputs": a + list(separator) + d, "inputs": b, "targets": c}


OBJECTIVES = {"caclm": caclm_split, "hint": hint_split, "gist": gist_split}
