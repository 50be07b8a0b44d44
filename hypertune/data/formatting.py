"""Text formatting of hypernetwork inputs (HyperT5 appendix A.1).

Few-shot demonstrations are written for the hypernetwork as::

    <x> Input 1 <y> Target 1 <x> Input 2 <y> Target 2 ...

and an instruction (S-NI definition) is "just another example" in front::

    <x> Instruction <x> Input 1 <y> Target 1 <x> Input 2 <y> Target 2

`<x>` and `<y>` are special tokens. Which strings stand for them depends on the
vocabulary:

* SentencePiece (T5): `<x>` = ``<extra_id_0>``, `<y>` = ``<extra_id_1>``. These are
  single reserved pieces of the T5 vocabulary (ids 32099 and 32098) that never occur
  in natural text outside span corruption, so the hypernetwork sees them as atoms.
* ByteVocabulary: `<x>` = ``"\\x1e"`` (ASCII RECORD SEPARATOR), `<y>` = ``"\\x1f"``
  (ASCII UNIT SEPARATOR). Each is one byte (one token) and these control characters
  were designed as field/record separators and do not occur in the task text
  (loaders reject nothing for it, but `check_no_special_tokens` can be used).

Everything here is pure Python over strings; token budgets are enforced by passing
a ``length_fn`` (number of tokens of a string) built from the vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence, Tuple

Demonstration = Tuple[str, str]  # (input, target)
LengthFn = Callable[[str], int]


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  """Strings used for the `<x>` (input) and `<y>` (target) markers."""

  x: str
  y: str


SENTENCEPIECE_TOKENS = SpecialTokens(x="<extra_id_0>", y="<extra_id_1>")
BYTE_TOKENS = SpecialTokens(x="\x1e", y="\x1f")


def special_tokens_for(vocabulary) -> SpecialTokens:
  """Returns the `<x>`/`<y>` strings for a seqio vocabulary (see module doc)."""
  # Imported lazily so this module stays importable without seqio/TF.
  import seqio  # pylint: disable=g-import-not-at-top

  if isinstance(vocabulary, seqio.ByteVocabulary):
    return BYTE_TOKENS
  if isinstance(vocabulary, seqio.SentencePieceVocabulary):
    if vocabulary.extra_ids < 2:
      # seqio adds the T5 extra ids to the model only when extra_ids is set; without
      # them "<extra_id_0>" would be split into ordinary pieces.
      raise ValueError(
          "SentencePieceVocabulary needs extra_ids >= 2 for the <x>/<y> tokens "
          f"(got extra_ids={vocabulary.extra_ids}); use seqio.SentencePieceVocabulary"
          "(path, extra_ids=100) as T5 does.")
    return SENTENCEPIECE_TOKENS
  raise TypeError(f"No <x>/<y> convention for vocabulary type {type(vocabulary).__name__}")


def _clean(text: str) -> str:
  return " ".join(str(text).split())


def format_demonstration(demo: Demonstration, tokens: SpecialTokens) -> str:
  """`<x> input <y> target` for one demonstration."""
  x, y = demo
  return f"{tokens.x} {_clean(x)} {tokens.y} {_clean(y)}"


def format_hyper_inputs(
    instruction: Optional[str],
    demonstrations: Sequence[Demonstration],
    tokens: SpecialTokens,
    length_fn: Optional[LengthFn] = None,
    max_length: Optional[int] = None,
) -> Tuple[str, int]:
  """Formats `<x> Instruction <x> In 1 <y> Out 1 ...` within a token budget.

  Args:
    instruction: task definition, or None/"" for none.
    demonstrations: (input, target) pairs in order.
    tokens: the `<x>`/`<y>` strings.
    length_fn: number of tokens of a string (without EOS); required with max_length.
    max_length: token budget for the whole string (EOS excluded). Demonstrations are
      dropped whole from the end until the text fits; one is never cut in half. The
      instruction is always kept (if it alone is too long the feature converter
      truncates it).

  Returns:
    (text, number of demonstrations kept).
  """
  parts = []
  if instruction:
    parts.append(f"{tokens.x} {_clean(instruction)}")
  demo_parts = [format_demonstration(d, tokens) for d in demonstrations]
  if max_length is None:
    return " ".join(parts + demo_parts), len(demo_parts)
  if length_fn is None:
    raise ValueError("format_hyper_inputs: max_length given without a length_fn")
  # Piecewise lengths are an estimate for SentencePiece (merges across the join are
  # possible), so keep dropping until the joined text is verified to fit.
  budget = max_length - (length_fn(parts[0]) if parts else 0)
  kept = []
  used = 0
  for p in demo_parts:
    n = length_fn(p)
    if used + n > budget:
      break
    kept.append(p)
    used += n
  while True:
    text = " ".join(parts + kept)
    if not kept or length_fn(text) <= max_length:
      return text, len(kept)
    kept.pop()


def format_concat_inputs(hyper_text: str, query: str, tokens: SpecialTokens) -> str:
  """Few-shot concatenation baseline (T5-MTF-Few-shot / Tk-Instruct style).

  The hypernetwork text goes in front of the query, which is marked as one more
  `<x>` example whose target the model must produce:
  ``<x> Instruction <x> In 1 <y> Out 1 <x> Query <y>``. With no hyper text this is
  just ``<x> Query <y>``.
  """
  q = f"{tokens.x} {_clean(query)} {tokens.y}"
  return f"{hyper_text} {q}" if hyper_text else q


def check_no_special_tokens(text: str, tokens: SpecialTokens, where: str) -> None:
  """Raises if task text contains the `<x>`/`<y>` marker strings."""
  for t in (tokens.x, tokens.y):
    if t in text:
      raise ValueError(f"{where}: text contains the reserved marker {t!r}: {text[:80]!r}")
