"""Shared fixtures: tiny configs, Hugging Face reference models, the shared data directory."""
import pathlib
import tempfile

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long end-to-end runs (deselect with -m 'not slow')")


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
