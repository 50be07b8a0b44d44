"""Hyperpretraining objectives over token sequences (pure, seeded functions).

All functions take a list of token ids and a `random.Random` (seed it per document
with `fewshot.stable_seed(seed, doc_index)`: split points are then independent of
everything else) and return a three-input example of token lists::

    {"hyper_inputs": [...], "inputs": [...], "targets": [...]}

* `caclm_split` - HyperT5's Context-Augmented Conditional LM: a window of `length`
  (512) tokens is cut into consecutive A, B, C, D with |B| = 32; the hypernetwork reads
  ``<s0> A <s1> D`` (sentinels mark the two segments), the downstream model reads B
  and predicts C.
* `hint_split` - HINT: three random-length chunks a -> b -> c; the hypernetwork reads
  a, the downstream model reads b and predicts c.
* `gist_split` - HyperLlama's compression hyperpretraining for decoder-only models:
  A and D concatenated (``A <sep> D``) are compressed into gist tokens (appended by
  the model), the downstream model reads B and predicts C.
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


def _abcd(tokens, rng, length, b_length, min_len):
  w = _window(tokens, length, rng)
  rest = len(w) - b_length
  if rest < 3 * min_len:
    raise ValueError(f"sequence of {len(w)} tokens too short for CACLM with |B|={b_length}")
  # A | B(fixed) | C | D: choose |A| and the C/D cut over the remaining tokens.
  cuts = _cuts(rest, 2, rng, min_len)
  a_len, cd_cut = cuts[0], cuts[1]
  a = w[:a_len]
  b = w[a_len:a_len + b_length]
  c = w[a_len + b_length: cd_cut + b_length]
  d = w[cd_cut + b_length:]
  return a, b, c, d


def caclm_split(tokens: Sequence[int], rng: random.Random, length: int = 512,
                b_length: int = 32, sentinels: Sequence[int] = T5_CACLM_SENTINELS,
                min_len: int = 1) -> Dict[str, List[int]]:
  a, b, c, d = _abcd(tokens, rng, length, b_length, min_len)
  return {"hyper_inputs": [sentinels[0]] + a + [sentinels[1]] + d, "inputs": b, "targets": c}


def hint_split(tokens: Sequence[int], rng: random.Random, length: int = 512,
               min_len: int = 1) -> Dict[str, List[int]]:
  w = _window(tokens, length, rng)
  i, j = _cuts(len(w), 2, rng, min_len)
  return {"hyper_inputs": w[:i], "inputs": w[i:j], "targets": w[j:]}


def gist_split(tokens: Sequence[int], rng: random.Random, length: int = 512,
               b_length: int = 32, separator: Sequence[int] = (), min_len: int = 1
               ) -> Dict[str, List[int]]:
  a, b, c, d = _abcd(tokens, rng, length, b_length, min_len)
  return {"hyper_inputs": a + list(separator) + d, "inputs": b, "targets": c}


OBJECTIVES = {"caclm": caclm_split, "hint": hint_split, "gist": gist_split}
