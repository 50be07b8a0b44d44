"""Training progress: one log line per period and TensorBoard scalars.

Scalars go to ``MODEL_DIR/train`` and ``MODEL_DIR/eval`` through ``tensorboardX`` (pure
Python + protobuf; it does not import TensorFlow), only on process 0. Each training log line is
also appended to ``MODEL_DIR/train/metrics.jsonl`` as one JSON object (``step``, the period's
mean metrics such as ``loss``, ``learning_rate``, ``steps_per_second``, ``tokens_per_second``):
plain text that plots and scripts read back without a TensorBoard parser (``hypertune.plot``).
A resumed run appends, so a step may appear twice; readers keep its last record.

A log line looks like::

    step 1200/10000 | loss 2.3141 | z_loss 0.0012 | lr 1.00e-03 | 5.3 steps/s | 21,880 tokens/s | ETA 0:27:40
"""

from __future__ import annotations

import collections
import datetime
import json
import logging
import os
import time
from typing import Callable, Deque, Dict, Mapping, Optional

import gin
import numpy as np

__all__ = ["ProgressLogger", "format_eta", "format_metric", "read_metrics_jsonl", "METRICS_JSONL"]

# Training metrics, one JSON object per log line, under ``MODEL_DIR``.
METRICS_JSONL = os.path.join("train", "metrics.jsonl")


def format_eta(seconds: Optional[float]) -> str:
    """``H:MM:SS`` (``D days, H:MM:SS`` beyond a day); '?' when unknown."""
    if seconds is None or not np.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(round(max(seconds, 0.0)))))


def _scalar(x) -> float:
    return float(np.asarray(x))


def _is_count(name: str) -> bool:
    """Counts (``num_tokens``, ``average/rougeL/num_tasks``) print as integers, not ``35.2500``."""
    return name.rsplit("/", 1)[-1].startswith("num_")


def format_metric(name: str, value) -> str:
    """``name value``: counts as integers with thousands separators (a period's mean count is
    rounded; TensorBoard and metrics.jsonl keep the exact mean), other metrics with 4 decimals."""
    v = _scalar(value)
    if _is_count(name) and np.isfinite(v):
        return f"{name} {int(round(v)):,d}"
    return f"{name} {v:.4f}"


def read_metrics_jsonl(model_dir: str) -> list:
    """The records of ``model_dir/train/metrics.jsonl`` sorted by step, one per step (the last
    written: a resumed run re-logs the steps after its checkpoint); [] when the file is absent."""
    path = os.path.join(model_dir, METRICS_JSONL)
    if not os.path.exists(path):
        return []
    by_step = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


@gin.configurable(denylist=["model_dir", "total_steps", "start_step", "clock", "print_fn"])
class ProgressLogger:
    """Accumulates per-step metrics and reports every ``log_every_steps`` steps.

    Usage::

        progress = ProgressLogger(MODEL_DIR, total_steps=TRAIN_STEPS, start_step=step)
        for step in range(start_step + 1, TRAIN_STEPS + 1):
            state, metrics = train_step(state, batch)     # metrics: {'loss': [], ...}
            progress.update(step, metrics, num_tokens=batch_tokens, learning_rate=lr)
        progress.write_eval(step, {'rougeL': 41.2, 'task/accuracy': 60.0})
        progress.close()

    Metric values may be device arrays: they are only converted (which waits for the
    device) at the end of a logging period, so logging does not stall the step pipeline.

    Args:
      model_dir: run directory; TensorBoard files go to ``model_dir/train`` and
        ``model_dir/eval``.  None: print only.
      total_steps: final step number (for ETA).
      start_step: step the run (re)starts from, so ETA counts only remaining steps.
      log_every_steps: logging period.
      eta_window: number of recent logging periods whose mean step time drives the ETA
        (a moving average that forgets compilation and warm-up).
      write_tensorboard: write event files (process 0 only).
      write_jsonl: append each training log line to ``model_dir/train/metrics.jsonl``
        (process 0 only).
      clock: time source, injectable for tests.
      print_fn: line sink (default ``logging.info``).
    """

    def __init__(
        self,
        model_dir: Optional[str],
        total_steps: int,
        start_step: int = 0,
        log_every_steps: int = 100,
        eta_window: int = 10,
        write_tensorboard: bool = True,
        write_jsonl: bool = True,
        clock: Callable[[], float] = time.perf_counter,
        print_fn: Optional[Callable[[str], None]] = None,
    ):
        if log_every_steps < 1:
            raise ValueError(f"log_every_steps must be >= 1, got {log_every_steps}")
        self.total_steps = int(total_steps)
        self.log_every_steps = int(log_every_steps)
        self._clock = clock
        self._print = print_fn or logging.info
        self._period_start_time = clock()
        self._period_start_step = int(start_step)
        self._sums: Dict[str, object] = {}
        self._count = 0
        self._tokens = 0.0
        self._lr: Optional[float] = None
        self._step_times: Deque[float] = collections.deque(maxlen=max(int(eta_window), 1))
        self._writers: Dict[str, object] = {}
        self.model_dir = model_dir
        writer = bool(model_dir)
        if writer and (write_tensorboard or write_jsonl):
            import jax

            writer = jax.process_index() == 0
        self._tb = writer and bool(write_tensorboard)
        self._jsonl = writer and bool(write_jsonl)
        self.last_line: Optional[str] = None

    # -- writers -----------------------------------------------------------------------

    def _writer(self, split: str):
        if split not in self._writers:
            from tensorboardX import SummaryWriter

            logdir = os.path.join(self.model_dir, split)
            os.makedirs(logdir, exist_ok=True)
            self._writers[split] = SummaryWriter(logdir=logdir, flush_secs=30)
        return self._writers[split]

    def write_scalars(self, split: str, step: int, scalars: Mapping[str, float]) -> None:
        """Writes ``scalars`` at ``step`` under ``model_dir/<split>`` (no-op without TensorBoard)."""
        if not self._tb:
            return
        w = self._writer(split)
        for name, value in scalars.items():
            w.add_scalar(name, _scalar(value), global_step=int(step))
        w.flush()

    def _append_jsonl(self, step: int, scalars: Mapping[str, float]) -> None:
        """Appends ``{"step": step, **scalars}`` to ``model_dir/train/metrics.jsonl``."""
        if not self._jsonl:
            return
        path = os.path.join(self.model_dir, METRICS_JSONL)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        record = {"step": int(step), **{k: _scalar(v) for k, v in scalars.items()}}
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")

    # -- train -------------------------------------------------------------------------

    def update(
        self,
        step: int,
        metrics: Mapping[str, object],
        num_tokens: float = 0,
        learning_rate: Optional[float] = None,
    ) -> Optional[str]:
        """Records one finished step; logs and returns the line if ``step`` ends a period.

        Args:
          step: the step just completed (1-based count of updates applied).
          metrics: scalar loss terms of this step (floats or 0-d arrays); averaged over
            the period.
          num_tokens: tokens processed by this step (e.g. non-padding input+target tokens
            of the global batch), for tokens/s.
          learning_rate: learning rate used at this step (last value is logged).
        """
        for k, v in metrics.items():
            self._sums[k] = v if k not in self._sums else self._sums[k] + v
        self._count += 1
        self._tokens += float(num_tokens)
        if learning_rate is not None:
            self._lr = learning_rate
        if step % self.log_every_steps and step != self.total_steps:
            return None
        return self._flush(step)

    def _flush(self, step: int) -> str:
        now = self._clock()
        elapsed = max(now - self._period_start_time, 1e-9)
        steps = max(step - self._period_start_step, 1)
        self._step_times.append(elapsed / steps)
        avg_step = float(np.mean(self._step_times))
        means = {k: _scalar(v) / max(self._count, 1) for k, v in self._sums.items()}
        tokens_per_s = self._tokens / elapsed
        steps_per_s = steps / elapsed
        remaining = max(self.total_steps - step, 0)
        # int(): a step passed as 4.0 or a 0-d array still prints as "step 4/100".
        parts = [f"step {int(step)}/{self.total_steps}"]
        parts += [format_metric(k, v) for k, v in means.items()]
        lr = None if self._lr is None else _scalar(self._lr)
        if lr is not None:
            parts.append(f"lr {lr:.2e}")
        parts.append(f"{steps_per_s:.2f} steps/s")
        parts.append(f"{tokens_per_s:,.0f} tokens/s")
        parts.append(f"ETA {format_eta(remaining * avg_step)}")
        line = " | ".join(parts)
        self._print(line)
        self.last_line = line
        scalars = dict(means)
        if lr is not None:
            scalars["learning_rate"] = lr
        scalars["timing/steps_per_second"] = steps_per_s
        scalars["timing/tokens_per_second"] = tokens_per_s
        self.write_scalars("train", step, scalars)
        # The same numbers under plain names (no TensorBoard "timing/" group).
        record = {k: v for k, v in scalars.items() if not k.startswith("timing/")}
        record.update(steps_per_second=steps_per_s, tokens_per_second=tokens_per_s)
        self._append_jsonl(step, record)
        self._sums, self._count, self._tokens = {}, 0, 0.0
        self._period_start_time = now
        self._period_start_step = step
        return line

    # -- eval --------------------------------------------------------------------------

    def write_eval(self, step: int, metrics: Mapping[str, float]) -> str:
        """Writes eval metrics (e.g. ``{'task_x/rougeL': 40.1, 'average/rougeL': 38.0}``) under
        ``model_dir/eval`` and prints the averages (per-task numbers of a hundred tasks would
        bury the progress lines; they are in TensorBoard and the results JSON)."""
        shown = {k: v for k, v in metrics.items() if k.startswith("average/")} or metrics
        line = f"eval @ step {int(step)} | " + " | ".join(format_metric(k, v) for k, v in shown.items())
        self._print(line)
        self.write_scalars("eval", step, metrics)
        return line

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers = {}
