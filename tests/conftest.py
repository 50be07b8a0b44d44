"""Shared fixtures: tiny configs, Hugging Face reference models, the shared data directory;
one JAX compilation cache for the whole session."""
import os
import pathlib
import shutil
import tempfile

import pytest

# One persistent compilation cache per test session, shared by the xdist workers and every
# subprocess they start (they inherit the environment): the suite compiles the same tiny
# models many times over (each run file, binary and quickstart stage), and XLA's compile time
# dominates at this size (HyperT5-tiny's init: 8 s compiled, 1.4 s from the cache). Set here,
# before JAX is imported; the controller makes the directory before it starts the workers.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix="hypertune-test-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# XLA:CPU's LLVM passes at -O0: the tiny models' compile time drops by about a third and their
# run time, a fraction of a second, barely changes (same numerics: no fast-math either way).
# Tests only: the project's own runs keep XLA's defaults.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAGS).strip()


def xla_flags_with_devices(count: int) -> str:
  """XLA_FLAGS for a subprocess on `count` forced host devices (keeping the tests' flags)."""
  return f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={count}"

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long end-to-end runs (deselect with -m 'not slow')")


def pytest_unconfigure(config):
  if _OWN_CACHE and not hasattr(config, "workerinput"):  # the process that made it
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_data():
  """Path to ../shared/data, or skip where it is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"{SHARED_DATA} is absent")
  return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def library_temp_files_under_pytest_tmp(tmp_path_factory):
  """Temporary files that libraries make and leave go under pytest's own temporary directory,
  which pytest prunes, instead of piling up in /tmp: tfds makes an empty directory for every
  dataset builder over a directory without prepared data (255 in one run of this suite)."""
  old = tempfile.tempdir
  tempfile.tempdir = str(tmp_path_factory.mktemp("tempfile"))
  yield tempfile.tempdir
  tempfile.tempdir = old
