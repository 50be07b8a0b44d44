"""What a new user meets at the command line: `--help` / `--helpfull` of the binaries, t5x's
flags, one-line errors before anything is built or compiled, and a quiet console."""
import os
import re
import subprocess
import sys

import gin
import jax
import pytest

from hypertune import command_line, gin_utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN_MACROS = [name for name, _ in command_line.MAIN_MACROS]
# Third-party start-up lines: TensorFlow's C++ logging (before and after absl's
# InitializeLog) and gin's INFO line for every file it opens.
NOISE = ("cuda drivers", "cuda_drivers", "oneDNN", "absl::InitializeLog", "I0000", "W0000",
         "E0000", "system_path_file_exists")
TINY_RUN = ["--gin_file=quickstart/1_downstream.gin", "--gin.TRAIN_STEPS=2",
            "--gin.BATCH_SIZE=4", "--gin.config.t5_config.size='tiny'", "--gin.EVAL_PERIOD=0"]


def _env(**extra):
  """The user's default environment: none of the switches that bring the noise back."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("TF_CPP_MIN_LOG_LEVEL", "HYPERTUNE_VERBOSE", "HYPERTUNE_DEBUG")}
  env.update(extra)
  return env


def _run(binary, *flags, **env):
  return subprocess.run([sys.executable, "-m", f"hypertune.{binary}", *flags], cwd=REPO,
                        env=_env(**env), capture_output=True, text=True, timeout=600)


def _error_line(out):
  """The one `error:` line of a failed run (asserting there is exactly one, no traceback)."""
  assert out.returncode == 1, out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, out.stderr[-3000:]
  return errors[0]


# --------------------------------------------------------------------------------------
# --help, --helpfull
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("binary", ["train", "eval", "infer"])
def test_help_exits_0_and_names_the_main_macros(binary):
  out = _run(binary, "--help")
  assert out.returncode == 0, out.stderr[-3000:]
  for name in MAIN_MACROS + ["train.initial_checkpoints", "--gin_file", "--tfds_data_dir",
                             "--multiprocess_gpu", "--process_count", "--verbosity"]:
    assert name in out.stdout, name
  assert f"python -m hypertune.{binary} " in out.stdout  # an example command
  assert "experiments/hypert5/sni_hypert5_prefix.gin" in out.stdout  # the shipped run files
  assert "TRAIN_STEPS" in out.stdout and "[10000]" in out.stdout  # runs/train.gin's default
  assert out.stderr == ""


def test_helpfull_lists_registered_configurables_and_the_files_macros():
  out = _run("train", "--helpfull", "--gin_file=quickstart/1_downstream.gin")
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  train = [l for l in lines if l.strip().startswith("hypertune.trainer.train(")]
  assert len(train) == 1 and "model_dir*" in train[0] and "eval_period=0" in train[0]
  assert any(l.strip().startswith("tasks.sni.register_sni(data_dir*") for l in lines)
  assert "  MIXTURE_OR_TASK_NAME = 'builtin_zeroshot_train'" in lines  # the file's macros
  assert not [n for n in NOISE if n in out.stdout + out.stderr]


def test_configurable_lines_follow_gins_registry():
  @gin.configurable("binaries_test_fn")
  def fn(a, b=gin.REQUIRED, c=3, d=("x" * 40,)):  # pylint: disable=unused-argument
    pass

  assert [l for l in gin_utils.configurable_lines()
          if l.endswith(".binaries_test_fn(a*, b*, c=3, d)")]


# --------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------

def test_flags_take_their_value_after_an_equals_sign_or_as_the_next_argument():
  joined = command_line.parse_command_line([
      "--gin_file=a.gin", "--gin.MODEL_DIR='/x'", "--gin_search_paths=p,q",
      "--tfds_data_dir=/tfds", "--coordinator_address=h:1", "--process_count=2",
      "--process_index=1", "--verbosity=1", "--multiprocess_gpu"])
  split = command_line.parse_command_line([
      "--gin_file", "a.gin", "--gin.MODEL_DIR", "'/x'", "--gin_search_paths", "p,q",
      "--tfds_data_dir", "/tfds", "--coordinator_address", "h:1", "--process_count", "2",
      "--process_index", "1", "--verbosity", "1", "--multiprocess_gpu=true"])
  assert joined == split
  assert (joined.gin_files, joined.bindings, joined.search_paths) == (
      ["a.gin"], ["MODEL_DIR = '/x'"], ["p", "q"])
  assert (joined.tfds_data_dir, joined.coordinator_address, joined.process_count,
          joined.process_index, joined.verbosity, joined.multiprocess_gpu) == (
              "/tfds", "h:1", 2, 1, 1, True)
  assert not command_line.parse_command_line(["--nomultiprocess_gpu"]).multiprocess_gpu


@pytest.mark.parametrize("argv,message", [
    (["--gin_fil=a.gin"], "did you mean: --gin_file"),
    (["--process_count=two", "--multiprocess_gpu"], "--process_count needs an integer"),
    (["--process_index=1"], "need --multiprocess_gpu or --coordinator_address"),
    (["--gin_file"], "--gin_file needs a value"),
])
def test_bad_flags_are_named(argv, message):
  with pytest.raises(gin_utils.GinConfigError, match=re.escape(message)):
    command_line.parse_command_line(argv)


class _Recorder:
  def __init__(self):
    self.calls = []

  def __call__(self, **kwargs):
    self.calls.append(kwargs)


@pytest.mark.parametrize("argv,expected", [
    (["--multiprocess_gpu", "--coordinator_address=10.0.0.1:1234", "--process_count", "4",
      "--process_index=2"],
     [{"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}]),
    (["--multiprocess_gpu"], [{}]),  # jax detects the cluster (SLURM, Open MPI)
    (["--coordinator_address", "h:9", "--process_count=2", "--process_index=0"],
     [{"coordinator_address": "h:9", "num_processes": 2, "process_id": 0}]),
    ([], []),
])
def test_multihost_flags_reach_jax_distributed_initialize(monkeypatch, argv, expected):
  for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(var, raising=False)
  recorder = _Recorder()
  monkeypatch.setattr(jax.distributed, "initialize", recorder)
  cmd = command_line.parse_command_line(["--gin_file=a.gin", *argv])
  assert command_line.initialize_distributed(cmd) == bool(expected)
  assert recorder.calls == expected


def test_tfds_data_dir_sets_the_macro_and_the_parameter_that_reads_it(tmp_path):
  cmd = command_line.parse_command_line(["--tfds_data_dir", str(tmp_path)])
  gin.clear_config()
  try:
    gin_utils.parse(["experiments/hypert5/hyperpretrain_prefix.gin"],
                    command_line.flag_bindings(cmd) + ["MODEL_DIR = '/tmp/x'"],
                    modules=command_line.flag_modules(cmd))
    assert gin.query_parameter("%TFDS_DATA_DIR") == str(tmp_path)
    selector = "tasks.pretraining.register_pretraining.tfds_data_dir"
    assert gin_utils._query(selector) == str(tmp_path)  # pylint: disable=protected-access
  finally:
    gin.clear_config()


# --------------------------------------------------------------------------------------
# One-line errors, before anything is built
# --------------------------------------------------------------------------------------

def test_unknown_mixture_fails_in_one_line_before_any_compile(tmp_path):
  model_dir = tmp_path / "run"
  out = _run("train", *TINY_RUN, f"--gin.MODEL_DIR='{model_dir}'",
             "--gin.MIXTURE_OR_TASK_NAME='builtin_zeroshot_trian'", JAX_LOG_COMPILES="1")
  line = _error_line(out)
  assert "'builtin_zeroshot_trian'" in line and "'builtin_zeroshot_train'" in line
  # JAX_LOG_COMPILES=1 logs every compilation ("Compiling ..."; see the tiny run below).
  assert "Compiling" not in out.stderr + out.stdout
  assert not model_dir.exists()


def test_macro_typos_fail_but_shipped_macros_unused_by_the_run_do_not():
  gin.clear_config()
  try:
    gin_utils.parse(["quickstart/1_downstream.gin"], ["MODEL_DIR = '/tmp/x'"])
    # Flags shared by several runs: a macro of another shipped file, or no close match.
    gin_utils.check_macro_names(["SNI_DATA_DIR = '/s'", "PREFIX_LEN = 2", "MY_NOTE = 1"])
    with pytest.raises(gin_utils.GinConfigError, match="TRAIN_STEP .*did you mean: TRAIN_STEPS"):
      gin_utils.check_macro_names(["TRAIN_STEP = 5"])
  finally:
    gin.clear_config()


@pytest.mark.parametrize("case", ["macro typo", "vocabulary", "data directory",
                                  "unknown configurable", "unquoted string"])
def test_bad_configuration_fails_in_one_line_before_anything_is_built(case, tmp_path):
  vocab_dir = tmp_path / "vocab"
  vocab_dir.mkdir()
  (vocab_dir / "spiece.model").write_text("")
  sni = ["--gin_file=models/t5_tiny.gin", "--gin_file=models/t5_mtf.gin",
         "--gin_file=runs/train.gin", "--gin_file=tasks/sni.gin"]
  model_dir = f"--gin.MODEL_DIR='{tmp_path}/run'"
  flags, expected = {
      "macro typo": (TINY_RUN + [model_dir, "--gin.TRAN_STEPS=3"],
                     ["TRAN_STEPS", "did you mean: TRAIN_STEPS"]),
      "vocabulary": (sni + [model_dir, f"--gin.SNI_DATA_DIR='{tmp_path}'",
                            f"--gin.VOCABULARY_PATH='{vocab_dir}/spiece.modle'"],
                     ["vocabulary file not found", "spiece.modle", "%VOCABULARY_PATH",
                      "spiece.model"]),
      "data directory": (sni + [model_dir, f"--gin.SNI_DATA_DIR='{tmp_path}/sni'",
                                f"--gin.VOCABULARY_PATH='{vocab_dir}/spiece.model'"],
                         [f"{tmp_path}/sni", "%SNI_DATA_DIR"]),
      "unknown configurable": (TINY_RUN + [model_dir, "--gin.MODEL_CONFIG=@config.t5_confg()"],
                               ["config.t5_confg", "did you mean: config.t5_config"]),
      "unquoted string": (TINY_RUN + ["--gin.MODEL_DIR", f"{tmp_path}/run"],
                          ["MODEL_DIR", f"--gin.MODEL_DIR=\"'{tmp_path}/run'\""]),
  }[case]
  out = _run("train", *flags, JAX_LOG_COMPILES="1")
  line = _error_line(out)
  for text in expected:
    assert text in line, (text, line)
  assert out.stderr.strip().splitlines() == [line]  # nothing was set up, built or compiled
  assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------
# A tiny run: model-info.txt, a quiet console
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """(MODEL_DIR, console output) of 2 steps of the quickstart's stage 1 at tiny size, with
  JAX_LOG_COMPILES=1 (the control for the compile checks: compilations are logged)."""
  model_dir = tmp_path_factory.mktemp("tiny") / "run"
  out = _run("train", *TINY_RUN, f"--gin.MODEL_DIR='{model_dir}'", JAX_LOG_COMPILES="1")
  assert out.returncode == 0, out.stderr[-3000:]
  return model_dir, out.stdout + out.stderr


def test_tiny_run_writes_the_parameter_table_to_model_info(tiny_run):
  model_dir, console = tiny_run
  table = (model_dir / "model-info.txt").read_text()
  assert "downstream/token_embedder/embedding" in table
  assert "trainable: 246.78K params in 52 arrays; frozen: 0 params in 0 arrays" in table
  summary = [l for l in console.splitlines() if l.startswith("parameters:")]
  assert summary == [f"parameters: 246.78K trainable, 0 frozen; 52 fresh; table in "
                     f"{model_dir}/model-info.txt"]
  assert "downstream/token_embedder/embedding" not in console


def test_tiny_run_console_has_no_third_party_noise(tiny_run):
  _, console = tiny_run
  assert "Compiling" in console  # JAX_LOG_COMPILES got through: our filters keep warnings
  assert "step 2/2" in console  # progress lines stay
  noisy = [l for l in console.splitlines() if any(n in l for n in NOISE)]
  assert not noisy, noisy


def test_eval_with_an_unknown_mixture_fails_before_restoring(tiny_run):
  model_dir, _ = tiny_run
  out = _run("eval", f"--gin.MODEL_DIR='{model_dir}'",
             "--gin.EVAL_MIXTURE_OR_TASK_NAME='builtin_zeroshot_heldot'", JAX_LOG_COMPILES="1")
  line = _error_line(out)
  assert "'builtin_zeroshot_heldot'" in line and "'builtin_zeroshot_heldout'" in line
  assert "Compiling" not in out.stderr and "resumed from" not in out.stderr
