"""Gin for the binaries: parse run files and bindings, check them before anything is built
(required macros, macro names, input files, initial checkpoints), and run a binary's main with
configuration errors reported in one line that names what is wrong.

The command line itself (flags, `--help`) is `hypertune.command_line`; the console's quiet
start-up is `hypertune.console` (imported first: it must precede TensorFlow).
"""
# pylint: disable=g-bad-import-order
from hypertune import console  # before anything imports TensorFlow
import ast
import difflib
import glob
import importlib
import inspect
import os
import re
import sys
from typing import List, Optional, Sequence

import gin

from hypertune.command_line import (REPO_GIN_DIR, CommandLine, GinConfigError,
                                    _did_you_mean, _macro_defaults, flag_bindings,
                                    flag_modules, initialize_distributed,
                                    parse_command_line, usage)

# Configurables gin must know before parsing (their modules register them on import).
CONFIGURABLE_MODULES = (
    "hypertune.models.config", "hypertune.models.base", "hypertune.models.hypermodel",
    "hypertune.hypernets.hypert5", "hypertune.hypernets.hart", "hypertune.hypernets.hint",
    "hypertune.hypernets.shared_peft", "hypertune.models.llama", "hypertune.models.decoder_only",
    "hypertune.hypernets.gisting", "hypertune.optimizers",
    "hypertune.partitioning",
    "hypertune.checkpoints", "hypertune.evaluation", "hypertune.inference", "hypertune.trainer",
    "tasks.builtin",
)
# Data registries the shipped run files import; `--helpfull` lists their configurables too.
TASK_MODULES = ("tasks.sni", "tasks.p3", "tasks.metaicl", "tasks.symbol_tuning",
                "tasks.pretraining")
REQUIRED_MACROS = ("MODEL_DIR", "MIXTURE_OR_TASK_NAME")
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


# --------------------------------------------------------------------------------------
# Help (the full one reads gin's registry)
# --------------------------------------------------------------------------------------

def usage_full(binary: str, cmd: CommandLine) -> str:
  """`--helpfull`: `usage`, the macros of the given gin files, and gin's registry (every
  configurable with its parameters; `*` marks a required one)."""
  with console.quiet_startup(cmd.verbosity):
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
    console.setup_console(cmd.verbosity)
    if cmd.help:
      _print(usage_full(binary, cmd) if cmd.help == "helpfull" else usage(binary))
      return None
    if not cmd.gin_files:
      raise GinConfigError("no --gin_file given (see --help for the shipped run files)")
    with console.quiet_startup(cmd.verbosity):
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
