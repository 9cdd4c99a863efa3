"""Run directories, checkpoints and resume: nothing lost, and a resumed run is the uninterrupted one."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from tiny_runs import TINY, flags, params_of, quiet, tiny_config

import alphapo.training.modeling as modeling
from alphapo.training import build, cli, config, loop
from alphapo.training import checkpoint as C
from alphapo.training.config import TrainConfig
from alphapo.training.tokenizer import build_char_tokenizer


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


# ---------------------------------------------------------------------------------------
# Run directories


def checkpoints_of(run):
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def test_a_directory_holding_a_run_is_refused_until_resumed_or_overwritten(tmp_path, capsys):
    run = tmp_path / "R"
    assert cli.main(["--out-dir", str(run), *flags({**TINY, "max_steps": 6, "keep_last": 2})]) == 0
    before = checkpoints_of(run), (run / "latest").read_text(), (run / "metrics.jsonl").read_text()
    capsys.readouterr()

    # A second, shorter run into the same directory would have rotated the first one away.
    assert cli.main(["--out-dir", str(run), *flags({**TINY, "max_steps": 3})]) == 1
    err = capsys.readouterr().err
    assert err.startswith("alphapo-train: error: ") and "Traceback" not in err
    assert str(run) in err and "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert (checkpoints_of(run), (run / "latest").read_text(), (run / "metrics.jsonl").read_text()) == before
    assert cli.main(["--resume", str(run), "--no-progress"]) == 0

    # Asked for explicitly, the directory is the new run's alone.
    assert cli.main(["--out-dir", str(run), "--overwrite", *flags({**TINY, "max_steps": 3})]) == 0
    assert checkpoints_of(run) == ["step-000002", "step-000003"]
    assert (run / "latest").read_text().strip() == "checkpoints/step-000003"
    assert max(json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()) == 3
    assert cli.main(["--resume", str(run), "--max-steps", "4", "--no-progress"]) == 0


def test_a_run_without_a_checkpoint_is_not_offered_for_resuming(tmp_path, capsys):
    run = tmp_path / "R"
    assert cli.main(["--out-dir", str(run), *flags({**TINY, "max_steps": 2, "save_every": 0})]) == 0
    shutil.rmtree(run / "checkpoints")  # as if it had stopped before its first checkpoint
    (run / "latest").unlink()
    assert cli.main(["--out-dir", str(run), *flags(TINY)]) == 1
    err = capsys.readouterr().err
    assert "stopped before its first checkpoint, so there is nothing to resume" in err and "--resume" not in err, err
    assert "--overwrite" in err


def test_rotation_never_deletes_the_checkpoint_latest_names(tmp_path):
    """Resumed from an older checkpoint with --keep-last 1: the newer ones of the first pass
    must not make rotation delete the checkpoint just written."""
    run = tmp_path / "R"
    loop.train(tiny_config(tmp_path, "R", max_steps=6, keep_last=3), log=quiet)
    assert cli.main(["--resume", str(run / "checkpoints" / "step-000002"), "--keep-last", "1", "--max-steps", "4",
                     "--no-progress"]) == 0
    latest = run / (run / "latest").read_text().strip()
    assert latest.name == "step-000004" and (latest / "model.safetensors").is_file()
    assert "step-000002" not in checkpoints_of(run)


def test_a_checkpoint_past_latest_is_named_for_what_it_may_be(tmp_path, capsys):
    """A save stopped between its rename and its update of latest leaves a complete
    checkpoint past the one latest names: the resume continues from latest (the commit
    point) and says what the newer one may be, without claiming it predates the resume."""
    run = tmp_path / "R"
    loop.train(tiny_config(tmp_path, "R", max_steps=6, keep_last=3), log=quiet)
    (run / "latest").write_text("checkpoints/step-000004\n")
    assert cli.main(["--resume", str(run), "--max-steps", "6", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "step-000004" in out
    assert "step-000006" in out and "a save stopped before it could update latest" in out, out


def tree_of(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_overwrite_never_deletes_what_is_not_a_run(tmp_path, capsys, finished_run):
    """--overwrite replaces a run; another program's config.json and checkpoints/, a checkpoint
    or a run's checkpoints/ are refused, with or without it, and left as they were."""
    mine = tmp_path / "project"
    (mine / "checkpoints" / "epoch-3").mkdir(parents=True)
    (mine / "config.json").write_text('{"model": "mine"}')
    (mine / "checkpoints" / "epoch-3" / "weights.bin").write_bytes(b"precious")
    run = tmp_path / "R"
    shutil.copytree(finished_run, run)
    cases = [(mine, "holds config.json, checkpoints, but not an alphapo-train run"),
             (run / "checkpoints" / "step-000004", "is a checkpoint, not a run directory"),
             (run / "checkpoints", f"is the checkpoints directory of the run {run}")]
    before = tree_of(tmp_path)
    for out_dir, message in cases:
        for extra in ([], ["--overwrite"]):
            assert cli.main(["--out-dir", str(out_dir), *extra, *flags(TINY)]) == 1
            err = capsys.readouterr().err
            assert message in err and "Traceback" not in err, err
    assert tree_of(tmp_path) == before


def test_latest_naming_another_runs_checkpoint_is_ignored(tmp_path, capsys, finished_run):
    """Resuming R must continue R, not the run an edited ``latest`` points into."""
    run, other = tmp_path / "R", tmp_path / "other"
    shutil.copytree(finished_run, run)
    shutil.copytree(finished_run, other)
    (run / "latest").write_text(f"{other / 'checkpoints' / 'step-000004'}\n")
    before = tree_of(other)
    assert cli.main(["--resume", str(run), "--max-steps", "5", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "not a checkpoint of this run" in out and f"resumed from {run / 'checkpoints' / 'step-000004'}" in out
    assert checkpoints_of(run) == ["step-000004", "step-000005"] and tree_of(other) == before


def run_meanwhile(monkeypatch, cfg) -> list[dict]:
    """Make the next run start, and finish, a run of ``cfg`` while it loads its own model."""
    real, inner = build.build_model, []

    def build_model(*args, **kwargs):
        if not inner:  # the outer run's call; the inner run's own call goes straight through
            inner.append(None)
            inner[0] = loop.train(cfg, log=quiet)
        return real(*args, **kwargs)

    monkeypatch.setattr(build, "build_model", build_model)
    return inner


def test_runs_started_in_the_same_second_never_share_a_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt, *args: "alphapo-20250101-120000")
    inner = run_meanwhile(monkeypatch, TrainConfig(**{**TINY, "max_steps": 2}))
    outer = loop.train(TrainConfig(**{**TINY, "max_steps": 2}), log=quiet)
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["alphapo-20250101-120000", "alphapo-20250101-120000-1"]
    assert {inner[0]["run_dir"], outer["run_dir"]} == {f"runs/{name}" for name in runs}


def test_an_out_dir_taken_by_another_run_meanwhile_is_refused(tmp_path, monkeypatch):
    inner = run_meanwhile(monkeypatch, tiny_config(tmp_path, "R", max_steps=2))
    with pytest.raises(C.CheckpointError, match="already holds a run"):
        loop.train(tiny_config(tmp_path, "R", max_steps=3), log=quiet)
    assert inner[0]["steps"] == 2 and (tmp_path / "R" / "latest").read_text().strip() == "checkpoints/step-000002"


def test_a_run_directory_in_use_by_another_process_is_refused(tmp_path, capsys, finished_run):
    """Two `--resume R` at once both trained in R, interleaving metrics and checkpoints."""
    run = tmp_path / "R"
    shutil.copytree(finished_run, run)
    before = tree_of(run)
    lock = C.lock_run_dir(run)  # as a run of another process holds it (flock: per open file)
    try:
        for argv in (["--resume", str(run)], ["--resume", str(run / "checkpoints" / "step-000002")],
                     ["--out-dir", str(run), "--overwrite", *flags(TINY)]):
            assert cli.main([*argv, "--max-steps", "6", "--no-progress"]) == 1
            err = capsys.readouterr().err
            assert f"{run} is in use by another alphapo-train process (pid " in err and "Traceback" not in err, err
        assert tree_of(run) == before
    finally:
        lock.close()  # the other process ends: the directory is free again
    assert cli.main(["--resume", str(run), "--max-steps", "5", "--no-progress"]) == 0
    assert cli.main(["--resume", str(run), "--max-steps", "6", "--no-progress"]) == 0  # released at the end


# ---------------------------------------------------------------------------------------
# Damaged checkpoints


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4 (copy it before damaging it)."""
    root = tmp_path_factory.mktemp("finished")
    loop.train(tiny_config(root, "R", max_steps=4, keep_last=2), log=quiet)
    return root / "R"


def damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":  # the same size, a few bytes of the last tensor's data changed
        path.write_bytes(data[:-16] + bytes(b ^ 0xFF for b in data[-16:]))
    elif how == "delete":
        path.unlink()


DAMAGE = [
    pytest.param("model.safetensors", "truncate", id="truncated-model"),
    pytest.param("model.safetensors", "flip", id="flipped-model-bytes"),
    pytest.param("trainer_state.pt", "truncate", id="truncated-state"),
    pytest.param("trainer_state.json", "truncate", id="truncated-state-json"),
    pytest.param("trainer_state.pt", "delete", id="deleted-state"),
]


@pytest.mark.parametrize("name, how", DAMAGE)
def test_a_damaged_checkpoint_is_named_and_the_previous_intact_one_resumes(tmp_path, capsys, finished_run,
                                                                           name, how):
    run = tmp_path / "R"
    shutil.copytree(finished_run, run)
    damaged = run / "checkpoints" / "step-000004" / name
    damage(damaged, how)

    # Asked for by name, the damaged checkpoint is refused; the message names the file
    # and offers the newest intact checkpoint.
    assert cli.main(["--resume", str(damaged.parent), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert str(damaged) in err and f"--resume {run / 'checkpoints' / 'step-000002'}" in err, err
    assert "Traceback" not in err

    # The run directory resumes from that one, saying which and why, and trains steps 3
    # and 4 again: the parameters are the uninterrupted run's.
    assert cli.main(["--resume", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert str(damaged) in out and "resuming from checkpoints/step-000002" in out, out
    a, b = params_of(finished_run), params_of(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_latest_naming_a_deleted_checkpoint_resumes_from_the_one_before(tmp_path, capsys, finished_run):
    run = tmp_path / "R"
    shutil.copytree(finished_run, run)
    shutil.rmtree(run / "checkpoints" / "step-000004")
    assert cli.main(["--resume", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "latest names checkpoints/step-000004, which does not exist" in out
    assert "resuming from checkpoints/step-000002" in out
    # Nothing intact at all: an error that says what was found.
    for ckpt in (run / "checkpoints").iterdir():
        damage(ckpt / "model.safetensors", "flip")
    assert cli.main(["--resume", str(run), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "no intact checkpoint" in err and "step-000002" in err and "step-000004" in err


def test_an_interrupted_save_is_cleaned_up_on_resume(tmp_path, finished_run):
    run = tmp_path / "R"
    shutil.copytree(finished_run, run)
    leftover = run / "checkpoints" / ".tmp-step-000006-999999"  # a save killed halfway
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    assert cli.main(["--resume", str(run), "--max-steps", "5", "--no-progress"]) == 0
    assert not leftover.exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000004", "step-000005"]


def test_non_finite_weights_are_refused_by_name(tmp_path, capsys):
    tok = build_char_tokenizer()
    lm = modeling.tiny_llama(len(tok), tok, n_layer=1, n_embd=32, n_head=2)
    with torch.no_grad():
        lm.lm_head.weight[3, 5] = float("nan")
    lm.save_pretrained(tmp_path / "nan-model")
    tok.save_pretrained(tmp_path / "nan-model")
    assert cli.main(["--model", str(tmp_path / "nan-model"), "--out-dir", str(tmp_path / "run"),
                     *flags(TINY)]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "nan-model") in err and "lm_head.weight" in err and "not finite" in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------
# Resuming with other knobs: the saved config is the run's; a change is refused or recorded


def records_of(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("knob, value", [("n_embd", 64), ("train_size", 128), ("batch_size", 4), ("seed", 1)])
def test_resume_refuses_a_different_model_or_data(tmp_path, capsys, finished_run, knob, value):
    run = tmp_path / "R"
    shutil.copytree(finished_run, run)
    before = (run / "config.json").read_text()
    assert cli.main(["--resume", str(run), "--max-steps", "6", f"--{knob.replace('_', '-')}", str(value)]) == 1
    err = capsys.readouterr().err
    assert f"{knob} is {getattr(TrainConfig(**TINY), knob)} in the run" in err and str(value) in err and "Traceback" not in err
    assert (run / "config.json").read_text() == before and checkpoints_of(run) == ["step-000002", "step-000004"]


def test_resume_refuses_a_max_steps_below_the_step_it_resumes_at(tmp_path, capsys, finished_run):
    """A shorter run would be recorded (config.json, a config_change) yet never run."""
    run = tmp_path / "R"
    shutil.copytree(finished_run, run)
    before = (run / "config.json").read_text(), (run / "metrics.jsonl").read_text()
    assert cli.main(["--resume", str(run), "--max-steps", "2"]) == 1
    err = capsys.readouterr().err
    assert "max_steps (--max-steps) 2 is below step 4" in err and "Traceback" not in err, err
    assert ((run / "config.json").read_text(), (run / "metrics.jsonl").read_text()) == before


def test_resume_refuses_a_data_file_edited_since(tmp_path, capsys):
    """The same --train-file path with other content (here every preference flipped) is other data."""
    from alphapo.training.data import builtin_task

    data = tmp_path / "prefs.jsonl"
    records = builtin_task(80, 0)[0]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    run = tmp_path / "R"
    assert cli.main(["--out-dir", str(run), "--train-file", str(data), *flags({**TINY, "max_steps": 2})]) == 0
    data.write_text("".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n"
                            for r in records))
    assert cli.main(["--resume", str(run), "--max-steps", "3", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"--resume: {data} (train_file) has changed since the run trained on it" in err and "Traceback" not in err
    assert checkpoints_of(run) == ["step-000002"]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))  # restored: the run goes on
    assert cli.main(["--resume", str(run), "--max-steps", "3", "--no-progress"]) == 0


def test_resume_applies_and_records_a_new_learning_rate_and_alpha(tmp_path, capsys, finished_run):
    run = tmp_path / "R"
    shutil.copytree(finished_run, run)
    lr = 3e-2
    assert cli.main(["--resume", str(run / "checkpoints" / "step-000002"), "--lr", str(lr), "--alpha", "0",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "lr 0.003 -> 0.03 from step 2" in out and "alpha 0.25 -> 0.0 from step 2" in out, out
    rows = records_of(run)
    want = [{"step": 2, "config_change": {"lr": {"from": 0.003, "to": lr}, "alpha": {"from": 0.25, "to": 0.0}}}]
    assert [r for r in rows if "config_change" in r] == want
    # The new rate is the one the schedule follows from step 3 on (before: the saved one).
    factor = build.lr_lambda(tiny_config(tmp_path, max_steps=4))
    assert [r["lr"] for r in rows if "lr" in r and r["step"] > 2] == pytest.approx([lr * factor(s) for s in (3, 4)])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["alpha"] == 0.0 and summary["changes"] == [
        {"step": 2, "knob": "alpha", "from": 0.25, "to": 0.0}, {"step": 2, "knob": "lr", "from": 0.003, "to": lr}]
    assert json.loads((run / "config.json").read_text())["lr"] == lr
    # Resumed again from its last checkpoint, the run keeps both (from the checkpoint's own record).
    assert cli.main(["--resume", str(run), "--max-steps", "5", "--no-progress"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert [(c["step"], c["knob"]) for c in summary["changes"]] == [(2, "alpha"), (2, "lr"), (4, "max_steps")]
    assert len([r for r in records_of(run) if "config_change" in r]) == 2


def test_resume_records_a_change_of_the_numerics(tmp_path, capsys, finished_run):
    """Another backend or precision computes other numbers: applied, and said so, like --lr."""
    run = tmp_path / "R"
    shutil.copytree(finished_run, run)
    assert cli.main(["--resume", str(run), "--max-steps", "5", "--backend", "reference", "--no-progress"]) == 0
    assert "backend auto -> reference" in capsys.readouterr().out
    assert {"knob": "backend", "from": "auto", "to": "reference", "step": 4} in json.loads(
        (run / "summary.json").read_text())["changes"]


def test_resume_runs_remote_code_only_when_this_invocation_allows_it(tmp_path, finished_run, monkeypatch):
    run = tmp_path / "R"
    shutil.copytree(finished_run, run)
    saved = json.loads((run / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    saved["config"]["trust_remote_code"] = True  # as if the run had been started with --trust-remote-code
    (run / "checkpoints" / "step-000004" / "trainer_state.json").write_text(json.dumps(saved))
    C.write_checksums(run / "checkpoints" / "step-000004")
    assert config.parse_config(["--resume", str(run)]).trust_remote_code is False
    assert config.parse_config(["--resume", str(run), "--trust-remote-code"]).trust_remote_code is True
    seen = []
    real = build.load_causal_lm
    monkeypatch.setattr(build, "load_causal_lm", lambda *a: seen.append(a[3]) or real(*a))
    assert cli.main(["--resume", str(run), "--max-steps", "5", "--no-progress"]) == 0
    assert seen == [False]


@pytest.mark.parametrize("save_every, message", [
    pytest.param(2, "interrupted at step 3; continue with --resume {run} (from its checkpoint step-000002)",
                 id="after-a-checkpoint"),
    pytest.param(0, "interrupted at step 3, before the first checkpoint: nothing to resume", id="before-any"),
])
def test_ctrl_c_says_what_to_continue_from(tmp_path, capsys, monkeypatch, save_every, message):
    """Not "continue with --resume <run dir>" whatever there is (or is not) to resume."""
    real, calls = modeling.fused_forward, {"n": 0}

    def ctrl_c_on_fourth_training_step(lm, *args, **kwargs):
        calls["n"] += lm.training
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(lm, *args, **kwargs)

    monkeypatch.setattr(modeling, "fused_forward", ctrl_c_on_fourth_training_step)
    run = tmp_path / "R"
    assert cli.main(["--out-dir", str(run), *flags({**TINY, "max_steps": 6, "save_every": save_every})]) == 130
    err = capsys.readouterr().err
    assert err.startswith("alphapo-train: ") and message.format(run=run) in err and "Traceback" not in err, err
    if save_every:
        monkeypatch.setattr(modeling, "fused_forward", real)
        assert cli.main(["--resume", str(run), "--no-progress"]) == 0


def test_a_half_written_metrics_line_is_dropped_with_a_warning(tmp_path, capsys, finished_run):
    """A crash mid-append leaves a cut line in metrics.jsonl; resuming must not trip over it."""
    run = tmp_path / "R"
    shutil.copytree(finished_run, run)
    n = len((run / "metrics.jsonl").read_text().splitlines())
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')
    assert cli.main(["--resume", str(run), "--max-steps", "5", "--no-progress"]) == 0
    assert f"metrics.jsonl: line {n + 1} is not a JSON record (a write cut short?); dropped" in capsys.readouterr().out
    assert [r["step"] for r in records_of(run)][-1] == 5


def test_a_filesystem_error_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    assert cli.main(["--out-dir", str(tmp_path / "file" / "run"), *flags(TINY)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("alphapo-train: error: ") and str(tmp_path / "file") in err and "Traceback" not in err


def test_a_run_resumes_after_its_model_directory_is_gone(tmp_path):
    """The weights and tokenizer come from the checkpoint: --model's directory is not needed again."""
    tok = build_char_tokenizer()
    lm = modeling.tiny_llama(len(tok), tok, n_layer=1, n_embd=32, n_head=2)
    lm.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    assert cli.main(["--model", str(tmp_path / "model"), "--out-dir", str(tmp_path / "R"), *flags(TINY)]) == 0
    shutil.rmtree(tmp_path / "model")
    assert cli.main(["--resume", str(tmp_path / "R"), "--max-steps", "5", "--no-progress"]) == 0
