"""t5x-style command lines of `hypertune.train`, `hypertune.eval` and `hypertune.infer`: the
flags, what they stand for, and `--help`.

Flags (each as `--flag=value` or `--flag value`): `--gin_file=F` (repeatable),
`--gin_search_paths=a,b`, `--gin_bindings='X = 1'` (repeatable), the shorthand
`--gin.MODEL_DIR="'/tmp/run'"`, t5x's `--tfds_data_dir`, `--multiprocess_gpu`,
`--coordinator_address`, `--process_count`, `--process_index`, and `--verbosity`, `--help`,
`--helpfull`.
"""
import dataclasses
import difflib
import glob
import os
import re
from typing import Callable, List, Optional, Sequence

REPO_GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")


class GinConfigError(ValueError):
  """A command line, gin file or binding that cannot be applied; the message names it."""

# --------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------

@dataclasses.dataclass
class CommandLine:
  """The parsed flags of a binary."""
  gin_files: List[str] = dataclasses.field(default_factory=list)
  bindings: List[str] = dataclasses.field(default_factory=list)
  search_paths: List[str] = dataclasses.field(default_factory=list)
  tfds_data_dir: Optional[str] = None
  multiprocess_gpu: bool = False
  coordinator_address: Optional[str] = None
  process_count: Optional[int] = None
  process_index: Optional[int] = None
  verbosity: int = 0
  help: Optional[str] = None  # "help" or "helpfull"


VALUE_FLAGS = ("gin_file", "gin_bindings", "gin_search_paths", "tfds_data_dir",
               "coordinator_address", "process_count", "process_index", "verbosity")
BOOL_FLAGS = {"--multiprocess_gpu": "multiprocess_gpu",
              "--nomultiprocess_gpu": "multiprocess_gpu"}
HELP_FLAGS = {"--help": "help", "-h": "help", "--helpshort": "help", "--helpfull": "helpfull"}


def parse_command_line(argv: Sequence[str]) -> CommandLine:
  """A `CommandLine` from t5x-style flags; an unknown flag is an error naming it."""
  cmd = CommandLine(verbosity=1 if os.environ.get("HYPERTUNE_VERBOSE") else 0)
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    name, has_value, value = arg.partition("=")
    if arg in HELP_FLAGS:
      cmd.help = "helpfull" if "helpfull" in (cmd.help, HELP_FLAGS[arg]) else "help"
    elif name.startswith("--gin."):
      if not has_value:
        value, i = _next_value(args, i)
      cmd.bindings.append(f"{name[len('--gin.'):]} = {value}")
    elif name[2:] in VALUE_FLAGS and name.startswith("--"):
      if not has_value:
        value, i = _next_value(args, i)
      _set_value(cmd, name[2:], value)
    elif name in BOOL_FLAGS:
      setattr(cmd, BOOL_FLAGS[name], _bool_flag(name, has_value, value))
    else:
      raise GinConfigError(f"unknown flag {arg!r}{_did_you_mean(name, _known_flags())}; "
                           "see --help")
    i += 1
  if not (cmd.multiprocess_gpu or cmd.coordinator_address) and (
      cmd.process_count is not None or cmd.process_index is not None):
    raise GinConfigError("--process_count / --process_index need --multiprocess_gpu or "
                         "--coordinator_address=HOST:PORT")
  return cmd


def parse_flags(argv: Sequence[str]):
  """(gin_files, bindings, search_paths) of `argv` (see `parse_command_line`)."""
  cmd = parse_command_line(argv)
  return cmd.gin_files, cmd.bindings, cmd.search_paths


def _next_value(args, i):
  if i + 1 >= len(args):
    raise GinConfigError(f"{args[i]} needs a value ({args[i]}=VALUE)")
  return args[i + 1], i + 1


def _set_value(cmd: CommandLine, name: str, value: str) -> None:
  if name == "gin_file":
    cmd.gin_files.append(value)
  elif name == "gin_bindings":
    cmd.bindings.append(value)
  elif name == "gin_search_paths":
    cmd.search_paths.extend(p for p in value.split(",") if p)
  elif name in ("process_count", "process_index", "verbosity"):
    try:
      setattr(cmd, name, int(value))
    except ValueError:
      raise GinConfigError(f"--{name} needs an integer, got {value!r}") from None
  else:
    setattr(cmd, name, value)


def _bool_flag(name: str, has_value: bool, value: str) -> bool:
  """absl's boolean syntax: `--flag`, `--noflag`, `--flag=true|false`."""
  if name.startswith("--no"):
    return False
  if not has_value or value.lower() in ("1", "true", "yes"):
    return True
  if value.lower() in ("0", "false", "no"):
    return False
  raise GinConfigError(f"{name} is true or false, got {value!r}")


def _known_flags() -> List[str]:
  return [f"--{f}" for f in VALUE_FLAGS] + list(BOOL_FLAGS) + list(HELP_FLAGS) + ["--gin.NAME"]


def _did_you_mean(name: str, candidates: Sequence[str], cutoff: float = 0.6) -> str:
  close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=cutoff)
  return f" (did you mean: {', '.join(close)}?)" if close else ""


def flag_modules(cmd: CommandLine) -> List[str]:
  """Modules whose configurables `flag_bindings` binds."""
  return ["tasks.pretraining"] if cmd.tfds_data_dir else []


def flag_bindings(cmd: CommandLine) -> List[str]:
  """Gin bindings that flags stand for: `--tfds_data_dir` sets TFDS_DATA_DIR (the macro of
  gin/tasks/hyperpretrain.gin) and the parameter that reads it, overriding the gin files."""
  if not cmd.tfds_data_dir:
    return []
  value = repr(cmd.tfds_data_dir)
  return [f"TFDS_DATA_DIR = {value}",
          f"tasks.pretraining.register_pretraining.tfds_data_dir = {value}"]


def initialize_distributed(cmd: CommandLine, initialize_fn: Optional[Callable] = None) -> bool:
  """`jax.distributed.initialize` from t5x's multi-host flags, if any is given.

  `--multiprocess_gpu` always initializes (what is not given, jax detects: SLURM, Open MPI);
  `--coordinator_address` alone does too (`--process_count` / `--process_index` need one of
  them: `parse_command_line`). Runs before anything touches a device; `trainer.train`'s own
  call is then a no-op.
  """
  if not (cmd.multiprocess_gpu or cmd.coordinator_address):
    return False
  from hypertune import partitioning  # pylint: disable=g-import-not-at-top
  return partitioning.maybe_initialize_distributed(
      coordinator_address=cmd.coordinator_address, num_processes=cmd.process_count,
      process_id=cmd.process_index, multiprocess_gpu=cmd.multiprocess_gpu,
      initialize_fn=initialize_fn)


# --------------------------------------------------------------------------------------
# Help
# --------------------------------------------------------------------------------------

MAIN_MACROS = (
    ("MODEL_DIR", "the run directory (required): config.gin, checkpoints/, model-info.txt, "
                  "eval/"),
    ("MIXTURE_OR_TASK_NAME", "seqio task or mixture trained on (the run files set it)"),
    ("TASK_FEATURE_LENGTHS", "token budgets {'hyper_inputs': N, 'inputs': N, 'targets': N}"),
    ("TRAIN_STEPS", "number of training steps"),
    ("BATCH_SIZE", "global batch size (all processes together)"),
    ("LEARNING_RATE", "peak learning rate"),
    ("INITIAL_CHECKPOINT_PATH", "start from a Hugging Face T5 directory or a run's MODEL_DIR"),
    ("EVAL_PERIOD", "evaluate every N steps and at the end (0: never)"),
    ("EVAL_MIXTURE_OR_TASK_NAME", "seqio task or mixture evaluated"),
    ("EVAL_SPLIT", "split evaluated ('test'; P3: 'validation')"),
)
USAGE = {
    "train": (
        "python -m hypertune.train --gin_file=RUN_FILE [--gin_file=...] [--gin.MACRO=VALUE ...]",
        "Train a model (T5, HyperT5, baselines) as a gin run file describes.",
        ("# a tiny T5 on the built-in suite, no data files (CPU, a few minutes):",
         "python -m hypertune.train --gin_file=quickstart/1_downstream.gin "
         "--gin.MODEL_DIR=\"'/tmp/run'\" --gin.TRAIN_STEPS=200",
         "# HyperT5-Prefix on Super-NaturalInstructions (HyperT5 section 5.2):",
         "python -m hypertune.train --gin_file=experiments/hypert5/sni_hypert5_prefix.gin "
         "--gin.MODEL_DIR=\"'/runs/sni_hypert5_prefix'\" "
         "--gin.INITIAL_CHECKPOINT_PATH=\"'/models/t5-large-lm-adapt'\" "
         "--gin.HYPERPRETRAINED_DIR=\"'/runs/hyperpretrain_prefix'\" "
         "--gin.SNI_DATA_DIR=\"'/data/sni'\" --gin.VOCABULARY_PATH=\"'/models/spiece.model'\"")),
    "eval": (
        "python -m hypertune.eval --gin.MODEL_DIR=RUN [--gin.EVAL_MIXTURE_OR_TASK_NAME=...]",
        "Evaluate a training run's latest checkpoint once (its config.gin, then "
        "gin/runs/eval.gin, then your flags); results go to MODEL_DIR/eval/.",
        ("python -m hypertune.eval --gin.MODEL_DIR=\"'/runs/sni_hypert5_prefix'\"",
         "python -m hypertune.eval --gin.MODEL_DIR=\"'/tmp/run'\" "
         "--gin.EVAL_MIXTURE_OR_TASK_NAME=\"'builtin_heldout'\" "
         "--gin.evaluate_checkpoint.num_beams=4")),
    "infer": (
        "python -m hypertune.infer --gin.MODEL_DIR=RUN --gin.infer.peft_dir=DIR "
        "[--gin.infer.demonstrations_file=F] [--gin.infer.inputs_file=F] "
        "[--gin.infer.hf_peft_dir=D] [--gin.infer.hf_lora_only=True]",
        "Write a task's PEFT parameters from its demonstrations (JSON: instruction, "
        "demonstrations; HyperLlama also demonstration_sets, whose gists are averaged), or "
        "apply written ones to new inputs (one per line); a generated LoRA also as a Hugging "
        "Face PEFT adapter (hf_peft_dir; hf_lora_only: a HyperLlama run's downstream LoRA "
        "without its gists; docs/peft_export.md).",
        ("python -m hypertune.infer --gin.MODEL_DIR=\"'/runs/sni_hypert5_prefix'\" "
         "--gin.infer.demonstrations_file=\"'demos.json'\" --gin.infer.peft_dir=\"'/runs/task'\"",
         "python -m hypertune.infer --gin.MODEL_DIR=\"'/runs/sni_hypert5_prefix'\" "
         "--gin.infer.peft_dir=\"'/runs/task'\" --gin.infer.inputs_file=\"'queries.txt'\"")),
}
FLAG_HELP = (
    ("--gin_file=FILE", "gin file (repeatable), found in gin/, the working directory or "
                        "--gin_search_paths"),
    ("--gin.NAME=VALUE", "one binding, e.g. --gin.TRAIN_STEPS=100, --gin.train.seed=3; "
                         "strings in quotes: --gin.MODEL_DIR=\"'/tmp/run'\""),
    ("--gin_bindings='NAME = VALUE'", "one binding in gin syntax (repeatable)"),
    ("--gin_search_paths=DIR,DIR", "more directories to find gin files in"),
    ("--tfds_data_dir=DIR", "TensorFlow Datasets directory (C4 for hyperpretraining; sets "
                            "TFDS_DATA_DIR)"),
    ("--multiprocess_gpu", "multi-host GPU: call jax.distributed.initialize (with the "
                           "three flags below, or detected from SLURM / Open MPI)"),
    ("--coordinator_address=HOST:PORT", "process 0's address"),
    ("--process_count=N", "number of processes"),
    ("--process_index=I", "this process's index"),
    ("--verbosity=1", "also show TensorFlow/absl/orbax/gin start-up logging "
                      "(or HYPERTUNE_VERBOSE=1); HYPERTUNE_DEBUG=1 shows tracebacks"),
    ("--help, --helpfull", "this text; --helpfull also lists every gin configurable "
                           "(with --gin_file: that file's macros and their values)"),
)


def usage(binary: str) -> str:
  """`--help`: synopsis, flags, main macros (with gin/runs/train.gin's defaults), examples
  and the shipped run files. Reads no module that imports TensorFlow, so it is quick."""
  synopsis, what, examples = USAGE[binary]
  defaults = _macro_defaults(os.path.join(REPO_GIN_DIR, "runs", "train.gin"))
  lines = [f"usage: {synopsis}", "", what, "", "flags (--flag=VALUE or --flag VALUE):"]
  lines += [f"  {f:32s} {h}" for f, h in FLAG_HELP]
  lines += ["", "main macros (--gin.NAME=VALUE; defaults from gin/runs/train.gin):"]
  for name, text in MAIN_MACROS:
    default = defaults.get(name, "").replace("%gin.REQUIRED", "required")
    default = f" [{default}]" if default else ""
    lines.append(f"  {name:26s} {text}{default}")
  lines += ["  train.initial_checkpoints  several checkpoints, the first that has a parameter "
            "wins:", "      --gin.train.initial_checkpoints=\"['/models/t5-large', "
            "'/runs/hyperpretrain']\"  (or (path, assignment_map) pairs)", "", "examples:"]
  lines += [f"  {e}" for e in examples]
  lines += ["", "run files (gin/experiments/, gin/quickstart/; each opens with its command):"]
  lines += [f"  {p}" for p in run_files()]
  return "\n".join(lines)


def run_files() -> List[str]:
  return sorted(os.path.relpath(p, REPO_GIN_DIR) for pattern in ("experiments/**/*.gin",
                                                                   "quickstart/*.gin")
                for p in glob.glob(os.path.join(REPO_GIN_DIR, pattern), recursive=True))


def _macro_defaults(path: str) -> dict:
  """{MACRO: value text} of the `NAME = value` lines of a gin file."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return {}
  return {m.group(1): m.group(2).split("#")[0].strip()
          for m in re.finditer(r"^([A-Z][A-Z0-9_]*)\s*=\s*(.+)$", text, re.M)}
