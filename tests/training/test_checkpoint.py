"""Checkpoints and resume: an interrupted run resumed from its directory is the uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_runs import params_of, quiet, tiny_config

import alphapo.training.modeling as modeling
from alphapo.training import cli, loop


class Interrupt(Exception):
    pass


def test_resume_continues_exactly(tmp_path, monkeypatch):
    """Interrupted after step 5 (checkpoint at 4), resumed: same parameters and logs as one run."""
    full = tiny_config(tmp_path, "full", max_steps=8, save_every=2)
    loop.train(full, log=quiet)

    calls = {"n": 0}
    real = modeling.fused_forward

    def crash_on_sixth_training_step(lm, *args, **kwargs):
        if lm.training:
            calls["n"] += 1
            if calls["n"] == 6:
                raise Interrupt()
        return real(lm, *args, **kwargs)

    monkeypatch.setattr(modeling, "fused_forward", crash_on_sixth_training_step)
    with pytest.raises(Interrupt):
        loop.train(tiny_config(tmp_path, "cut", max_steps=8, save_every=4), log=quiet)
    monkeypatch.setattr(modeling, "fused_forward", real)
    cut = tmp_path / "cut"
    logged = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert max(logged) == 5 and (cut / "latest").read_text().strip() == "checkpoints/step-000004"

    # Through the command line, as a user would: the run directory is enough.
    assert cli.main(["--resume", str(cut), "--no-progress"]) == 0
    a, b = params_of(tmp_path / "full"), params_of(cut)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name

    def losses(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r.get("loss"), r.get("eval_loss"), r.get("logps/chosen")) for r in rows]

    # Checkpoint steps close the log window, so even the averaged records agree.
    assert losses(cut) == losses(tmp_path / "full")
