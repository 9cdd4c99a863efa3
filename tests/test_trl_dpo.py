"""AlphaPODPOTrainer against TRL's own DPOTrainer: the same logs, parameters and evaluation.

Each case trains a tiny Llama (one layer, H = 32, the built-in character tokenizer, no
download) for three SGD steps with both trainers from the same weights and data, then
evaluates: every logged value (loss, grad_norm, rewards/*, logps/*, logits/*, entropy,
mean_token_accuracy, num_tokens, and the eval_ ones) and every parameter must agree, and
neither the policy's nor the reference's lm_head may ever run.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

pytest.importorskip("trl", reason="needs trl")
datasets = pytest.importorskip("datasets")

from trl import DPOConfig, DPOTrainer  # noqa: E402

from alphapo.integrations.trl import AlphaPODPOTrainer, loss_from_dpo_args  # noqa: E402
from alphapo.training.data import builtin_task  # noqa: E402
from conftest import peaked_tiny_llama  # noqa: E402

# Values that are not results: timings, and the step bookkeeping both trainers share.
UNCOMPARED = ("runtime", "per_second", "epoch", "step", "learning_rate", "total_flos")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


@pytest.fixture(scope="module")
def setup():
    tok, lm = peaked_tiny_llama()
    ref = copy.deepcopy(lm)
    with torch.no_grad():  # a reference unlike the policy: rewards are not 0 at the first step
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    train, held_out = builtin_task(8, 4, seed=2)
    return tok, lm, ref, (train, held_out)


def dpo_args(tmp_path, **options):
    base = dict(output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=4,
                per_device_eval_batch_size=4, max_length=64, use_cpu=True, max_steps=3, logging_steps=1,
                save_strategy="no", bf16=False, gradient_checkpointing=False, optim="sgd", learning_rate=0.5,
                disable_tqdm=True, seed=0)
    base.update(options)
    return DPOConfig(**base)


def make(cls, setup, tmp_path, *, ref=True, model=None, trainer_kwargs=None, **options):
    """A trainer on fresh copies of the tiny model (and of the reference unless ``ref=False``).

    Each trainer gets its own Dataset object (a fresh fingerprint), so that TRL's cache of
    precomputed reference log-probs never hands one trainer the other's values."""
    tok, lm, ref_lm, (train, held_out) = setup
    return cls(model=copy.deepcopy(lm) if model is None else model, ref_model=copy.deepcopy(ref_lm) if ref else None,
               args=dpo_args(tmp_path / cls.__name__, **options), train_dataset=datasets.Dataset.from_list(train),
               eval_dataset=datasets.Dataset.from_list(held_out), processing_class=tok, **(trainer_kwargs or {}))


def forbid_logits(trainer):
    """Fail if any lm_head (policy or reference) runs its forward."""
    def forbid(module, inputs):
        raise AssertionError("an lm_head ran its forward: logits were built")

    for m in (trainer.model, trainer.ref_model):
        if m is not None:
            (m.get_base_model() if hasattr(m, "get_base_model") else m).lm_head.register_forward_pre_hook(forbid)


def train_and_evaluate(trainer):
    """(trainer, per-step logs, evaluation metrics, the fused loss's path in training or None)."""
    trainer.train()
    loss_fn = getattr(trainer, "alphapo_loss", None)
    path = loss_fn.last_path if loss_fn is not None else None
    evaluation = trainer.evaluate()
    return trainer, [h for h in trainer.state.log_history if "loss" in h], evaluation, path


def run_pair(setup, tmp_path, **options):
    """TRL's DPOTrainer and AlphaPODPOTrainer on the same model and data: (trl, ours, logs, evals)."""
    runs = []
    for cls in (DPOTrainer, AlphaPODPOTrainer):
        torch.manual_seed(1)  # the same LoRA initialisation, where one is made
        trainer = make(cls, setup, tmp_path, **options)
        if cls is AlphaPODPOTrainer:
            forbid_logits(trainer)
        runs.append(train_and_evaluate(trainer))
    return runs


def assert_same_values(got: dict, want: dict, rel=1e-4, abs_=1e-6):
    assert got.keys() == want.keys(), got.keys() ^ want.keys()
    for name, value in want.items():
        if any(word in name for word in UNCOMPARED):
            continue
        assert got[name] == pytest.approx(value, rel=rel, abs=abs_), name


def assert_same_parameters(ours, theirs, rtol=1e-5):
    params = dict(theirs.model.named_parameters())
    for name, p in ours.model.named_parameters():
        torch.testing.assert_close(p, params[name], rtol=rtol, atol=1e-6, msg=name)


def assert_runs_agree(runs):
    (trl, trl_logs, trl_eval, _), (ours, our_logs, our_eval, _) = runs
    assert len(our_logs) == len(trl_logs) == 3
    for got, want in zip(our_logs, trl_logs):
        assert_same_values(got, want)
    assert_same_values(our_eval, trl_eval)
    assert "eval_rewards/margins" in our_eval and "eval_mean_token_accuracy" in our_eval
    assert_same_parameters(ours, trl)


CASES = [
    pytest.param(dict(), id="sigmoid"),
    pytest.param(dict(loss_type="ipo", beta=0.5), id="ipo"),
    pytest.param(dict(loss_type=["sigmoid", "sft"], loss_weights=[0.8, 0.2]), id="mpo-sigmoid-sft"),
    pytest.param(dict(use_weighting=True), id="wpo"),
    pytest.param(dict(ld_alpha=0.5), id="ld-dpo"),
    pytest.param(dict(loss_type="hinge", f_divergence_type="js_divergence"), id="hinge-js"),
    pytest.param(dict(loss_type="aot", label_smoothing=0.1), id="aot-recompute-path"),
]


@pytest.mark.parametrize("options", CASES)
def test_matches_dpo_trainer(setup, tmp_path, options):
    runs = run_pair(setup, tmp_path, **options)
    assert_runs_agree(runs)
    coupled = options.get("loss_type") == "aot"
    assert runs[1][3] == ("recompute" if coupled else "pair-chunked")


def test_sigmoid_label_smoothing_is_ignored_as_in_trl(setup, tmp_path):
    """TRL 1.16's sigmoid ignores label_smoothing: the fused loss drops it (and says so)."""
    with pytest.warns(UserWarning, match="no effect"):
        runs = run_pair(setup, tmp_path, label_smoothing=0.2)
    assert runs[1][0].alphapo_loss.config.label_smoothing == 0.0
    assert_runs_agree(runs)


def test_precomputed_reference(setup, tmp_path):
    """precompute_ref_log_probs with no ref_model: the reference pass runs through the fused
    head inside DPOTrainer.__init__ (compute_ref_log_probs), then training reads the columns."""
    calls = []
    real = AlphaPODPOTrainer.compute_ref_log_probs

    def spy(self, model, inputs):
        calls.append(1)
        return real(self, model, inputs)

    AlphaPODPOTrainer.compute_ref_log_probs = spy
    try:
        runs = run_pair(setup, tmp_path, ref=False, precompute_ref_log_probs=True, ld_alpha=0.7)
    finally:
        AlphaPODPOTrainer.compute_ref_log_probs = real
    assert calls and runs[1][0].ref_model is None
    assert_runs_agree(runs)


def test_reference_loaded_by_trl(setup, tmp_path):
    """ref_model=None without PEFT: TRL loads the reference from the policy's path itself,
    after the constructor's first patch; it gets the fused forward too."""
    lm = setup[1]
    lm.save_pretrained(tmp_path / "policy")
    runs = []
    for cls in (DPOTrainer, AlphaPODPOTrainer):
        model = type(lm).from_pretrained(tmp_path / "policy")
        trainer = make(cls, setup, tmp_path, ref=False, model=model)
        assert trainer.ref_model is not None
        if cls is AlphaPODPOTrainer:
            forbid_logits(trainer)
        runs.append(train_and_evaluate(trainer))
    assert_runs_agree(runs)


def test_defaults_of_trl_bf16_autocast_and_checkpointing(setup, tmp_path):
    """TRL's own defaults on a CPU: bf16 autocast, gradient checkpointing, AdamW. bf16
    rounding (in each trainer's own GEMMs) keeps the agreement to ~1e-2."""
    runs = run_pair(setup, tmp_path, bf16=None, gradient_checkpointing=True, optim="adamw_torch", learning_rate=1e-3)
    (_, trl_logs, _, _), (ours, our_logs, _, _) = runs
    assert ours.args.bf16 and ours.args.gradient_checkpointing
    for got, want in zip(our_logs, trl_logs):
        assert got["loss"] == pytest.approx(want["loss"], rel=2e-2)
        assert got["logps/chosen"] == pytest.approx(want["logps/chosen"], rel=2e-2)


# ---------------------------------------------------------------------------------------
# PEFT: the reference is the adapter-disabled policy (or TRL's frozen copy of an adapter)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("pretrained_adapter", [False, True], ids=["peft_config", "peft-model"])
def test_lora(setup, tmp_path, pretrained_adapter):
    """LoRA: same logs and adapter weights as TRL; the frozen head gets no gradient and the
    loss runs the pair-chunked path (4·N·H·V: no grad_W GEMM)."""
    peft = pytest.importorskip("peft")
    tok, lm, _, _ = setup
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
    runs = []
    for cls in (DPOTrainer, AlphaPODPOTrainer):
        torch.manual_seed(1)
        model, kwargs = copy.deepcopy(lm), dict(peft_config=config)
        if pretrained_adapter:  # TRL copies it into a frozen "ref" adapter: the reference
            model, kwargs = peft.get_peft_model(model, config), {}
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0.0, 0.05)
        trainer = make(cls, setup, tmp_path, ref=False, model=model, trainer_kwargs=kwargs)
        if cls is AlphaPODPOTrainer:
            forbid_logits(trainer)
        runs.append(train_and_evaluate(trainer))
    assert_runs_agree(runs)
    ours, path = runs[1][0], runs[1][3]
    head = ours.model.get_base_model().lm_head
    assert not head.weight.requires_grad and head.weight.grad is None
    assert path == "pair-chunked"


# ---------------------------------------------------------------------------------------
# Gradient accumulation: the "sft" term over the step's tokens
# ---------------------------------------------------------------------------------------


def one_step(cls, setup, tmp_path, batch, accumulate, **kwargs):
    trainer = make(cls, setup, tmp_path / f"{batch}x{accumulate}", max_steps=1, per_device_train_batch_size=batch,
                   gradient_accumulation_steps=accumulate, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0],
                   max_grad_norm=0.0, trainer_kwargs=kwargs)
    trainer.train()
    return trainer


def test_gradient_accumulation_is_exact_for_sft(setup, tmp_path):
    """Two micro-batches of 2 pairs make the same step as one batch of 4 (TRL's do not: its
    sft term is a mean per micro-batch); alphapo_exact_accumulation=False is TRL's."""
    whole = one_step(AlphaPODPOTrainer, setup, tmp_path / "a", 4, 1)
    split = one_step(AlphaPODPOTrainer, setup, tmp_path / "b", 2, 2)
    assert_same_parameters(split, whole)
    assert split.state.log_history[0]["loss"] == pytest.approx(whole.state.log_history[0]["loss"], rel=1e-6)

    trl_whole = one_step(DPOTrainer, setup, tmp_path / "c", 4, 1)
    trl_split = one_step(DPOTrainer, setup, tmp_path / "d", 2, 2)
    assert_same_parameters(whole, trl_whole)
    with pytest.raises(AssertionError):  # TRL's accumulated step is not the whole batch's
        assert_same_parameters(trl_split, trl_whole)
    as_trl = one_step(AlphaPODPOTrainer, setup, tmp_path / "e", 2, 2, alphapo_exact_accumulation=False)
    assert_same_parameters(as_trl, trl_split)


# ---------------------------------------------------------------------------------------
# Beyond TRL, and what is refused
# ---------------------------------------------------------------------------------------


def test_alpha_shapes_the_rewards(setup, tmp_path):
    ours = make(AlphaPODPOTrainer, setup, tmp_path, max_steps=2, trainer_kwargs=dict(alphapo_alpha=0.5))
    ours.train()
    logs = [h for h in ours.state.log_history if "loss" in h]
    assert ours.alphapo_loss.config.alpha == 0.5
    assert all(math.isfinite(h["loss"]) and {"rewards/tangent_fraction", "rewards/saturated_fraction"} <= set(h) for h in logs)


def test_refuses_smoothing_it_cannot_split(setup, tmp_path):
    with pytest.raises(ValueError, match="not to sigmoid"):
        make(AlphaPODPOTrainer, setup, tmp_path, loss_type=["sigmoid", "robust"], label_smoothing=0.1)


def test_refuses_what_the_fused_head_cannot_reproduce(setup, tmp_path):
    tok, lm, _, _ = setup
    capped = copy.deepcopy(lm)
    capped.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        make(AlphaPODPOTrainer, setup, tmp_path, model=capped)
    moe = copy.deepcopy(lm)
    moe.config.output_router_logits = False  # an MoE config; a router loss coefficient enables its aux loss
    with pytest.raises(NotImplementedError, match="Mixture-of-Experts"):
        make(AlphaPODPOTrainer, setup, tmp_path, model=moe, router_aux_loss_coef=0.01)
    peft = pytest.importorskip("peft")
    prefix = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    with pytest.raises(NotImplementedError, match="prompt-learning"):
        make(AlphaPODPOTrainer, setup, tmp_path, ref=False, trainer_kwargs=dict(peft_config=prefix))
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(NotImplementedError, match="pixel_values"):
        AlphaPODPOTrainer._alphapo_text(dict(input_ids=ids, attention_mask=ids, completion_mask=ids,
                                             pixel_values=torch.zeros(2, 3)))


def test_empty_prompt_warns_for_length_normalised_losses(setup, tmp_path):
    tok, lm, ref, (train, _) = setup
    ours = AlphaPODPOTrainer(model=copy.deepcopy(lm), ref_model=copy.deepcopy(ref),
                             args=dpo_args(tmp_path, loss_type="ipo", max_steps=1),
                             train_dataset=datasets.Dataset.from_list([dict(r, prompt="") for r in train]),
                             processing_class=tok)
    with pytest.warns(UserWarning, match="empty prompt"):
        ours.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ours._alphapo_check_prompts({"completion_mask": torch.ones(2, 3, dtype=torch.long)})  # once only


def test_config_mapping():
    class Args:  # DPOConfig's fields, as __post_init__ leaves them
        beta, loss_type, loss_weights, label_smoothing = 0.3, ["ipo", "bco_pair"], [1.0, 0.5], 0.0
        f_divergence_type, f_alpha_divergence_coef, discopop_tau = "reverse_kl", 0.5, 0.05
        use_weighting, ld_alpha = True, 0.4

    c = loss_from_dpo_args(Args(), alpha=0.25).config
    assert (c.alpha, c.beta, c.gamma, c.average_log_prob, c.nll_weight) == (0.25, 0.3, 0.0, False, 0.0)
    assert (c.loss_type, c.loss_weights, c.use_weighting, c.ld_alpha) == (("ipo", "bco_pair"), (1.0, 0.5), True, 0.4)
    Args.loss_type, Args.label_smoothing, Args.use_weighting = ["robust", "aot"], 0.2, False
    assert loss_from_dpo_args(Args()).config.label_smoothing == 0.2
