"""What a run tells: progress as plain lines off a terminal (a bar on one), and a summary that counts steps."""

from __future__ import annotations

import json
import os
import select
import sys

import pytest

from tiny_runs import quiet, tiny_config

from alphapo.training import cli, loop
from alphapo.training import report as R
from alphapo.training.config import TrainConfig
from alphapo.training.parallel import Parallel


def test_off_a_terminal_progress_is_a_plain_line_every_twentieth_of_the_run(tmp_path, capsys):
    messages = []
    loop.train(tiny_config(tmp_path, max_steps=40, progress=True, eval_every=40, save_every=0), log=messages.append)
    err = capsys.readouterr().err
    assert "\r" not in err and "it/s" not in err, "a progress bar was drawn into a file"
    lines = [m for m in messages if m.startswith("step ") and "/40: loss" in m]
    assert [int(m.split()[1].split("/")[0]) for m in lines] == list(range(2, 41, 2)), lines
    assert "reward accuracy" in lines[-1] and "tokens/s" in lines[-1]


def test_the_bar_is_drawn_only_on_a_terminal(monkeypatch):
    par = Parallel("none", 0, 1, None, owns_group=False)
    cfg = TrainConfig(max_steps=10)
    for terminal in (False, True):
        monkeypatch.setattr(sys.stdout, "isatty", lambda: terminal, raising=False)
        monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal, raising=False)
        progress = R.Progress(cfg, 0, print, par)
        assert progress.bar.disable is (not terminal)
        progress.close()


def test_the_bar_shows_on_a_terminal_that_reports_no_size(monkeypatch):
    """A fresh pseudo-terminal (CI runners, ``script``, Python's ``pty``) reports 0 x 0: a bar
    sized to it is drawn as empty lines, leaving no progress on screen at all."""
    pty = pytest.importorskip("pty")
    master, slave = pty.openpty()  # 0 columns, 0 rows until someone sets them
    with os.fdopen(slave, "w", buffering=1) as terminal:
        monkeypatch.setattr(sys, "stdout", terminal)
        monkeypatch.setattr(sys, "stderr", terminal)
        progress = R.Progress(TrainConfig(max_steps=4), 0, print, Parallel("none", 0, 1, None, owns_group=False))
        for _ in range(4):
            progress.step()
        progress.close()
    drawn = b""
    while select.select([master], [], [], 0.1)[0]:
        try:
            drawn += os.read(master, 4096)
        except OSError:  # the other end is closed: all read
            break
    os.close(master)
    assert b"train: 100%" in drawn and b"4/4" in drawn, drawn


def test_a_resumed_run_says_how_many_steps_it_ran(tmp_path, capsys):
    loop.train(tiny_config(tmp_path, "R", max_steps=4), log=quiet)
    run = tmp_path / "R"
    assert cli.main(["--resume", str(run / "checkpoints" / "step-000002"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "done: 2 steps in this run (steps 3-4, resumed at step 2; 4 in all) in" in out, out
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["steps"], summary["steps_this_run"], summary["resumed_at"]) == (4, 2, 2)
    # At max_steps already: nothing to train, and the way on.
    assert cli.main(["--resume", str(run), "--no-progress"]) == 0
    assert "nothing to train: the run is at step 4 of --max-steps 4" in capsys.readouterr().out
