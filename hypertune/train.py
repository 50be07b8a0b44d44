"""Train: `python -m hypertune.train --gin_file=F [--gin_file=G] [--gin.MACRO=VALUE ...]`."""
from hypertune import gin_utils


def main():
  from hypertune import trainer  # pylint: disable=g-import-not-at-top
  gin_utils.run(trainer.main)


if __name__ == "__main__":
  main()
