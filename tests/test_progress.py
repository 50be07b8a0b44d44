"""Tests for hypertune.progress."""

import glob
import json
import os
import struct

import jax.numpy as jnp
import pytest
from tensorboardX.proto import event_pb2

from hypertune import progress


def read_scalars(logdir):
    """{tag: [(step, value), ...]} from tensorboardX event files (TFRecord framing)."""
    out = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            record = data[pos + 12 : pos + 12 + length]  # skip length + its crc
            pos += 12 + length + 4  # record + its crc
            event = event_pb2.Event.FromString(record)
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_log_line_and_tensorboard(tmp_path):
    clock = FakeClock()
    lines = []
    p = progress.ProgressLogger(
        str(tmp_path), total_steps=100, start_step=0, log_every_steps=10, clock=clock, print_fn=lines.append
    )
    for step in range(1, 21):
        clock.t += 0.5  # 2 steps/s
        out = p.update(step, {"loss": jnp.asarray(float(step)), "aux_loss": 0.1}, num_tokens=1000, learning_rate=1e-3)
        assert (out is not None) == (step % 10 == 0)
    assert len(lines) == 2
    # Period 2 averages steps 11..20 -> loss 15.5; 80 steps left at 0.5 s -> 40 s.
    assert lines[1] == (
        "step 20/100 | loss 15.5000 | aux_loss 0.1000 | lr 1.00e-03 | 2.00 steps/s | 2,000 tokens/s | ETA 0:00:40"
    )
    line = p.write_eval(20, {"copa/accuracy": 55.0, "average/rougeL": 31.5})
    assert line == "eval @ step 20 | average/rougeL 31.5000"  # per-task numbers: TensorBoard
    p.close()
    train = read_scalars(tmp_path / "train")
    assert train["loss"] == [(10, 5.5), (20, 15.5)]
    assert train["learning_rate"][0] == (10, pytest.approx(1e-3))
    assert train["timing/tokens_per_second"][1] == (20, pytest.approx(2000.0))
    ev = read_scalars(tmp_path / "eval")
    assert ev["copa/accuracy"] == [(20, 55.0)] and ev["average/rougeL"] == [(20, 31.5)]


def test_eta_is_moving_average_and_resume_aware():
    clock = FakeClock()
    lines = []
    p = progress.ProgressLogger(
        None, total_steps=1000, start_step=500, log_every_steps=100, eta_window=2, clock=clock, print_fn=lines.append
    )
    # First period includes a 100 s compile: 1.1 s/step; then 0.1 s/step, twice.
    for period, per_step in enumerate([1.1, 0.1, 0.1]):
        for i in range(100):
            clock.t += per_step
            p.update(500 + period * 100 + i + 1, {"loss": 1.0})
    # Window of 2 periods forgets the compile: 200 steps left * 0.1 s.
    assert lines[-1].endswith("ETA 0:00:20"), lines[-1]
    assert lines[0].startswith("step 600/1000") and lines[0].endswith("ETA 0:07:20"), lines[0]  # 400 * 1.1 s
    assert "lr" not in lines[0]


def test_last_step_is_always_logged_and_validation():
    lines = []
    p = progress.ProgressLogger(None, total_steps=7, log_every_steps=5, print_fn=lines.append)
    for s in range(1, 8):
        p.update(s, {"loss": 1.0})
    assert [l.split(" |")[0] for l in lines] == ["step 5/7", "step 7/7"]
    assert progress.format_eta(90061) == "1 day, 1:01:01" and progress.format_eta(None) == "?"
    with pytest.raises(ValueError, match="log_every_steps"):
        progress.ProgressLogger(None, total_steps=1, log_every_steps=0)


def test_counts_and_steps_print_as_integers():
    """Step numbers and counts (num_tokens, eval's num_tasks) never print as 1234.0."""
    lines = []
    p = progress.ProgressLogger(None, total_steps=4, log_every_steps=2, print_fn=lines.append)
    p.update(1.0, {"loss": 2.0, "num_tokens": jnp.asarray(1234.0)})
    p.update(2.0, {"loss": 1.0, "num_tokens": jnp.asarray(1236.0)})
    assert lines[0].startswith("step 2/4 | loss 1.5000 | num_tokens 1,235 | "), lines[0]
    line = p.write_eval(jnp.asarray(4), {"average/rougeL": 31.5, "average/rougeL/num_tasks": 108.0})
    assert line == "eval @ step 4 | average/rougeL 31.5000 | average/rougeL/num_tasks 108"
    # A period's mean count is rounded for the line only.
    assert progress.format_metric("num_tokens", 35.25) == "num_tokens 35"
    assert progress.format_metric("accuracy", 3.0) == "accuracy 3.0000"
    assert progress.format_metric("num_tokens", float("nan")) == "num_tokens nan"


def test_metrics_jsonl_records_each_log_line_and_resume_keeps_the_last(tmp_path):
    clock = FakeClock()

    def run(start, end):
        p = progress.ProgressLogger(str(tmp_path), total_steps=6, start_step=start, log_every_steps=2, clock=clock, print_fn=lambda _: None)
        for step in range(start + 1, end + 1):
            clock.t += 0.5
            p.update(step, {"loss": float(10 * step + start)}, num_tokens=100, learning_rate=1e-3)
        p.close()

    run(0, 4)
    run(2, 6)  # resumed from a step-2 checkpoint: step 4 is logged again
    raw = (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in raw] == [2, 4, 4, 6]
    records = progress.read_metrics_jsonl(str(tmp_path))
    assert [r["step"] for r in records] == [2, 4, 6]
    assert [r["loss"] for r in records] == [15.0, 37.0, 57.0]  # step 4: the resumed run's mean
    assert records[0]["learning_rate"] == pytest.approx(1e-3)
    assert records[0]["tokens_per_second"] == pytest.approx(200.0)
    assert records[0]["steps_per_second"] == pytest.approx(2.0)
    assert progress.read_metrics_jsonl(str(tmp_path / "absent")) == []


def test_metrics_jsonl_can_be_turned_off(tmp_path):
    p = progress.ProgressLogger(str(tmp_path), total_steps=1, write_jsonl=False, print_fn=lambda _: None)
    p.update(1, {"loss": 1.0})
    p.close()
    assert not (tmp_path / "train" / "metrics.jsonl").exists()
    assert glob.glob(str(tmp_path / "train" / "events.out.tfevents.*"))  # TensorBoard still written
