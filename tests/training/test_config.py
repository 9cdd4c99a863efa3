"""The config: knobs from a file and flags, each checked."""

from __future__ import annotations

import json

import pytest

from alphapo.training import config as C


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 0.001\nalpha: -0.5\nmax-steps: 7\ngradient_checkpointing: true\n")
    cfg = C.parse_config(["--config", str(path), "--alpha", "0.5"])
    assert (cfg.lr, cfg.alpha, cfg.max_steps, cfg.gradient_checkpointing) == (0.001, 0.5, 7, True)
    (tmp_path / "run.json").write_text(json.dumps({"beta": 1, "loss_type": "ipo"}))
    cfg = C.parse_config(["--config", str(tmp_path / "run.json")])
    assert cfg.beta == 1.0 and isinstance(cfg.beta, float) and cfg.loss_type == "ipo"
    path.write_text("learning_rate: 0.1\n")
    with pytest.raises(C.ConfigError, match="unknown knob 'learning_rate'"):
        C.parse_config(["--config", str(path)])
    path.write_text("max_steps: many\n")
    with pytest.raises(C.ConfigError, match="max_steps must be int"):
        C.parse_config(["--config", str(path)])
    path.write_text("loss_type: squared\n")
    with pytest.raises(C.ConfigError, match="loss_type must be one of"):
        C.parse_config(["--config", str(path)])
    with pytest.raises(C.ConfigError, match="batch_size must be > 0"):
        C.parse_config(["--batch-size", "0"])
    with pytest.raises(SystemExit):
        C.parse_config(["--precision", "fp8"])
