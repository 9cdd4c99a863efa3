"""The config: knobs from a file and flags, each checked."""

from __future__ import annotations

import json

import pytest
import torch

from alphapo.loss import triton_available
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
    with pytest.raises(C.ConfigError, match=r"loss_type \(--loss-type\) must be one of"):
        C.parse_config(["--config", str(path)])
    with pytest.raises(C.ConfigError, match=r"batch_size \(--batch-size\) must be an integer >= 1, got 0"):
        C.parse_config(["--batch-size", "0"])
    with pytest.raises(SystemExit):
        C.parse_config(["--precision", "fp8"])


@pytest.mark.parametrize("argv, message", [
    pytest.param(["--beta", "0"], "beta (--beta) must be a finite number > 0, got 0.0", id="beta-0"),
    pytest.param(["--alpha", "nan"], "alpha (--alpha) must be a finite number, got nan", id="alpha-nan"),
    pytest.param(["--lr", "inf"], "lr (--lr) must be a finite number > 0, got inf", id="lr-inf"),
    pytest.param(["--gamma=-inf"], "gamma (--gamma) must be a finite number", id="gamma-inf"),
    pytest.param(["--label-smoothing", "0.7"], "label_smoothing (--label-smoothing) must be a finite number in "
                 "[0, 0.5]", id="smoothing"),
    pytest.param(["--label-smoothing", "0.1", "--loss-type", "hinge"], "label_smoothing (--label-smoothing) 0.1 "
                 "has no effect on --loss-type hinge", id="smoothing-hinge"),
    pytest.param(["--label-smoothing", "0.1", "--loss-type", "ipo"], "has no effect on --loss-type ipo",
                 id="smoothing-ipo"),
    pytest.param(["--adam-beta2", "1"], "adam_beta2 (--adam-beta2) must be a finite number in [0, 1)", id="beta2"),
    pytest.param(["--grad-clip", "nan"], "grad_clip (--grad-clip) must be a finite number >= 0", id="clip-nan"),
    pytest.param(["--nll-weight", "-1"], "nll_weight (--nll-weight) must be a finite number >= 0", id="nll"),
    pytest.param(["--n-head", "5"], "n_embd (64) must be a multiple of n_head (5)", id="heads-divide"),
    pytest.param(["--n-embd", "30", "--n-head", "2"], "even head size", id="head-odd"),
    pytest.param(["--eval-size", "0"], "eval_size (--eval-size) must be an integer >= 1, got 0", id="eval-0"),
    pytest.param(["--seed", "-1"], "seed (--seed) must be an integer in [0, 2**63)", id="seed"),
    pytest.param(["--max-prompt-length", "1024"], "max_prompt_length (1024) must be smaller than max_length "
                 "(1024)", id="prompt-fills"),
    pytest.param(["--batch-size", "30000"], "batch_size (30000) exceeds the built-in task's", id="batch-size"),
    pytest.param(["--device", "gpu"], "device (--device) must be auto, cpu, cuda, cuda:N or mps", id="device"),
    pytest.param(["--model", "/no/such/model"], "model (--model) /no/such/model: no such directory", id="model"),
    pytest.param(["--train-file", "/no/such.jsonl"], "train_file (--train-file) /no/such.jsonl: no such file",
                 id="train-file"),
])
def test_every_knob_is_checked_up_front(argv, message):
    """Refused while the command line is read: before seconds of setup, naming the knob and its range."""
    with pytest.raises(C.ConfigError) as info:
        C.parse_config(argv)
    assert message in str(info.value)


def test_a_backend_that_cannot_run_here_is_refused_up_front(monkeypatch):
    """Not a raw RuntimeError / TypeError from the first loss call, after the data and model loaded."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("the triton backend runs here")
    with pytest.raises(C.ConfigError, match=r"backend \(--backend\) triton cannot run here: .*runs on CUDA"):
        C.parse_config(["--backend", "triton"])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not triton_available():
        pytest.skip("needs triton")
    assert C.parse_config(["--backend", "triton"]).backend == "triton"  # fp32 on the CPU: the interpreter can
    for flags in (["--precision", "bf16"], ["--param-dtype", "bf16"]):
        with pytest.raises(C.ConfigError, match=r"triton under TRITON_INTERPRET=1 cannot compute bfloat16"):
            C.parse_config(["--backend", "triton", *flags])


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="an MPS device is here")
def test_a_device_this_torch_does_not_have_is_refused():
    with pytest.raises(C.ConfigError, match=r"device \(--device\) mps: torch sees no MPS device here"):
        C.parse_config(["--device", "mps"])


def test_a_library_config_of_the_wrong_type_is_refused():
    with pytest.raises(C.ConfigError, match=r"lr \(--lr\) must be a finite number > 0, got '1e-3'"):
        C.check_config(C.TrainConfig(lr="1e-3"))


def test_config_file_formats_come_from_the_extension(tmp_path):
    (tmp_path / "run.yaml").write_text("lr: 1e-6\nalpha: 1\n")  # YAML 1.1 reads 1e-6 as a string
    assert (C.parse_config(["--config", str(tmp_path / "run.yaml")]).lr, C.parse_config(
        ["--config", str(tmp_path / "run.yaml")]).alpha) == (1e-6, 1.0)
    (tmp_path / "run.toml").write_text('lr = 1e-6\nloss_type = "ipo"\nmax-steps = 7\n')
    cfg = C.parse_config(["--config", str(tmp_path / "run.toml")])
    assert (cfg.lr, cfg.loss_type, cfg.max_steps) == (1e-6, "ipo", 7)
    (tmp_path / "run.txt").write_text("lr: 1e-6\n")
    with pytest.raises(C.ConfigError, match=r"run.txt: unknown format '.txt'; use .yaml, .yml, .json or .toml"):
        C.parse_config(["--config", str(tmp_path / "run.txt")])
    for name, text in (("bad.json", '{"lr": 1e-6,'), ("bad.toml", "lr = = 1"), ("bad.yaml", "lr: [1\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(C.ConfigError, match=f"config file {tmp_path / name}: not valid"):
            C.parse_config(["--config", str(tmp_path / name)])
    (tmp_path / "steps.yaml").write_text("max_steps: 1e3\n")  # an int knob takes no float-like string
    with pytest.raises(C.ConfigError, match="max_steps must be int"):
        C.parse_config(["--config", str(tmp_path / "steps.yaml")])
