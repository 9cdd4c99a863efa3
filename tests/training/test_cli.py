"""The command line: --help, python -m alphapo.training, and errors as one line without a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from alphapo.training import cli, config


def test_help_lists_every_knob(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: alphapo-train")
    for f in config.fields(config.TrainConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name
    for section in config.SECTIONS.values():
        assert section + ":" in text


def test_python_dash_m_runs_the_trainer():
    out = subprocess.run([sys.executable, "-m", "alphapo.training", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage: alphapo-train" in out.stdout and "--resume" in out.stdout


def test_a_bad_knob_is_one_line_naming_it(tmp_path, capsys):
    assert cli.main(["--beta", "0", "--out-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err == "alphapo-train: error: beta (--beta) must be a finite number > 0, got 0.0\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "chosen": "b"}', "line 1: missing field(s) ['rejected']"),
    ('{"prompt": "a", "chosen": "", "rejected": "c"}', "line 1: 'chosen' is empty"),
    ('{"prompt": "a", "chosen": 1, "rejected": "c"}', "line 1: field 'chosen' must be a string"),
    ('{"prompt": null, "chosen": "b", "rejected": "c"}', "line 1: field 'prompt' is null"),
])
def test_bad_data_file_gives_a_clear_message(tmp_path, capsys, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    assert cli.main(["--train-file", str(path), "--out-dir", str(tmp_path / "run"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("alphapo-train: error: ") and str(path) in err and message in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists(), "a failed start left a run directory behind"
