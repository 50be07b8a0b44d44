"""t5x-style command lines for `hypertune.train`, `hypertune.eval` and `hypertune.infer`.

Flags (each as `--flag=value` or `--flag value`): `--gin_file=F` (repeatable),
`--gin_search_paths=a,b`, `--gin_bindings='X = 1'` (repeatable), the shorthand
`--gin.MODEL_DIR="'/tmp/run'"`, t5x's `--tfds_data_dir`, `--multiprocess_gpu`,
`--coordinator_address`, `--process_count`, `--process_index`, and `--verbosity`, `--help`,
`--helpfull`. A configuration error exits with one line that names what is wrong.
"""
import ast
import contextlib
import dataclasses
import difflib
import glob
import importlib
import inspect
import logging
import os
import re
import sys
import tempfile
from typing import Callable, List, Optional, Sequence

import gin

# Before anything imports TensorFlow (seqio does; gin does not): TensorFlow reads it once, when
# it loads. `--verbosity=1` undoes it where the user did not set it (`setup_console`).
_TF_LOG_LEVEL_GIVEN = "TF_CPP_MIN_LOG_LEVEL" in os.environ
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Configurables gin must know before parsing (their modules register them on import).
CONFIGURABLE_MODULES = (
    "hypertune.models.config", "hypertune.models.base", "hypertune.models.hypermodel",
    "hypertune.hypernets.hypert5", "hypertune.hypernets.shared_peft", "hypertune.optimizers",
    "hypertune.partitioning",
    "hypertune.checkpoints", "hypertune.evaluation", "hypertune.inference", "hypertune.trainer",
    "tasks.builtin",
)
# Data registries the shipped run files import; `--helpfull` lists their configurables too.
TASK_MODULES = ("tasks.sni", "tasks.p3", "tasks.metaicl", "tasks.symbol_tuning",
                "tasks.pretraining")
REQUIRED_MACROS = ("MODEL_DIR", "MIXTURE_OR_TASK_NAME")
REPO_GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")
# Files a run reads, checked before anything is built: (gin parameter, what it is).
INPUT_PATHS = (
    ("tasks.common.get_vocabulary.spm_path", "vocabulary file"),
    ("tasks.sni.register_sni.data_dir", "S-NI data directory"),
    ("tasks.p3.register_p3.data_dir", "P3 data directory"),
    ("tasks.metaicl.register_metaicl.data_dir", "MetaICL data directory"),
    ("tasks.pretraining.register_pretraining.text_files", "pretraining corpus file"),
    ("tasks.pretraining.register_pretraining.tfds_data_dir", "TFDS data directory"),
    ("hypertune.inference.infer.demonstrations_file", "demonstrations file"),
)
# Checkpoints a new run starts from (not read on resume, nor by eval/infer).
CHECKPOINT_PATHS = ("hypertune.trainer.train.initial_checkpoint_path",
                    "hypertune.trainer.train.initial_checkpoints")


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
        "[--gin.infer.demonstrations_file=F] [--gin.infer.inputs_file=F]",
        "Write a task's PEFT parameters from its demonstrations (JSON: instruction, "
        "demonstrations), or apply written ones to new inputs (one per line).",
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


def usage_full(binary: str, cmd: CommandLine) -> str:
  """`--helpfull`: `usage`, the macros of the given gin files, and gin's registry (every
  configurable with its parameters; `*` marks a required one)."""
  with quiet_startup(cmd.verbosity):
    for module in CONFIGURABLE_MODULES + TASK_MODULES:
      importlib.import_module(module)
    if cmd.gin_files:
      parse(cmd.gin_files, flag_bindings(cmd) + cmd.bindings, cmd.search_paths,
            flag_modules(cmd))
  lines = [usage(binary)]
  macros = _macros()
  if macros:
    lines += ["", f"macros of {', '.join(cmd.gin_files)}:"]
    lines += [f"  {n} = {_short(gin.query_parameter('%' + n), 70)}" for n in sorted(macros)]
  lines += ["", "gin configurables (--gin.NAME.PARAM=VALUE; * required):"]
  lines += [f"  {line}" for line in configurable_lines()]
  return "\n".join(lines)


def configurable_lines() -> List[str]:
  """One line per registered configurable: `module.name(param, param=default, ...)`."""
  out = []
  registry = gin.config._REGISTRY.items()  # pylint: disable=protected-access
  for selector, c in sorted(registry, key=lambda item: item[0]):
    if c.module == "gin":
      continue  # gin's builtins (macro, constant, singleton)
    out.append(f"{selector}({', '.join(_parameters(c))})")
  return out


def _parameters(configurable) -> List[str]:
  try:
    params = inspect.signature(configurable.wrapped).parameters.values()
  except (TypeError, ValueError):
    return ["..."]
  denied = set(configurable.denylist or ())
  out = []
  for p in params:
    if p.name in denied or p.name in ("self", "parent", "name") or p.kind in (
        p.VAR_POSITIONAL, p.VAR_KEYWORD):
      continue
    if p.default is p.empty or p.default is gin.REQUIRED:
      out.append(f"{p.name}*")
    elif len(repr(p.default)) <= 16:
      out.append(f"{p.name}={p.default!r}")
    else:
      out.append(p.name)  # a long default (a tuple of task names): see the module
  return out


def _short(value, width: int) -> str:
  text = repr(value)
  return text if len(text) <= width else text[:width - 3] + "..."


# --------------------------------------------------------------------------------------
# Console
# --------------------------------------------------------------------------------------

# Third-party loggers kept at WARNING by default.
NOISY_LOGGERS = ("absl", "tensorflow", "orbax", "jax", "etils", "seqio", "h5py", "urllib3",
                 "huggingface_hub", "filelock", "fsspec")
# TensorFlow/XLA C++ log lines (absl, before its initialisation the time is seconds since the
# epoch: "I0000 00:00:1796161757.764268   23322 port.cc:153] ...";
# older TF: "2025-09-17 14:44:05.157831: I external/.../cudart_stub.cc:32] ...").
_CPP_LOG_LINE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called|"
    r"[IWE]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] |"
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWE] \S+:\d+\] )")
_GIN_DIR = os.path.dirname(os.path.abspath(gin.__file__))


class _DropGinProbeErrors(logging.Filter):
  """gin's package-resource reader logs an ERROR for every search path it probes."""

  def filter(self, record):
    return not str(record.msg).startswith("Path not found")


class _DropLibraryInfo(logging.Filter):
  """gin logs every file it opens (`system_path_file_exists:...`) at INFO, on the root logger."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or not record.pathname.startswith(_GIN_DIR)


logging.getLogger().addFilter(_DropGinProbeErrors())


def setup_console(verbosity: int = 0) -> None:
  """Our INFO lines (progress, checkpoints, evaluation) on stderr, without third-party INFO
  unless `verbosity` >= 1."""
  logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
  handler = logging.getLogger().handlers[0]
  handler.addFilter(_DropGinProbeErrors())
  if verbosity >= 1:
    if not _TF_LOG_LEVEL_GIVEN and "tensorflow" not in sys.modules:
      os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    return
  for noisy in NOISY_LOGGERS:
    logging.getLogger(noisy).setLevel(logging.WARNING)
  handler.addFilter(_DropLibraryInfo())


@contextlib.contextmanager
def quiet_startup(verbosity: int = 0):
  """Drop the C++ log lines that TensorFlow writes while it loads.

  TensorFlow >= 2.19 writes them before absl's logging is initialised, whatever
  TF_CPP_MIN_LOG_LEVEL says, straight to file descriptor 2. So fd 2 goes to a temporary file
  while the libraries load, and every other line (Python warnings, our logging) is written
  back afterwards, in order. With `verbosity` >= 1 nothing is dropped.
  """
  if verbosity >= 1:
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      text = captured.read().decode("utf-8", errors="replace")
      sys.stderr.write("".join(line for line in text.splitlines(keepends=True)
                               if not _CPP_LOG_LINE.match(line)))
      sys.stderr.flush()


# --------------------------------------------------------------------------------------
# Gin
# --------------------------------------------------------------------------------------

def parse(gin_files: Sequence[str], bindings: Sequence[str] = (),
          search_paths: Sequence[str] = (), modules: Sequence[str] = ()) -> None:
  """Import configurables (and `modules`), then parse files and bindings with clear errors."""
  for module in tuple(CONFIGURABLE_MODULES) + tuple(modules):
    importlib.import_module(module)
  for path in list(search_paths) + [REPO_GIN_DIR, os.getcwd()]:
    gin.add_config_file_search_path(path)
  try:
    gin.parse_config_files_and_bindings(list(gin_files), list(bindings), finalize_config=False)
  except (ValueError, IOError, OSError, KeyError) as e:
    raise GinConfigError(_explain(str(e))) from None
  except SyntaxError as e:
    raise GinConfigError(_syntax_error(e)) from None


def _syntax_error(e: SyntaxError) -> str:
  """gin's parse error on one line: where, the line, and (for a bare word) the quoting hint."""
  where = f"{e.filename}:{e.lineno}" if e.filename else "a --gin flag"
  text = (e.text or "").strip()
  message = f"gin syntax error in {where}: {str(e.msg).rstrip('.')}: {text}"
  name, _, value = text.partition("=")
  if not e.filename and value.strip() and value.strip()[0] not in "'\"[{(@%0123456789-.":
    message += (f" (a string needs quotes: --gin.{name.strip()}=\"'{value.strip()}'\")")
  return message


def check_required_macros() -> None:
  """Fail with the macros' names when a `NAME = %gin.REQUIRED` macro that the configuration
  uses (and MODEL_DIR, MIXTURE_OR_TASK_NAME) was never given a value."""
  names = sorted(set(REQUIRED_MACROS) | _macros(used=True))
  missing = []
  for name in names:
    try:
      value = gin.query_parameter(f"%{name}")
    except ValueError:
      continue  # not used by this configuration
    if "gin.REQUIRED" in repr(value):
      missing.append(name)
  if missing:
    raise GinConfigError(
        "required macro(s) not set: " + ", ".join(missing) + " (e.g. " +
        " ".join(f"--gin.{m}=..." for m in missing) + ")")


def check_macro_names(bindings: Sequence[str]) -> None:
  """A macro set on the command line that no gin file of the run uses, that no shipped gin
  file defines, and that is close to one the run uses, is a typo (`--gin.TRAIN_STEP=5`):
  fail, naming both. Other unused macros are left alone: flags shared by several runs (the
  quickstart's stages, `--gin.PREFIX_LEN` on a run without prefixes)."""
  used = _macros(used=True)
  known = used | shipped_macros()
  for binding in bindings:
    m = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=", binding)
    if not m or m.group(1) in known:
      continue
    close = difflib.get_close_matches(m.group(1), sorted(used), n=3, cutoff=0.8)
    if close:
      raise GinConfigError(f"macro {m.group(1)} is used by no gin file of this run "
                           f"(did you mean: {', '.join(close)}?)")


def shipped_macros() -> set:
  """Names of the macros that the gin files under gin/ define."""
  return {name for path in glob.glob(os.path.join(REPO_GIN_DIR, "**", "*.gin"), recursive=True)
          for name in _macro_defaults(path)}


def _macros(used: bool = False) -> set:
  """Names of the macros bound in the configuration, or (`used`) referenced by a binding."""
  config = gin.config._CONFIG  # pylint: disable=protected-access
  registry = gin.config._REGISTRY  # pylint: disable=protected-access
  if used:
    refs = gin.config.iterate_references(config, to=gin.get_configurable(gin.config.macro))
    return {r.scoped_selector.rsplit("/", 1)[0] for r in refs}
  return {scope for scope, selector in config if registry[selector].wrapped is gin.config.macro}


def check_input_paths(new_run: bool = True) -> None:
  """Fail before anything is built when a file the run reads is missing (the vocabulary, a
  data directory, a corpus, an initial checkpoint of a new run), naming its binding and the
  closest names beside it."""
  checks = list(INPUT_PATHS)
  if new_run and not _resuming():
    checks += [(s, "initial checkpoint") for s in CHECKPOINT_PATHS]
  for selector, what in checks:
    for path in _paths(_query(selector)):
      if what == "initial checkpoint":
        _check_checkpoint(path, selector)
      elif not os.path.exists(path):
        raise GinConfigError(f"{what} not found: {path} ({_binding_text(selector)})"
                             f"{_siblings(path)}")


def _check_checkpoint(path: str, selector: str) -> None:
  from hypertune import param_sources  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise GinConfigError(f"initial checkpoint not found: {path} ({_binding_text(selector)})"
                         f"{_siblings(path)}")
  if not (param_sources.is_hf_dir(path) or param_sources.is_run_dir(path)):
    raise GinConfigError(
        f"initial checkpoint {path} ({_binding_text(selector)}) is neither a Hugging Face "
        "directory (config.json + model.safetensors) nor a hypertune MODEL_DIR (checkpoints/)")


def _resuming() -> bool:
  """Whether MODEL_DIR already holds a run (then its initial checkpoints are not read)."""
  model_dir = _query("hypertune.trainer.train.model_dir")
  return isinstance(model_dir, str) and os.path.isdir(os.path.join(model_dir, "checkpoints"))


def _query(selector: str):
  """The bound value of a gin parameter with macros resolved; None where it is not bound."""
  try:
    return _resolve(gin.query_parameter(selector))
  except ValueError:
    return None


def _resolve(value):
  """`value` with macro references (`%NAME`) replaced by the macros' values; configurable
  references (`@f()`) are left alone (calling them could register tasks twice)."""
  if isinstance(value, gin.config.ConfigurableReference):
    if value.configurable.wrapped is gin.config.macro:
      return _resolve(gin.query_parameter("%" + value.scoped_selector.rsplit("/", 1)[0]))
    return value
  if isinstance(value, (list, tuple)):
    return type(value)(_resolve(v) for v in value)
  return value


def _paths(value) -> List[str]:
  """Local paths in a bound value: a string, a list of them, or (path, assignment map) pairs;
  URLs (gs://...) are not checked here."""
  if isinstance(value, str):
    return [] if "://" in value or not value else [value]
  if isinstance(value, (list, tuple)):
    if len(value) == 2 and isinstance(value[0], str) and not isinstance(value[1], str):
      return _paths(value[0])  # (path, assignment_map)
    return [p for v in value for p in _paths(v)]
  return []


def _binding_text(selector: str) -> str:
  """`sni.register_sni.data_dir = %SNI_DATA_DIR` for a selector, as it was bound."""
  short = ".".join(selector.split(".")[-2:])
  try:
    raw = gin.query_parameter(selector)
  except ValueError:
    return short
  return f"{short} = {raw}" if "%" in repr(raw) else short  # bound through a macro


def _siblings(path: str) -> str:
  """' (nearest names in DIR: a, b)': the names in DIR, the deepest existing directory above
  `path`, closest to the part that is missing (a typo in a file name)."""
  parent, missing = os.path.split(os.path.normpath(path))
  while parent and not os.path.isdir(parent):
    parent, missing = os.path.split(parent)
  if not parent:
    return ""
  close = difflib.get_close_matches(missing, sorted(os.listdir(parent)), n=3, cutoff=0.5)
  return f" (nearest names in {parent}: {', '.join(close)})" if close else ""


def _explain(message: str) -> str:
  """gin's error on one line, with close matches for an unknown configurable or parameter."""
  first, _, rest = message.partition("\n")
  hint = ""
  m = re.search(r"No configurable matching (?:reference )?'@?([^'(]+)", first)
  if m:
    parts = m.group(1).count(".") + 1
    names = {".".join(s.split(".")[-parts:])
             for s, _ in gin.config._REGISTRY.items()}  # pylint: disable=protected-access
    hint = _did_you_mean(m.group(1), sorted(names))
  m = re.search(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", first)
  if m:
    c = gin.config._REGISTRY.get_match(m.group(1))  # pylint: disable=protected-access
    hint = _did_you_mean(m.group(2), [p.rstrip("*").split("=")[0] for p in _parameters(c)]
                         if c else [])
  if hint:
    first = first[:-1] + hint + "." if first.endswith(".") else first + hint
  return f"gin configuration error: {one_line(first + (chr(10) + rest if rest else ''))}"


def one_line(message: str) -> str:
  """An error message on one line: gin's "In call to configurable ..." notes dropped, its
  "In file ..., line N" / "In bindings string" locations and the offending line kept."""
  lines = [l.strip() for l in str(message).splitlines()]
  kept = [l for l in lines if l and not l.startswith("In call to configurable")
          and set(l) != {"^"}]
  if not kept:
    return str(message).strip()
  head, rest = kept[0], kept[1:]
  for i, line in enumerate(rest):
    if line.startswith("In bindings string"):
      rest[i] = "in the --gin flags:"
    elif line.startswith("In file"):
      rest[i] = line[len("In file "):].replace('", line ', ":").strip('"') + ":"
  return " ".join([head] + rest)


# --------------------------------------------------------------------------------------
# Binaries
# --------------------------------------------------------------------------------------

def run(main, argv: Optional[List[str]] = None, binary: str = "train",
        restored: bool = False):
  """Parse flags and gin, check the configuration, then call `main()`.

  `--help` / `--helpfull` print and exit 0. A configuration error, a missing file or a bad
  name exits 1 with one `error: ...` line (HYPERTUNE_DEBUG=1: the traceback). `restored`: the
  eval / infer binaries, over an existing run.
  """
  argv = sys.argv[1:] if argv is None else argv
  try:
    cmd = parse_command_line(argv)
    setup_console(cmd.verbosity)
    if cmd.help:
      _print(usage_full(binary, cmd) if cmd.help == "helpfull" else usage(binary))
      return None
    if not cmd.gin_files:
      raise GinConfigError("no --gin_file given (see --help for the shipped run files)")
    with quiet_startup(cmd.verbosity):
      parse(cmd.gin_files, flag_bindings(cmd) + cmd.bindings, cmd.search_paths,
            flag_modules(cmd))
      check_required_macros()
      check_macro_names(cmd.bindings)
      check_input_paths(new_run=not restored)
      if cmd.tfds_data_dir:
        import seqio  # pylint: disable=g-import-not-at-top
        seqio.set_tfds_data_dir_override(cmd.tfds_data_dir)  # seqio's own TFDS sources
    initialize_distributed(cmd)
    return main()
  except GinConfigError as e:
    _exit_with(f"error: {e}", e)
  except (ValueError, FileNotFoundError) as e:
    # Bad input (a file, a field, a shape, a checkpoint, a task name) is reported by our own
    # checks with a message that names it: show that, not a traceback.
    _exit_with(f"error: {one_line(e)}", e)
  except TypeError as e:
    text = str(e)
    if "gin" in text.lower() or "macro" in text.lower() or "REQUIRED" in text:
      _exit_with(f"error: gin configuration: {one_line(text)}", e)
    raise
  except Exception as e:  # pylint: disable=broad-except
    # TensorFlow's file errors (tf.errors.NotFoundError: a vocabulary, a data file).
    if type(e).__name__ in ("NotFoundError", "PermissionDeniedError"):
      _exit_with(f"error: {one_line(e)}", e)
    raise


def _print(text: str) -> None:
  try:
    print(text, flush=True)
  except BrokenPipeError:  # the reader stopped early (`--help | head`): not an error
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _exit_with(line: str, error: BaseException):
  if os.environ.get("HYPERTUNE_DEBUG"):
    raise error
  sys.exit(line)


def run_restored(extra_flags: Sequence[str], argv: Optional[List[str]] = None,
                 binary: str = "eval"):
  """Run `trainer.train` over an existing run (its `MODEL_DIR/config.gin` first, then
  `extra_flags`, then the user's flags), as the eval and infer binaries do."""
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    cmd = parse_command_line(argv)
  except GinConfigError as e:
    sys.exit(f"error: {e}")
  if not cmd.help:
    model_dir = model_dir_of(cmd.bindings)
    if model_dir is None:
      sys.exit("error: --gin.MODEL_DIR=... (a training run's directory) is required; "
               "see --help")
    run_config = os.path.join(model_dir, "config.gin")
    if not os.path.exists(run_config):
      sys.exit(f"error: {run_config} not found: MODEL_DIR must be a hypertune training run"
               f"{_siblings(run_config) if not os.path.isdir(model_dir) else ''}")
    argv = [f"--gin_file={run_config}", *extra_flags, *argv]
  return run(train_main, argv, binary=binary, restored=True)


def model_dir_of(bindings: Sequence[str]) -> Optional[str]:
  """The value of the last `MODEL_DIR = ...` binding, quotes removed."""
  value = None
  for binding in bindings:
    m = re.match(r"\s*MODEL_DIR\s*=\s*(.+?)\s*$", binding)
    if m:
      try:
        value = ast.literal_eval(m.group(1))
      except (ValueError, SyntaxError):
        value = m.group(1).strip("'\"")
  return value if isinstance(value, str) else None


def train_main():
  """`trainer.main`, imported late: after the flags are read and TensorFlow loaded quietly."""
  from hypertune import trainer  # pylint: disable=g-import-not-at-top
  return trainer.main()
