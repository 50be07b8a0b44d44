"""The README's commands run as written, in order, at tiny size: its placeholder paths point at
a tiny Hugging Face T5 and ../shared/data, and tiny-size flags are appended to each training
command. (The set-up commands are covered by tests/test_quickstart.py and CI itself.)"""
import ast
import dataclasses
import json
import os
import re
import shlex

import gin

from hypertune.models.config import T5Config, t5_config

from test_gin_runs import (TINY, TINY_LLAMA, TINY_T5, _data_bindings,  # noqa: F401  pylint: disable=unused-import
                           hf_llama_dir, hf_t5_dir)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands():
  """Every `python -m hypertune.*` line of the README's bash blocks, in order."""
  text = open(os.path.join(REPO, "README.md")).read()
  blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
  return [line.strip() for block in blocks for line in block.splitlines()
          if line.strip().startswith("python -m hypertune.")]


def test_readme_shows_the_recipe():
  binaries = [c.split()[2] for c in readme_commands()]
  assert binaries.count("hypertune.train") >= 3 and "hypertune.eval" in binaries
  assert binaries.count("hypertune.infer") == 2


def _placeholders(hf_dir, hf_llama, shared, tmp):
  corpus = tmp / "corpus.jsonl"
  corpus.write_text("\n".join(json.dumps({"text": f"Document {i}. " + "Running text. " * 40})
                              for i in range(6)))
  (tmp / "demos.json").write_text(json.dumps({"instruction": "Copy the input.", "demonstrations": [
      {"input": "a cat", "target": "a cat"}, {"input": "a dog", "target": "a dog"}]}))
  (tmp / "queries.txt").write_text("a bird\na fish\n")
  return {"/models/llama-2-7b/tokenizer.model": f"{shared}/t5_vocab/spiece.model",
          "/models/llama-2-7b": hf_llama, "/models/t5-large-lm-adapt": hf_dir, "/models/t5-xl-lm-adapt": hf_dir,
          "/models/spiece.model":
          f"{shared}/t5_vocab/spiece.model", "/data/sni": f"{shared}/sni",
          "/data/p3": f"{shared}/p3", "/data/corpus.jsonl": str(corpus), "/runs/": f"{tmp}/",
          "'demos.json'": f"'{tmp}/demos.json'", "'queries.txt'": f"'{tmp}/queries.txt'"}


def _tiny_flags(command, shared, tmp):
  """Tiny-size flags for a training command (the run file's data source, cut small)."""
  run_file = re.search(r"--gin_file=(\S+)", command).group(1)
  bindings = TINY + (TINY_LLAMA if "hyperllama" in run_file else TINY_T5) + [
      "TASK_FEATURE_LENGTHS = {'hyper_inputs': 64, 'inputs': 32, 'targets': 16}"]
  bindings += [b for b in _data_bindings(run_file, shared, tmp)
               if not b.startswith(("VOCABULARY_PATH", "SNI_DATA_DIR", "P3_DATA_DIR",
                                    "PRETRAIN_TEXT_FILES"))]
  return [f"--gin.{name.strip()}={value.strip()}"
          for name, value in (b.split("=", 1) for b in bindings)]


def _run_binary(name, argv):
  """`python -m hypertune.<name> argv`, in this process (the binaries' own entry points)."""
  from hypertune import eval as eval_binary, gin_utils, infer, trainer  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  try:
    if name == "hypertune.train":
      gin_utils.run(trainer.main, argv)
    else:
      {"hypertune.eval": eval_binary, "hypertune.infer": infer}[name].main(argv)
  finally:
    gin.clear_config()


def test_readme_commands_run_as_written(hf_t5_dir, hf_llama_dir, shared_data, tmp_path):
  replace = _placeholders(hf_t5_dir, hf_llama_dir, shared_data, tmp_path)
  for command in readme_commands():
    for old, new in replace.items():
      command = command.replace(old, new)
    _, _, name, *argv = shlex.split(command)
    if name == "hypertune.train":
      argv += _tiny_flags(command, shared_data, tmp_path)
    _run_binary(name, argv)
  assert (tmp_path / "task" / "peft.safetensors").exists()
  assert len((tmp_path / "task" / "predictions.jsonl").read_text().splitlines()) == 2


def test_readme_config_switches_are_t5_config_fields():
  """Every `config.t5_config.<field> = <value>` the README names is a T5Config field that takes
  that value (the CPU switches of its speed section are gin bindings, not commands)."""
  text = open(os.path.join(REPO, "README.md")).read()
  switches = re.findall(r"`config\.t5_config\.(\w+) = ([^`]+)`", text)
  assert len(switches) >= 4, switches
  fields = {f.name for f in dataclasses.fields(T5Config)}
  for name, value in switches:
    assert name in fields, name
    value = ast.literal_eval(value)
    assert getattr(t5_config("tiny", **{name: value}), name) == value
