"""The training loop: a run's outputs, no logits, gradient accumulation, autocast, non-finite steps, the main job."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_runs import TINY, flags, params_of, params_of_dir, quiet, tiny_config

import alphapo.training.modeling as modeling
from alphapo import AlphaPOLoss
from alphapo.training import build, cli, loop
from alphapo.training.config import TrainConfig
from alphapo.training.tokenizer import build_char_tokenizer


def test_run_writes_metrics_plot_checkpoint_and_never_builds_logits(tmp_path, monkeypatch):
    built = []

    def build_and_guard(*args, **kwargs):
        wrapper = build_model(*args, **kwargs)

        def forbid(module, inputs):
            raise AssertionError("lm_head.forward ran during training or evaluation")

        wrapper.lm.lm_head.register_forward_pre_hook(forbid)
        built.append(wrapper)
        return wrapper

    build_model = build.build_model
    monkeypatch.setattr(build, "build_model", build_and_guard)
    cfg = tiny_config(tmp_path, plot=True, keep_last=1)
    summary = loop.train(cfg, log=quiet)
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


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    big = loop.train(tiny_config(tmp_path, "big", max_steps=1, batch_size=8, grad_accum=1), log=quiet)
    small = loop.train(tiny_config(tmp_path, "small", max_steps=1, batch_size=4, grad_accum=2), log=quiet)
    a, b = params_of(tmp_path / "big"), params_of(tmp_path / "small")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    assert big["accuracy_before"] == small["accuracy_before"]


def step_gradients(tmp_path, name, **knobs) -> dict[str, torch.Tensor]:
    """The gradients of one training step (float64, unclipped), before the optimizer sees them."""
    threads = torch.get_num_threads()
    try:
        run = loop.start(tiny_config(tmp_path, name, grad_clip=0.0, **knobs), quiet)
        run.wrapper.double()
        loop.train_step(run)
    finally:
        torch.set_num_threads(threads)
    return {n: p.grad.clone() for n, p in run.wrapper.named_parameters()}


@pytest.mark.parametrize("nll_weight", [0.0, 0.5])
def test_gradient_accumulation_gives_the_whole_batch_gradient(tmp_path, nll_weight):
    """4 micro-batches of 2 pairs = 1 batch of 8, NLL term included: it is normalised by the
    step's chosen tokens (nll_num_tokens), not by each micro-batch's own."""
    whole = step_gradients(tmp_path, "whole", batch_size=8, grad_accum=1, nll_weight=nll_weight)
    parts = step_gradients(tmp_path, "parts", batch_size=2, grad_accum=4, nll_weight=nll_weight)
    for name in whole:
        torch.testing.assert_close(parts[name], whole[name], rtol=1e-9, atol=1e-12, msg=name)


def test_gradient_checkpointing_gives_the_same_step(tmp_path, monkeypatch):
    built = []
    build_model = build.build_model
    monkeypatch.setattr(build, "build_model", lambda *a, **k: built.append(build_model(*a, **k)) or built[-1])
    loop.train(tiny_config(tmp_path, "plain", max_steps=2), log=quiet)
    loop.train(tiny_config(tmp_path, "ckpt", max_steps=2, gradient_checkpointing=True), log=quiet)
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
    summary = loop.train(tiny_config(tmp_path, max_steps=2, precision="bf16"), log=quiet)
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
    loop.train(cfg, log=messages.append)
    assert any("step 2: non-finite loss" in m and "update skipped (1/2)" in m for m in messages)
    ckpts = {int(p.name[5:]): params_of_dir(p) for p in (tmp_path / "skip" / "checkpoints").iterdir()}
    assert all(torch.equal(ckpts[1][k], ckpts[2][k]) for k in ckpts[1]), "a skipped step changed the weights"
    assert not all(torch.equal(ckpts[2][k], ckpts[3][k]) for k in ckpts[2])
    rows = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_steps"] for r in rows if "lr" in r] == [0, 1, 1]  # step 2 logs no loss

    poisoned.update(steps={1, 2, 3}, n=0)
    with pytest.raises(loop.NonFiniteLossError, match="2 steps had a non-finite loss") as info:
        loop.train(tiny_config(tmp_path, "abort", max_steps=3, max_nonfinite=2), log=quiet)
    assert "no checkpoint was written" in str(info.value)
    poisoned.update(n=0)
    assert cli.main(["--out-dir", str(tmp_path / "abort2"), "--max-nonfinite", "1", "--no-progress",
                   *flags(TINY)]) == 1
    assert "non-finite loss or gradient" in capsys.readouterr().err
    # With a checkpoint before the failures, the advice is to resume it with a lower rate
    # (which a resume applies and records).
    poisoned.update(steps={3, 4}, n=0)
    with pytest.raises(loop.NonFiniteLossError) as info:
        loop.train(tiny_config(tmp_path, "late", max_steps=4, max_nonfinite=2), log=quiet)
    assert f"--resume {tmp_path / 'late'} --lr 0.0003" in str(info.value) and "step-000002" in str(info.value)


# ---------------------------------------------------------------------------------------
# The main job, shortened


@pytest.mark.slow
def test_main_job_learns_the_builtin_task(tmp_path):
    """The default model, data and loss on a shorter schedule: held-out accuracy far above chance.

    (The full main job, 800 steps, reaches 98-99% on seeds 0-4; 400 steps reach ~94%.)
    """
    cfg = TrainConfig(out_dir=str(tmp_path / "main"), max_steps=400, train_size=8000, eval_size=256,
                        eval_every=400, save_every=0, plot=False, progress=False)
    summary = loop.train(cfg, log=quiet)
    assert summary["accuracy_before"] < 0.65
