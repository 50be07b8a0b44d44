"""Tests of `python -m tasks.inspect`."""

import io

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
