"""A run's parts from its config: the learning-rate schedule, and user data through a run."""

from __future__ import annotations

import json

import pytest
from tiny_runs import quiet, tiny_config

from alphapo.training import build, loop
from alphapo.training import data as D


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = build.TrainConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    f = build.lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.55) and f(100) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


def test_conversational_file_trains(tmp_path):
    train, held = D.builtin_task(64, 16, seed=5)

    def chat(r):
        return {"prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}]}

    for name, rows in (("train.jsonl", train), ("eval.jsonl", held)):
        (tmp_path / name).write_text("".join(json.dumps(chat(r)) + "\n" for r in rows))
    cfg = tiny_config(tmp_path, train_file=str(tmp_path / "train.jsonl"), eval_file=str(tmp_path / "eval.jsonl"),
                      max_steps=2)
    summary = loop.train(cfg, log=quiet)
    assert summary["eval_pairs"] == 16 and summary["steps"] == 2


def test_prompt_filling_max_length_is_reported_not_trained(tmp_path):
    rows = [{"prompt": "p" * 40, "chosen": "a", "rejected": "b"}] + D.builtin_task(40, 1)[0]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    messages = []
    cfg = tiny_config(tmp_path, train_file=str(path), max_length=24, max_steps=1, eval_size=4)
    loop.train(cfg, log=messages.append)
    assert any(m.startswith("warning:") and "dropped 1 of" in m and "max_length=24" in m and "(line 1)" in m
               for m in messages), messages  # its line in the file, through the held-out split
