"""Write a task's PEFT parameters / apply them: `python -m hypertune.infer --gin.MODEL_DIR=...`.

See `hypertune.inference` for the flags (`--gin.infer.demonstrations_file`, `peft_dir`,
`inputs_file`) and the file format; `--help` lists them with examples.
"""
from hypertune import gin_utils


def main(argv=None):
  gin_utils.run_restored(["--gin_bindings=train.restored_fn = @infer"], argv, binary="infer")


if __name__ == "__main__":
  main()
