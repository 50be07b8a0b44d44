"""Shared fixtures: tiny configs, Hugging Face reference models, the shared data directory."""
import pathlib

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
