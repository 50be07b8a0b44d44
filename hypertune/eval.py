"""Evaluate a trained run: `python -m hypertune.eval --gin.MODEL_DIR="'/path/to/run'"
[--gin.EVAL_MIXTURE_OR_TASK_NAME="'builtin_heldout'"] [--gin.evaluate_checkpoint.num_beams=4]`.

The run's own `config.gin` is loaded first (model, initial checkpoint, lengths, tasks), then
`gin/runs/eval.gin`, then any further gin files and bindings; the latest checkpoint is restored
and evaluated once, as at deployment (PEFT parameters generated once per task). Results go to
`MODEL_DIR/eval/<EVAL_MIXTURE_OR_TASK_NAME>_<split>_step<N>.json`. `--help` lists the flags.
"""
from hypertune import gin_utils

EVAL_FLAGS = (
    "--gin_file=runs/eval.gin",
    # trainer.train checks the names of the training and (with an eval period) evaluation
    # mixtures before it builds the model; with restored_fn set it evaluates nothing itself,
    # so this only makes an unknown EVAL_MIXTURE_OR_TASK_NAME fail before the restore.
    "--gin_bindings=train.eval_mixture_or_task_name = %EVAL_MIXTURE_OR_TASK_NAME",
    "--gin_bindings=train.eval_period = 1",
)


def main(argv=None):
  gin_utils.run_restored(EVAL_FLAGS, argv, binary="eval")


if __name__ == "__main__":
  main()
