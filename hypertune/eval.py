"""Evaluate a trained run: `python -m hypertune.eval --gin.MODEL_DIR="'/path/to/run'"
[--gin.EVAL_MIXTURE_OR_TASK_NAME="'builtin_heldout'"] [--gin.evaluate_checkpoint.num_beams=4]`.

The run's own `config.gin` is loaded first (model, initial checkpoint, lengths, tasks), then
`gin/runs/eval.gin`, then any further gin files and bindings; the latest checkpoint is restored
and evaluated once, as at deployment (PEFT parameters generated once per task). Results go to
`MODEL_DIR/eval/<EVAL_MIXTURE_OR_TASK_NAME>_<split>_step<N>.json`.
"""
from hypertune import gin_utils


def main(argv=None):
  gin_utils.run_restored(["--gin_file=runs/eval.gin"], argv)


if __name__ == "__main__":
  main()
