"""The slim trainer: no logits, exact resume, non-finite steps, CLI and config, the main job."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import alphapo.training.modeling as modeling
import alphapo.training.train as T
from alphapo import AlphaPOLoss
from alphapo.training import data as D
from alphapo.training.tokenizer import build_char_tokenizer

# A tiny, fast configuration: ~20k parameters, 8 pairs a step, no progress bar.
TINY = dict(train_size=256, eval_size=32, n_layer=1, n_embd=32, n_head=2, batch_size=8, eval_batch_size=16,
            max_steps=4, warmup_steps=2, eval_every=2, save_every=2, log_every=1, progress=False, plot=False)


def tiny_config(tmp_path, name="run", **overrides) -> T.TrainConfig:
    return T.TrainConfig(**{**TINY, "out_dir": str(tmp_path / name), **overrides})


def quiet(*args):
    pass


def params_of_dir(ckpt):
    from safetensors.torch import load_file

    return load_file(ckpt / "model.safetensors")


def params_of(run_dir):
    """The parameters of a run's latest checkpoint."""
    return params_of_dir(run_dir / (run_dir / "latest").read_text().strip())


def flags(values: dict) -> list[str]:
    """Command-line flags for knob values."""
    out = []
    for k, v in values.items():
        flag = "--" + k.replace("_", "-")
        out += [flag if v else "--no-" + flag[2:]] if isinstance(v, bool) else [flag, str(v)]
    return out


# ---------------------------------------------------------------------------------------
# The fused forward


def test_wrapper_matches_the_logits_path_without_calling_lm_head():
    """Loss and gradients equal a plain logits computation; lm_head's forward never runs."""
    tok = build_char_tokenizer()
    torch.manual_seed(0)
    lm = modeling.tiny_llama(len(tok), tok, n_layer=1, n_embd=32, n_head=2).double()
    with torch.no_grad():
        lm.lm_head.weight.mul_(20)  # peaked softmaxes, so the check is not at uniform logits
    records, _ = D.builtin_task(6, 1, seed=1)
    pairs, _ = D.tokenize_pairs(records, tok, max_length=32)
    batch = D.collate(pairs, tok.pad_token_id)
    cfg = dict(alpha=0.25, beta=2.5, gamma=1.375)
    wrapper = modeling.AlphaPOModel(lm, AlphaPOLoss(**cfg, backend="torch"))

    def forbid(module, args):
        raise AssertionError("lm_head.forward ran: logits were built")

    handle = lm.lm_head.register_forward_pre_hook(forbid)
    loss, aux = wrapper(**batch)
    loss.backward()
    handle.remove()
    fused_grads = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad()

    # The logits path, written out: full forward, shift, log-softmax, mean per row, AlphaPO.
    logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    s = (logp * mask).sum(-1) / mask.sum(-1)
    B = s.shape[0] // 2
    f = -torch.expm1(-cfg["alpha"] * s) / cfg["alpha"]
    ref = -torch.nn.functional.logsigmoid(cfg["beta"] * (f[:B] - f[B:]) - cfg["gamma"]).mean()
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(aux.chosen_logps.double(), s[:B].detach(), rtol=1e-6, atol=1e-6)
    for name, p in lm.named_parameters():
        torch.testing.assert_close(fused_grads[name], p.grad, rtol=1e-7, atol=1e-10, msg=name)


def test_wrapper_refuses_logit_softcapping():
    tok = build_char_tokenizer()
    lm = modeling.tiny_llama(len(tok), tok, n_layer=1, n_embd=32, n_head=2)
    lm.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        modeling.AlphaPOModel(lm, AlphaPOLoss())


# ---------------------------------------------------------------------------------------
# A run and its outputs


def test_run_writes_metrics_plot_checkpoint_and_never_builds_logits(tmp_path, monkeypatch):
    built = []

    def build_and_guard(*args, **kwargs):
        wrapper = build_model(*args, **kwargs)

        def forbid(module, inputs):
            raise AssertionError("lm_head.forward ran during training or evaluation")

        wrapper.lm.lm_head.register_forward_pre_hook(forbid)
        built.append(wrapper)
        return wrapper

    build_model = T.build_model
    monkeypatch.setattr(T, "build_model", build_and_guard)
    cfg = tiny_config(tmp_path, plot=True, keep_last=1)
    summary = T.train(cfg, log=quiet)
    run = tmp_path / "run"
    assert built, "the guard was not installed"

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    eval_records = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    assert [r["step"] for r in eval_records] == [0, 2, 4]
    trl_names = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected", "logits/chosen", "logits/rejected", "nll_loss", "loss"]
    for name in trl_names + ["tokens_per_s", "peak_mem_mb", "lr", "grad_norm"]:
        assert name in train_records[-1], name
    for name in trl_names:
        assert "eval_" + name in eval_records[-1], name
    assert train_records[-1]["tokens_per_s"] > 0 and train_records[-1]["peak_mem_mb"] > 0
    assert (run / "plot.png").stat().st_size > 10_000
    assert json.loads((run / "summary.json").read_text()) == summary
    assert summary["accuracy_before"] == eval_records[0]["eval_rewards/accuracies"]
    assert summary["chosen_logps_drift"] == pytest.approx(
        eval_records[-1]["eval_logps/chosen"] - eval_records[0]["eval_logps/chosen"])

    # keep_last=1: one checkpoint, complete, loadable with plain transformers (safetensors).
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-000004"] and (run / "latest").read_text().strip() == "checkpoints/step-000004"
    ckpt = run / "checkpoints" / "step-000004"
    assert (ckpt / "model.safetensors").is_file() and not list(ckpt.glob("*.bin"))
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert state["step"] == 4 and state["rng"]["torch"].dtype == torch.uint8
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert tok("sort 21=", add_special_tokens=False)["input_ids"] == build_char_tokenizer()("sort 21=")["input_ids"]
    torch.testing.assert_close(lm.lm_head.weight, built[0].lm.lm_head.weight.detach())


class Interrupt(Exception):
    pass


def test_resume_continues_exactly(tmp_path, monkeypatch):
    """Interrupted after step 5 (checkpoint at 4), resumed: same parameters and logs as one run."""
    full = tiny_config(tmp_path, "full", max_steps=8, save_every=2)
    T.train(full, log=quiet)

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
        T.train(tiny_config(tmp_path, "cut", max_steps=8, save_every=4), log=quiet)
    monkeypatch.setattr(modeling, "fused_forward", real)
    cut = tmp_path / "cut"
    logged = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert max(logged) == 5 and (cut / "latest").read_text().strip() == "checkpoints/step-000004"

    # Through the command line, as a user would: the run directory is enough.
    assert T.main(["--resume", str(cut), "--no-progress"]) == 0
    a, b = params_of(tmp_path / "full"), params_of(cut)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name

    def losses(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r.get("loss"), r.get("eval_loss"), r.get("logps/chosen")) for r in rows]

    # Checkpoint steps close the log window, so even the averaged records agree.
    assert losses(cut) == losses(tmp_path / "full")


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    big = T.train(tiny_config(tmp_path, "big", max_steps=1, batch_size=8, grad_accum=1), log=quiet)
    small = T.train(tiny_config(tmp_path, "small", max_steps=1, batch_size=4, grad_accum=2), log=quiet)
    a, b = params_of(tmp_path / "big"), params_of(tmp_path / "small")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    assert big["accuracy_before"] == small["accuracy_before"]


def test_gradient_checkpointing_gives_the_same_step(tmp_path, monkeypatch):
    built = []
    build_model = T.build_model
    monkeypatch.setattr(T, "build_model", lambda *a, **k: built.append(build_model(*a, **k)) or built[-1])
    T.train(tiny_config(tmp_path, "plain", max_steps=2), log=quiet)
    T.train(tiny_config(tmp_path, "ckpt", max_steps=2, gradient_checkpointing=True), log=quiet)
    on = [getattr(w.lm, "is_activation_checkpointing", None) for w in built]
    assert on == [False, True] or [w.lm.is_gradient_checkpointing for w in built] == [False, True]
    a, b = params_of(tmp_path / "plain"), params_of(tmp_path / "ckpt")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)


def test_bf16_autocast_runs_the_loss_in_bf16(tmp_path, monkeypatch):
    """--precision bf16 (the GPU default, here on the CPU): the loss sees bf16 hidden and weight."""
    seen = []
    forward = AlphaPOLoss.forward

    def spy(self, weight, hidden, *args, **kwargs):
        seen.append((weight.dtype, hidden.dtype, torch.is_autocast_enabled("cpu")))
        return forward(self, weight, hidden, *args, **kwargs)

    monkeypatch.setattr(AlphaPOLoss, "forward", spy)
    summary = T.train(tiny_config(tmp_path, max_steps=2, precision="bf16"), log=quiet)
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16, False)}
    assert 0 <= summary["accuracy_after"] <= 1 and params_of(tmp_path / "run")["lm_head.weight"].dtype == torch.float32


def test_nonfinite_steps_are_skipped_then_abort(tmp_path, monkeypatch, capsys):
    real = modeling.fused_forward
    poisoned = {"steps": set(), "n": 0}

    def nan_on_some_steps(lm, *args, **kwargs):
        loss, aux = real(lm, *args, **kwargs)
        if lm.training:
            poisoned["n"] += 1
            if poisoned["n"] in poisoned["steps"]:
                loss = loss * float("nan")
        return loss, aux

    monkeypatch.setattr(modeling, "fused_forward", nan_on_some_steps)
    poisoned["steps"] = {2}
    messages = []
    cfg = tiny_config(tmp_path, "skip", max_steps=3, save_every=1, keep_last=5, max_nonfinite=2)
    T.train(cfg, log=messages.append)
    assert any("step 2: non-finite loss" in m and "update skipped (1/2)" in m for m in messages)
    ckpts = {int(p.name[5:]): params_of_dir(p) for p in (tmp_path / "skip" / "checkpoints").iterdir()}
    assert all(torch.equal(ckpts[1][k], ckpts[2][k]) for k in ckpts[1]), "a skipped step changed the weights"
    assert not all(torch.equal(ckpts[2][k], ckpts[3][k]) for k in ckpts[2])
    rows = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_steps"] for r in rows if "lr" in r] == [0, 1, 1]  # step 2 logs no loss

    poisoned.update(steps={1, 2, 3}, n=0)
    with pytest.raises(T.NonFiniteLossError, match="2 steps had a non-finite loss"):
        T.train(tiny_config(tmp_path, "abort", max_steps=3, max_nonfinite=2), log=quiet)
    poisoned.update(n=0)
    assert T.main(["--out-dir", str(tmp_path / "abort2"), "--max-nonfinite", "1", "--no-progress",
                   *flags(TINY)]) == 1
    assert "non-finite loss or gradient" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# Command line and config files


def test_help_lists_every_knob(capsys):
    with pytest.raises(SystemExit) as info:
        T.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: alphapo-train")
    for f in T.fields(T.TrainConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name
    for section in T.SECTIONS.values():
        assert section + ":" in text


def test_python_dash_m_runs_the_trainer():
    out = subprocess.run([sys.executable, "-m", "alphapo.training", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage: alphapo-train" in out.stdout and "--resume" in out.stdout


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 0.001\nalpha: -0.5\nmax-steps: 7\ngradient_checkpointing: true\n")
    cfg = T.parse_config(["--config", str(path), "--alpha", "0.5"])
    assert (cfg.lr, cfg.alpha, cfg.max_steps, cfg.gradient_checkpointing) == (0.001, 0.5, 7, True)
    (tmp_path / "run.json").write_text(json.dumps({"beta": 1, "loss_type": "ipo"}))
    cfg = T.parse_config(["--config", str(tmp_path / "run.json")])
    assert cfg.beta == 1.0 and isinstance(cfg.beta, float) and cfg.loss_type == "ipo"
    path.write_text("learning_rate: 0.1\n")
    with pytest.raises(T.ConfigError, match="unknown knob 'learning_rate'"):
        T.parse_config(["--config", str(path)])
    path.write_text("max_steps: many\n")
    with pytest.raises(T.ConfigError, match="max_steps must be int"):
        T.parse_config(["--config", str(path)])
    path.write_text("loss_type: squared\n")
    with pytest.raises(T.ConfigError, match="loss_type must be one of"):
        T.parse_config(["--config", str(path)])
    with pytest.raises(T.ConfigError, match="batch_size must be > 0"):
        T.parse_config(["--batch-size", "0"])
    with pytest.raises(SystemExit):
        T.parse_config(["--precision", "fp8"])


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = T.TrainConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    f = T.lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.55) and f(100) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


# ---------------------------------------------------------------------------------------
# User data through the command line


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
    summary = T.train(cfg, log=quiet)
    assert summary["eval_pairs"] == 16 and summary["steps"] == 2


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "chosen": "b"}', "row 0: missing field(s) ['rejected']"),
    ('{"prompt": "a", "chosen": "", "rejected": "c"}', "row 0: 'chosen' is empty"),
    ('{"prompt": "a", "chosen": 1, "rejected": "c"}', "row 0: field 'chosen' must be a string"),
])
def test_bad_data_file_gives_a_clear_message(tmp_path, capsys, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    assert T.main(["--train-file", str(path), "--out-dir", str(tmp_path / "run"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("alphapo-train: error: ") and str(path) in err and message in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists(), "a failed start left a run directory behind"


def test_prompt_filling_max_length_is_reported_not_trained(tmp_path):
    rows = [{"prompt": "p" * 40, "chosen": "a", "rejected": "b"}] + D.builtin_task(40, 1)[0]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    messages = []
    cfg = tiny_config(tmp_path, train_file=str(path), max_length=24, max_steps=1, eval_size=4)
    T.train(cfg, log=messages.append)
    assert any(m.startswith("warning:") and "dropped 1 of" in m and "max_length=24" in m for m in messages)


# ---------------------------------------------------------------------------------------
# The main job, shortened


@pytest.mark.slow
def test_main_job_learns_the_builtin_task(tmp_path):
    """The default model, data and loss on a shorter schedule: held-out accuracy far above chance.

    (The full main job, 800 steps, reaches 98-99% on seeds 0-4; 400 steps reach ~94%.)
    """
    cfg = T.TrainConfig(out_dir=str(tmp_path / "main"), max_steps=400, train_size=8000, eval_size=256,
                        eval_every=400, save_every=0, plot=False, progress=False)
    summary = T.train(cfg, log=quiet)
    assert summary["accuracy_before"] < 0.65
    assert summary["accuracy_after"] >= 0.85, summary
