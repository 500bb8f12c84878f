"""metrics.py: JSONL read by json, TensorBoard read by tensorboard's own EventAccumulator, PNG by matplotlib."""
from __future__ import annotations

import io
import json
import math

import matplotlib.image
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from npr_async.metrics import MetricsLogger, Progress, plot_curves, read_metrics


def test_jsonl_and_tensorboard(tmp_path):
    with MetricsLogger(tmp_path / "run") as log:
        for step in range(5):
            log.log(step, {"loss": 1.0 / (step + 1), "reward": np.float32(step * 0.5)})
        log.log(5, {"loss": math.nan})
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert [r["loss"] for r in rows[:5]] == [1.0, 0.5, 1 / 3, 0.25, 0.2] and rows[5]["loss"] is None
    assert rows == read_metrics(tmp_path / "run")
    acc = EventAccumulator(str(tmp_path / "run/tb"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"loss", "reward"}
    assert [(e.step, e.value) for e in acc.Scalars("reward")] == [(s, s * 0.5) for s in range(5)]
    assert [e.step for e in acc.Scalars("loss")][:5] == [0, 1, 2, 3, 4]


def test_appends_across_loggers_and_no_tensorboard(tmp_path):
    for step in (0, 1):
        with MetricsLogger(tmp_path, tensorboard=False) as log:
            log.log(step, {"x": step})
    assert [r["x"] for r in read_metrics(tmp_path)] == [0.0, 1.0] and not (tmp_path / "tb").exists()


def test_bad_inputs(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    with pytest.raises(ValueError, match="metric 'loss' at step 0 is not a number: 'high'"):
        log.log(0, {"loss": "high"})
    with pytest.raises(ValueError, match="step must be an int >= 0, got -1"):
        log.log(-1, {"loss": 1.0})
    with pytest.raises(ValueError, match="step must be an int >= 0, got 1.5"):
        log.log(1.5, {"loss": 1.0})
    with pytest.raises(ValueError, match="metric name 'step'"):
        log.log(0, {"step": 1.0})
    with pytest.raises(ValueError, match="must be a dict"):
        log.log(0, [1.0])
    log.close()
    with pytest.raises(ValueError, match="is closed"):
        log.log(0, {"loss": 1.0})
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        read_metrics(tmp_path / "elsewhere")
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "x": 1}\n{oops\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2: not valid JSON"):
        plot_curves(tmp_path)


def test_plot_curves(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for step in range(20):
            log.log(step, {"loss": 2.0 - step * 0.1, "reward": step * 0.05, "tokens": 100 + step, "lr": 1e-4})
    out = plot_curves(tmp_path, tmp_path / "c.png")
    img = matplotlib.image.imread(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and img.shape[0] > 200 and img.shape[1] > 600
    assert img[..., :3].std() > 0.05  # curves drawn, not a blank canvas
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text('{"step": 0, "time": 1.0}\n')
    with pytest.raises(ValueError, match="no metrics to plot"):
        plot_curves(empty)


class FakeTTY(io.StringIO):  # a real text stream that says it is a terminal
    def isatty(self):
        return True


def test_progress_plain_and_rich():
    out = io.StringIO()
    with Progress(3, "train", mode="auto", stream=out) as p:  # not a TTY: plain lines
        p.update(loss=0.123456, reward=1)
        p.update(2)
    lines = out.getvalue().splitlines()
    assert p.mode == "plain" and len(lines) == 2
    assert lines[0].startswith("train 1/3 loss=0.1235 reward=1 (") and lines[1].startswith("train 3/3 (")
    tty = FakeTTY()
    with Progress(4, "rollout", mode="auto", stream=tty) as p:
        p.update(4, reward=0.5)
    assert p.mode == "rich" and "rollout" in tty.getvalue() and "4/4" in tty.getvalue()
    assert "reward=0.5" in tty.getvalue()
    with pytest.raises(ValueError, match="progress mode must be auto, rich or plain, got 'fancy'"):
        Progress(1, mode="fancy")
    with pytest.raises(ValueError, match="total must be an int >= 0, got -2"):
        Progress(-2)
