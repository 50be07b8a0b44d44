"""Tests for hypertune.progress."""

import glob
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
