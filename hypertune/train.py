"""Train: `python -m hypertune.train --gin_file=F [--gin_file=G] [--gin.MACRO=VALUE ...]`.

`python -m hypertune.train --help` lists the flags, the main macros, examples and the shipped
run files; `--helpfull` adds every gin configurable (see `hypertune.gin_utils`).
"""
from hypertune import gin_utils


def main(argv=None):
  # trainer is imported by gin_utils after the flags are read: `--help` stays quick, and
  # TensorFlow (through seqio) loads inside gin_utils.quiet_startup.
  gin_utils.run(gin_utils.train_main, argv, binary="train")


if __name__ == "__main__":
  main()
