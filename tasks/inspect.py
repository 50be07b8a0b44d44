"""Print formatted examples and token-length statistics of a task or mixture.

    python -m tasks.inspect builtin_train
    python -m tasks.inspect sni_def_2pos_test --spm ../shared/data/t5_vocab/spiece.model
    python -m tasks.inspect p3.super_glue_rte_GPT_3_style --split validation -n 2
    python -m tasks.inspect sni_def_2pos_concat_test --lengths 1024,1408,128

The source is registered from the name's prefix (builtin*, sni*, p3*, metaicl_<split>*),
reading ../shared/data/<source> unless --data_dir is given; S-NI and MetaICL are
registered with --lengths as their task_feature_lengths (so a concat variant needs the
long inputs length of its run). `<x>`/`<y>` markers are shown as "<x>"/"<y>" whatever
the vocabulary.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, "..", "shared", "data")


def register_for(name: str, data_dir: Optional[str], vocabulary, lengths=None) -> None:
  """Registers the source a task/mixture name belongs to (S-NI, MetaICL: with `lengths`)."""
  from hypertune.data import feature_converters  # pylint: disable=g-import-not-at-top
  lengths = lengths or feature_converters.DEFAULT_TASK_FEATURE_LENGTHS
  from tasks import builtin, metaicl, p3, sni  # pylint: disable=g-import-not-at-top
  if name.startswith("builtin"):
    builtin.register_builtin_suite(data_dir=data_dir, vocabulary=vocabulary)
  elif name.startswith("sni"):
    sni.register_sni(data_dir or os.path.join(SHARED, "sni"), vocabulary,
                     settings=tuple(sni.sni.SETTINGS), hyper_modes=("hyper", "concat", "none"),
                     task_feature_lengths=lengths)
  elif name.startswith("p3"):
    p3.register_p3(data_dir or os.path.join(SHARED, "p3"), vocabulary)
  elif name.startswith("metaicl_"):
    split = name[len("metaicl_"):].split(".")[0]
    for suffix in ("_concat", "_zeroshot", "_train", "_test"):
      split = split.split(suffix)[0]
    metaicl.register_metaicl(data_dir or os.path.join(SHARED, "metaicl"), split,
                             vocabulary=vocabulary, task_feature_lengths=lengths)
  else:
    raise SystemExit(f"don't know which source registers {name!r} "
                     "(prefixes: builtin, sni, p3, metaicl_<split>)")


def _show(text: str, tokens) -> str:
  return text.replace(tokens.x, "<x>").replace(tokens.y, "<y>")


def _stats(values: List[int], limit: int) -> str:
  if not values:
    return "n/a"
  s = sorted(values)
  p95 = s[min(len(s) - 1, int(0.95 * len(s)))]
  over = sum(v > limit for v in values)
  return (f"mean {statistics.mean(values):7.1f}  p95 {p95:5d}  max {s[-1]:5d}  "
          f"> {limit}: {over}/{len(values)}")


def inspect(name: str, split: Optional[str], n: int, max_stats: int, vocabulary,
            lengths, out=sys.stdout) -> None:
  from hypertune.data import formatting  # pylint: disable=g-import-not-at-top
  from tasks import common  # pylint: disable=g-import-not-at-top
  tokens = formatting.special_tokens_for(vocabulary)
  length_fn = common.length_fn_for(vocabulary)
  task_names = common.mixture_tasks(name)
  print(f"{name}: {len(task_names)} task(s)", file=out)
  per = {"hyper_inputs": [], "inputs": [], "targets": []}
  shown = 0
  for t in task_names:
    builder = common.get_builder(t)
    splits = [split] if split else sorted(builder.task.splits)
    for sp in splits:
      if sp not in builder.task.splits:
        continue
      for i, ex in enumerate(builder.examples(sp)):
        if i >= max_stats:
          break
        for k in per:
          per[k].append(length_fn(ex[k]) + 1)  # + EOS
        if shown < n:
          shown += 1
          print(f"\n--- {t} [{sp}] example {ex['example_id']}", file=out)
          for k in ("hyper_inputs", "inputs", "targets"):
            print(f"{k:>13}: {_show(ex[k], tokens)}", file=out)
          if ex["answer_choices"]:
            print(f"{'choices':>13}: {ex['answer_choices']} (gold {ex['label']})", file=out)
          elif len(ex["references"]) > 1:
            print(f"{'references':>13}: {ex['references']}", file=out)
  print(f"\ntoken lengths incl. EOS over {len(per['inputs'])} examples "
        f"(vocabulary {type(vocabulary).__name__}):", file=out)
  for k, v in per.items():
    print(f"  {k:>12}: {_stats(v, lengths[k])}", file=out)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("name", help="task or mixture name")
  ap.add_argument("--split", default=None, help="split (default: all of each task)")
  ap.add_argument("-n", type=int, default=3, help="examples to print")
  ap.add_argument("--max_stats", type=int, default=200, help="examples per task for statistics")
  ap.add_argument("--data_dir", default=None)
  ap.add_argument("--spm", default=None, help="SentencePiece model (default: byte vocabulary)")
  ap.add_argument("--lengths", default="1024,384,128", help="hyper,inputs,targets limits")
  args = ap.parse_args(argv)
  from tasks import common  # pylint: disable=g-import-not-at-top
  vocab = common.get_vocabulary("sentencepiece", args.spm) if args.spm else common.get_vocabulary()
  lh, li, lt = (int(x) for x in args.lengths.split(","))
  lengths = {"hyper_inputs": lh, "inputs": li, "targets": lt}
  register_for(args.name, args.data_dir, vocab, lengths)
  try:
    common.get_task_or_mixture(args.name)
  except ValueError as e:
    raise SystemExit(str(e)) from None
  inspect(args.name, args.split, args.n, args.max_stats, vocab, lengths)


if __name__ == "__main__":
  main()
