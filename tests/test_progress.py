"""Progress of long work (metamoe/progress.py): log lines with elapsed and ETA off a
terminal, a tqdm bar on one; the training loop and compare report through it."""

from __future__ import annotations

import io
import logging

import torch

from metamoe import progress
from metamoe.config import OptimConf
from metamoe.training import train


def test_log_lines_off_a_terminal(caplog, monkeypatch):
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    with caplog.at_level(logging.INFO, logger="metamoe"):
        m = torch.nn.Linear(4, 2)
        train(m, torch.randn(32, 4), torch.randint(0, 2, (32,)),
              OptimConf(epochs=3, batch_size=8), desc="toy", log_every=1)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("toy epoch")]
    assert len(lines) == 3 and lines[-1].startswith("toy epoch 3/3 loss")
    assert all("elapsed, ETA" in line for line in lines)


def test_long_loops_log_about_ten_lines(caplog, monkeypatch):
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    with caplog.at_level(logging.INFO, logger="metamoe"):
        with progress.Progress(1000, "embedding", unit="batch", lines=10) as p:
            for _ in range(1000):
                p.step()
    assert 9 <= sum("embedding batch" in r.getMessage() for r in caplog.records) <= 11


def test_a_bar_on_a_terminal(monkeypatch):
    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    err = io.StringIO()
    monkeypatch.setattr(progress.sys, "stderr", err)
    with progress.Progress(5, "[compare] runs", unit="run") as p:
        for i in range(5):
            p.step(info=f"run-{i}")
        assert p.bar is not None and p.bar.n == 5
    assert "[compare] runs:" in err.getvalue() and "0/5" in err.getvalue()
