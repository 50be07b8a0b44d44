"""t5x-style command lines: `--gin_file=F` (repeatable), `--gin_search_paths=a,b`,
`--gin_bindings='X = 1'` (repeatable) and the shorthand `--gin.MODEL_DIR=\"/tmp/run\"`."""
import difflib
import logging
import os
import re
import sys
from typing import List, Optional, Sequence

import gin

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow (seqio's data) is noisy

# Configurables gin must know before parsing (their modules register them on import).
CONFIGURABLE_MODULES = (
    "hypertune.models.config", "hypertune.models.base", "hypertune.models.hypermodel",
    "hypertune.hypernets.hypert5", "hypertune.hypernets.shared_peft", "hypertune.optimizers", "hypertune.partitioning",
    "hypertune.checkpoints", "hypertune.evaluation", "hypertune.inference", "hypertune.trainer",
    "tasks.builtin",
)
REQUIRED_MACROS = ("MODEL_DIR", "MIXTURE_OR_TASK_NAME")
REPO_GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")


class _DropGinProbeErrors(logging.Filter):
  """gin's package-resource reader logs an ERROR for every search path it probes."""

  def filter(self, record):
    return not str(record.msg).startswith("Path not found")


logging.getLogger().addFilter(_DropGinProbeErrors())


class GinConfigError(ValueError):
  """A gin file or binding that cannot be applied; the message names it."""


def parse_flags(argv: Sequence[str]):
  """(gin_files, bindings, search_paths) from t5x-style flags; other flags are an error."""
  files, bindings, paths = [], [], []
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    if "=" not in arg and arg in ("--gin_file", "--gin_bindings", "--gin_search_paths"):
      if i + 1 >= len(args):
        raise GinConfigError(f"{arg} needs a value")
      arg = f"{arg}={args[i + 1]}"
      i += 1
    if arg.startswith("--gin_file="):
      files.append(arg.split("=", 1)[1])
    elif arg.startswith("--gin_bindings="):
      bindings.append(arg.split("=", 1)[1])
    elif arg.startswith("--gin_search_paths="):
      paths.extend(p for p in arg.split("=", 1)[1].split(",") if p)
    elif arg.startswith("--gin."):
      name, _, value = arg[len("--gin."):].partition("=")
      bindings.append(f"{name} = {value}")
    else:
      raise GinConfigError(f"unknown flag {arg!r}; expected --gin_file, --gin_bindings, "
                           "--gin_search_paths or --gin.NAME=VALUE")
    i += 1
  return files, bindings, paths


def parse(gin_files: Sequence[str], bindings: Sequence[str] = (),
          search_paths: Sequence[str] = ()) -> None:
  """Import configurables, then parse files and bindings with clear errors."""
  import importlib
  for module in CONFIGURABLE_MODULES:
    importlib.import_module(module)
  for path in list(search_paths) + [REPO_GIN_DIR, os.getcwd()]:
    gin.add_config_file_search_path(path)
  try:
    gin.parse_config_files_and_bindings(list(gin_files), list(bindings), finalize_config=False)
  except (ValueError, IOError, OSError, KeyError) as e:
    raise GinConfigError(_explain(str(e))) from None


def check_required_macros() -> None:
  """Fail with the macro's name when a `NAME = %gin.REQUIRED` macro was never given a value."""
  missing = []
  for name in REQUIRED_MACROS:
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


def _explain(message: str) -> str:
  """Add close matches to gin's 'No configurable matching ...' messages."""
  m = re.search(r"No configurable matching '([^']+)'", message)
  if m:
    known = sorted(gin.config._REGISTRY.keys())  # pylint: disable=protected-access
    names = [k if isinstance(k, str) else k[-1] for k in known]
    close = difflib.get_close_matches(m.group(1).split(".")[-1], names, n=3)
    if close:
      message += f" (did you mean: {', '.join(close)}?)"
  return f"gin configuration error: {message}"


def run(main, argv: Optional[List[str]] = None):
  """Parse flags + gin, then call `main()`; configuration errors exit with one clear line."""
  argv = sys.argv[1:] if argv is None else argv
  logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
  for noisy in ("absl", "tensorflow", "orbax", "jax", "etils", "seqio"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  logging.getLogger().handlers[0].addFilter(_DropGinProbeErrors())
  try:
    files, bindings, paths = parse_flags(argv)
    if not files:
      raise GinConfigError("no --gin_file given (see gin/ for the shipped configurations)")
    parse(files, bindings, paths)
    check_required_macros()
    return main()
  except GinConfigError as e:
    sys.exit(f"error: {e}")
  except (ValueError, FileNotFoundError) as e:
    # Bad input (a file, a field, a shape, a checkpoint) is reported by our own checks with a
    # message that names it: show that, not a traceback. HYPERTUNE_DEBUG=1 shows the traceback.
    if os.environ.get("HYPERTUNE_DEBUG"):
      raise
    sys.exit(f"error: {e}\n(set HYPERTUNE_DEBUG=1 for the traceback)")
  except TypeError as e:
    text = str(e)
    if "gin" in text.lower() or "macro" in text.lower() or "REQUIRED" in text:
      sys.exit(f"error: gin configuration: {text}")
    raise


def run_restored(extra_flags: Sequence[str], argv: Optional[List[str]] = None):
  """Run `trainer.train` over an existing run (its `MODEL_DIR/config.gin` first, then
  `extra_flags`, then the user's flags), as the eval and infer binaries do."""
  argv = list(sys.argv[1:] if argv is None else argv)
  model_dir = next((a.split("=", 1)[1].strip("'\"") for a in argv
                    if a.startswith("--gin.MODEL_DIR=")), None)
  if model_dir is None:
    sys.exit("error: --gin.MODEL_DIR=... (a training run's directory) is required")
  run_config = os.path.join(model_dir, "config.gin")
  if not os.path.exists(run_config):
    sys.exit(f"error: {run_config} not found: MODEL_DIR must be a hypertune training run")
  from hypertune import trainer  # pylint: disable=g-import-not-at-top
  return run(trainer.main, [f"--gin_file={run_config}", *extra_flags, *argv])
