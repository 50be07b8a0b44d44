"""Train in-process from gin files and bindings, as `python -m hypertune.train` would."""
import gin

from hypertune import gin_utils


def train(files, bindings):
  """`trainer.train()` under `files` + `bindings` (required macros checked); gin is cleared."""
  from hypertune import trainer  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  gin_utils.parse(list(files), list(bindings))
  gin_utils.check_required_macros()
  try:
    return trainer.train()
  finally:
    gin.clear_config()
