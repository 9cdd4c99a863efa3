"""AlphaPOCPOTrainer against TRL's own CPOTrainer: equal loss, gradients and metrics, no logits."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("trl.experimental.cpo", reason="needs trl with trl.experimental.cpo")
datasets = pytest.importorskip("datasets")

from trl.experimental.cpo import CPOConfig, CPOTrainer  # noqa: E402

from alphapo.training.data import builtin_task  # noqa: E402
from alphapo.integrations.trl import AlphaPOCPOTrainer, loss_from_cpo_args, unpatch_forward  # noqa: E402
from conftest import peaked_tiny_llama  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


@pytest.fixture(scope="module")
def setup():
    tok, lm = peaked_tiny_llama()
    records, _ = builtin_task(8, 1, seed=2)
    return tok, lm, datasets.Dataset.from_list(records)


def make(cls, setup, tmp_path, **options):
    tok, lm, ds = setup
    args = CPOConfig(output_dir=str(tmp_path / cls.__name__), report_to="none", per_device_train_batch_size=4,
                     max_length=64, use_cpu=True, max_steps=2, logging_steps=1, save_strategy="no", **options)
    return cls(model=copy.deepcopy(lm), args=args, train_dataset=ds, processing_class=tok)


CASES = [
    pytest.param(dict(loss_type="alphapo", alpha=0.25, simpo_gamma=0.5, beta=2.0), id="alphapo"),
    pytest.param(dict(loss_type="simpo", alpha=-0.5, simpo_gamma=1.0, beta=2.5, cpo_alpha=0.3, label_smoothing=0.1),
                 id="simpo-negative-alpha-nll-smoothing"),
    pytest.param(dict(loss_type="sigmoid", alpha=0.02, beta=0.1, cpo_alpha=0.0), id="sigmoid-summed"),
    pytest.param(dict(loss_type="ipo", alpha=0.5, beta=0.5, cpo_alpha=0.0), id="ipo"),
]


@pytest.mark.parametrize("options", CASES)
def test_equal_loss_gradients_and_metrics(setup, tmp_path, options):
    ref = make(CPOTrainer, setup, tmp_path, **options)
    ours = make(AlphaPOCPOTrainer, setup, tmp_path, **options)
    batch = ref.data_collator([ref.train_dataset[i] for i in range(4)])

    def forbid(module, inputs):
        raise AssertionError("lm_head.forward ran: logits were built")

    ours.model.lm_head.register_forward_pre_hook(forbid)
    loss_ref, metrics_ref = ref.compute_loss(ref.model, batch, return_outputs=True)
    loss_ours, metrics_ours = ours.compute_loss(ours.model, batch, return_outputs=True)
    loss_ref.backward()
    loss_ours.backward()

    torch.testing.assert_close(loss_ours, loss_ref.float(), rtol=2e-6, atol=1e-7)
    grads_ref = dict(ref.model.named_parameters())
    for name, p in ours.model.named_parameters():
        g = grads_ref[name].grad
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6 * g.abs().max().item(), msg=name)
    # TRL's names and values; logits/* average over completion tokens only, and nll_loss is
    # logged even when cpo_alpha = 0 (TRL logs 0.0 then): the two documented differences.
    assert metrics_ours.keys() == metrics_ref.keys()
    for name, value in metrics_ref.items():
        if name.startswith("logits/") or (name == "nll_loss" and ref.cpo_alpha == 0):
            continue
        assert metrics_ours[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    if ref.cpo_alpha != 0:
        assert metrics_ours["nll_loss"] == pytest.approx(metrics_ref["nll_loss"], rel=1e-5)


def test_train_runs_and_eval_uses_the_fused_path(setup, tmp_path):
    ours = make(AlphaPOCPOTrainer, setup, tmp_path, loss_type="alphapo", alpha=0.25, simpo_gamma=0.5, beta=2.0)
    calls = []
    ours.model.lm_head.register_forward_pre_hook(lambda *a: calls.append(1))
    before = ours.model.lm_head.weight.detach().clone()
    result = ours.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(before, ours.model.lm_head.weight)
    metrics = ours.evaluate(eval_dataset=ours.train_dataset)
    assert "eval_rewards/accuracies" in metrics and "eval_logps/chosen" in metrics
    assert calls == []
    # Without alphapo_labels the patched model is the plain model; unpatching restores it.
    ids = torch.tensor([[1, 20, 21]])
    assert ours.model(input_ids=ids).logits.shape == (1, 3, 100) and len(calls) == 1
    unpatch_forward(ours.model)
    assert "forward" not in vars(ours.model)


def one_step(cls, setup, tmp_path, batch, accumulate, **kwargs):
    tok, lm, ds = setup
    args = CPOConfig(output_dir=str(tmp_path / f"{cls.__name__}-{batch}x{accumulate}"), report_to="none",
                     per_device_train_batch_size=batch, gradient_accumulation_steps=accumulate, max_length=64,
                     use_cpu=True, max_steps=1, logging_steps=1, save_strategy="no", bf16=False,
                     gradient_checkpointing=False, optim="sgd", learning_rate=0.5, max_grad_norm=0.0, seed=0,
                     loss_type="sigmoid", beta=0.1, cpo_alpha=1.0)
    trainer = cls(model=copy.deepcopy(lm), args=args, train_dataset=ds, processing_class=tok, **kwargs)
    trainer.train()
    return dict(trainer.model.named_parameters())


def assert_same(a, b):
    for name, p in a.items():
        torch.testing.assert_close(p, b[name], rtol=1e-5, atol=1e-7, msg=name)


def test_gradient_accumulation_is_exact_for_the_nll_term(setup, tmp_path):
    """cpo_alpha's NLL averages over the step's chosen tokens: two micro-batches of 2 pairs
    step as one batch of 4 (TRL's do not); alphapo_exact_accumulation=False is TRL's."""
    whole = one_step(AlphaPOCPOTrainer, setup, tmp_path, 4, 1)
    assert_same(one_step(AlphaPOCPOTrainer, setup, tmp_path, 2, 2), whole)
    trl_split = one_step(CPOTrainer, setup, tmp_path, 2, 2)
    with pytest.raises(AssertionError):
        assert_same(trl_split, whole)
    assert_same(one_step(AlphaPOCPOTrainer, setup, tmp_path, 2, 2, alphapo_exact_accumulation=False), trl_split)


def test_config_mapping():
    class Args:  # a raw object, as before CPOConfig.__post_init__ rewrites "alphapo"
        loss_type, alpha, beta, simpo_gamma, cpo_alpha, label_smoothing = "alphapo", 0.25, 2.5, 1.375, 0.0, 0.0

    c = loss_from_cpo_args(Args()).config
    assert (c.loss_type, c.gamma, c.average_log_prob, c.nll_weight) == ("sigmoid", 1.375, True, 0.0)
    Args.loss_type, Args.cpo_alpha = "hinge", 1.0
    c = loss_from_cpo_args(Args()).config
    assert (c.loss_type, c.gamma, c.average_log_prob, c.nll_weight) == ("hinge", 0.0, False, 1.0)
    Args.loss_type = "kto_pair"
    with pytest.raises(ValueError, match="no fused equivalent"):
        loss_from_cpo_args(Args())
