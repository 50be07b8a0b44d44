"""Tests of `python -m tasks.inspect`."""

import io
import os

import pytest
import seqio

from hypertune.data import fewshot
from tasks import common
from tasks import inspect as inspect_cli


def test_inspect_prints_examples_and_length_stats():
  task = fewshot.TaskData("insp", {"train": [fewshot.TaskExample(f"in{i}", (f"out{i}",))
                                             for i in range(6)]})
  common.register_three_input_task("insp.toy", task, fewshot.HyperConfig(k=2),
                                   seqio.ByteVocabulary())
  out = io.StringIO()
  inspect_cli.inspect("insp.toy", "train", 2, 100, seqio.ByteVocabulary(),
                      {"hyper_inputs": 10, "inputs": 384, "targets": 128}, out=out)
  text = out.getvalue()
  assert "insp.toy: 1 task(s)" in text
  assert text.count("--- insp.toy [train] example") == 2
  assert "<x> in" in text and "<y> out" in text  # markers made visible
  assert "inputs: in0" in text
  assert "over 6 examples" in text and "> 10: 6/6" in text  # hyper over its limit


def test_inspect_unknown_prefix():
  with pytest.raises(SystemExit, match="don't know which source"):
    inspect_cli.main(["mystery_task"])


SNI_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                       "shared", "data", "sni")


@pytest.mark.skipif(not os.path.isdir(SNI_DIR), reason="../shared/data/sni absent")
def test_inspect_registers_with_its_lengths():
  """--lengths are the registration budgets too: a concat variant is shown as a run with
  those task_feature_lengths would read it."""
  lengths = {"hyper_inputs": 100, "inputs": 200, "targets": 16}
  inspect_cli.register_for("sni_def_2pos_concat_test", SNI_DIR, seqio.ByteVocabulary(), lengths)
  name = common.mixture_tasks("sni_def_2pos_concat_test")[0]
  config = common.get_builder(name).config
  assert (config.max_hyper_length, config.max_inputs_length) == (100, 200)
  out = io.StringIO()
  inspect_cli.inspect(name, "test", 0, 100, seqio.ByteVocabulary(), lengths, out=out)
  inputs_line = [l for l in out.getvalue().splitlines() if l.strip().startswith("inputs:")][0]
  queries = common.get_builder(name).task.splits["test"]
  too_long = sum(len(f"\x1e {' '.join(q.inputs.split())} \x1f".encode()) + 1 > 200
                 for q in queries)
  assert inputs_line.endswith(f"> 200: {too_long}/100")  # only queries over 200 alone
