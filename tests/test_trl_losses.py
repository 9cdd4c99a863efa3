"""Every DPO loss type against TRL's own code: ``DPOTrainer._compute_loss`` on a stub trainer.

TRL 1.16 has no standalone loss function: the loss, the reference log-probs and the logged
metrics all live in ``DPOTrainer._compute_loss``, which runs the model itself. Here it runs
unbound on a stub ``self`` whose model returns per-token fields made from the materialised
logits of a small random batch (what TRL's fused LM head returns: log-probs, entropy, mean
logit, top-1 hit, log Σ p²), and whose reference model does the same for a second head. The
same hidden states and weights go through :func:`alphapo.alphapo_loss` at α = 0 (γ = 0,
summed log-probs); loss, gradients and TRL's logged metrics must agree. Nothing of TRL's
formulas is re-derived here: TRL's own method computes the expected values.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl", reason="needs trl (DPOTrainer)")

from trl import DPOTrainer  # noqa: E402
from trl.trainer.utils import FusedCausalLMOutput  # noqa: E402

from alphapo import alphapo_loss  # noqa: E402
from alphapo.pair_losses import LOSS_TYPES  # noqa: E402

from conftest import rel_err  # noqa: E402

# The loss types TRL 1.16's DPOTrainer reads label_smoothing for (its sigmoid does not).
TRL_SMOOTHED = ("exo_pair", "robust", "aot", "aot_unpaired")
F_DIV_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


# ---------------------------------------------------------------------------------------
# The batch: hidden states and heads for the policy and the reference, and TRL's view of them
# ---------------------------------------------------------------------------------------


def make_case(B=3, T=10, H=16, V=37, dtype=torch.float64, bias=False, seed=0, empty_prompt=False):
    """Policy and reference (hidden, weight, bias), TRL's ``inputs`` and our shifted target.

    Rows follow TRL's collator: chosen rows first, a prompt of 1–3 tokens (0 with
    ``empty_prompt`` for pair 0), a completion of >= 1 token, right padding. Hidden states
    have T - 1 positions: position t predicts token t + 1, as TRL's fused head scores them.
    The reference is the policy slightly perturbed, so log-ratios are O(1).
    """
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    completion = torch.zeros(2 * B, T, dtype=torch.long)
    for j in range(B):
        prompt = 0 if (empty_prompt and j == 0) else int(torch.randint(1, 4, (1,), generator=g))
        for row in (j, B + j):
            length = int(torch.randint(1 + (prompt == 0), T - prompt + 1, (1,), generator=g))
            completion[row, prompt:prompt + length] = 1
    ends = completion * torch.arange(1, T + 1)
    attention = (torch.arange(T) < ends.max(1).values[:, None]).long()
    input_ids = torch.randint(0, V, (2 * B, T), generator=g)
    weight = torch.randn(V, H, generator=g, dtype=f64) / H**0.5 * 2.0
    hidden = torch.randn(2 * B, T - 1, H, generator=g, dtype=f64)
    b = torch.randn(V, generator=g, dtype=f64) * 0.5 if bias else None
    ref_weight = weight + 0.1 * torch.randn(V, H, generator=g, dtype=f64) / H**0.5
    ref_hidden = hidden + 0.2 * torch.randn(2 * B, T - 1, H, generator=g, dtype=f64)
    ref_bias = None if b is None else b + 0.05 * torch.randn(V, generator=g, dtype=f64)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    inputs = dict(input_ids=input_ids, attention_mask=attention, completion_mask=completion)
    target = input_ids[:, 1:].masked_fill(completion[:, 1:] == 0, -100)
    return SimpleNamespace(
        policy=(cast(weight), cast(hidden), cast(b)), ref=(cast(ref_weight), cast(ref_hidden), cast(ref_bias)),
        inputs=inputs, target=target,
    )


def head_fields(weight, hidden, bias, target):
    """What TRL's fused LM head returns, from materialised logits: (2B, T-1) fields, 0 off-mask."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    mask = target != -100
    logp = torch.log_softmax(logits, dim=-1)
    safe = target.clamp(min=0).unsqueeze(-1)
    zero = torch.zeros((), dtype=logits.dtype)
    with torch.no_grad():
        p = logp.exp()
        entropy = torch.where(mask, -(p * logp).sum(-1), zero)
        mean_logits = torch.where(mask, logits.mean(-1), zero)
        is_top1 = (logits.argmax(-1) == target) & mask
        log_sum_sq = torch.where(mask, torch.logsumexp(2 * logp, dim=-1), zero)
    return dict(log_probs=torch.where(mask, logp.gather(-1, safe).squeeze(-1), zero), entropy=entropy,
                mean_logits=mean_logits, is_top1=is_top1, log_sum_sq_probs=log_sum_sq)


class StubLM:
    """Stands in for ``model(..., labels=..., fused_lm_head=True)``: returns fixed fields."""

    def __init__(self, fields):
        self.fields = fields

    def __call__(self, **kwargs):
        assert kwargs["fused_lm_head"] is True
        return FusedCausalLMOutput(**self.fields)


def stub_trainer(ref_fields, *, loss_type, beta=0.1, loss_weights=None, label_smoothing=0.0,
                 f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, use_weighting=False, ld_alpha=None,
                 discopop_tau=0.05):
    """The attributes ``DPOTrainer._compute_loss`` reads, set as ``DPOTrainer.__init__`` sets them."""
    types = loss_type if isinstance(loss_type, list) else [loss_type]
    policy = torch.nn.Module()  # is_peft_model() and disable_gradient_checkpointing() inspect it
    policy.is_gradient_checkpointing = False
    identity = lambda t: t  # noqa: E731 (one process: gathers are identities)
    return SimpleNamespace(
        model=policy, ref_model=StubLM(ref_fields), precompute_ref_logps=False,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=identity, gather_for_metrics=identity),
        args=SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None),
        beta=beta, loss_types=types, loss_weights=loss_weights or [1.0] * len(types),
        label_smoothing=label_smoothing, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, use_weighting=use_weighting, ld_alpha=ld_alpha,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1,
    )


def leaves(case):
    """Fresh differentiable copies of the policy's (weight, hidden, bias)."""
    return tuple(None if t is None else t.detach().clone().requires_grad_(True) for t in case.policy)


def run_trl(case, **cfg):
    """TRL's loss, its gradients w.r.t. the policy's (weight, hidden, bias), and its metrics."""
    weight, hidden, bias = leaves(case)
    with torch.no_grad():
        ref_fields = head_fields(*case.ref, case.target)
    stub = stub_trainer(ref_fields, **cfg)
    loss = DPOTrainer._compute_loss(stub, StubLM(head_fields(weight, hidden, bias, case.target)), case.inputs, False)
    loss.backward()
    grads = (weight.grad, hidden.grad, None if bias is None else bias.grad)
    return loss.detach(), grads, {k: v[0] for k, v in stub._metrics["train"].items()}


def run_ours(case, *, backend="torch", path="auto", alpha=0.0, **cfg):
    """alphapo's loss on the same hidden states, with the reference's hidden states and head."""
    weight, hidden, bias = leaves(case)
    ref_weight, ref_hidden, ref_bias = case.ref
    loss, aux = alphapo_loss(weight, hidden, case.target, bias, ref_hidden=ref_hidden, ref_weight=ref_weight,
                             ref_bias=ref_bias, alpha=alpha, gamma=0.0, average_log_prob=False, backend=backend,
                             path=path, **cfg)
    loss.backward()
    grads = (weight.grad, hidden.grad, None if bias is None else bias.grad)
    return loss.detach(), grads, {k: v.item() for k, v in aux.to_dict().items()}


def ours_cfg(cfg):
    """TRL's config in alphapo's terms: label smoothing only where TRL reads it (see TRL_SMOOTHED)."""
    cfg = dict(cfg)
    cfg.setdefault("beta", 0.1)  # TRL's default; alphapo's is SimPO's 2.5
    types = cfg["loss_type"] if isinstance(cfg["loss_type"], list) else [cfg["loss_type"]]
    if not any(t in TRL_SMOOTHED for t in types):
        cfg["label_smoothing"] = 0.0
    return cfg


def assert_matches_trl(case, cfg, *, backend="torch", path="auto", tol=1e-6, metrics=True):
    loss_t, grads_t, metrics_t = run_trl(case, **cfg)
    loss_o, grads_o, metrics_o = run_ours(case, backend=backend, path=path, **ours_cfg(cfg))
    assert rel_err(loss_o, loss_t) < tol, (cfg, loss_o.item(), loss_t.item())
    for name, got, want in zip(("weight", "hidden", "bias"), grads_o, grads_t):
        if want is not None:
            assert rel_err(got, want) < tol, (cfg, name, rel_err(got, want))
    if metrics:
        for name, want in metrics_t.items():
            if name == "num_tokens":  # the attention mask's sum: no loss involved
                continue
            assert metrics_o[name] == pytest.approx(want, rel=tol, abs=tol), (cfg, name)


# ---------------------------------------------------------------------------------------
# The cases: every loss type, f-divergences, MPO lists, WPO and LD-DPO
# ---------------------------------------------------------------------------------------


def smoothing_for(loss_type):
    return {"exo_pair": 1e-2, "robust": 0.1, "aot": 0.1, "aot_unpaired": 0.1}.get(loss_type, 0.0)


CASES = [pytest.param(dict(loss_type=t, label_smoothing=smoothing_for(t)), id=t) for t in LOSS_TYPES]
CASES += [pytest.param(dict(loss_type=t, beta=0.5, label_smoothing=smoothing_for(t)), id=f"{t}-beta0.5")
          for t in ("sigmoid", "ipo", "apo_zero", "discopop", "sppo_hard")]
CASES += [
    pytest.param(dict(loss_type=t, f_divergence_type=f, f_alpha_divergence_coef=0.3,
                      label_smoothing=smoothing_for(t)), id=f"{t}-{f}")
    for f in ("forward_kl", "js_divergence", "alpha_divergence") for t in F_DIV_TYPES
]
CASES += [
    pytest.param(dict(loss_type=["sigmoid", "sft"], loss_weights=[0.8, 0.2]), id="mpo-sigmoid-sft"),
    pytest.param(dict(loss_type=["ipo", "bco_pair"]), id="mpo-ipo-bco"),
    pytest.param(dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]), id="mpo-three"),
    pytest.param(dict(loss_type=["robust", "aot"], loss_weights=[0.5, 1.5], label_smoothing=0.2), id="mpo-smoothed"),
]
CASES += [pytest.param(dict(loss_type=t, use_weighting=True, label_smoothing=smoothing_for(t)), id=f"{t}-wpo")
          for t in ("sigmoid", "ipo", "bco_pair", "exo_pair", "sigmoid_norm")]
CASES += [pytest.param(dict(loss_type=t, ld_alpha=0.3, label_smoothing=smoothing_for(t)), id=f"{t}-ld")
          for t in ("sigmoid", "ipo", "aot", "sigmoid_norm")]
CASES += [pytest.param(dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], ld_alpha=0.5), id="mpo-sft-ld")]

# Both alphapo backends, and both paths of the fused one (the batch-coupled aot losses have
# only the recompute path: "auto" picks it for them).
BACKENDS = [
    pytest.param("reference", "auto", id="reference"),
    pytest.param("torch", "pair-chunked", id="torch-pairchunked"),
    pytest.param("torch", "recompute", id="torch-recompute"),
]


def coupled(cfg):
    types = cfg["loss_type"] if isinstance(cfg["loss_type"], list) else [cfg["loss_type"]]
    return any(LOSS_TYPES[t].coupled for t in types)


@pytest.fixture(scope="module")
def case64():
    return make_case(B=3, T=10, H=16, V=37, seed=0)


@pytest.fixture(scope="module")
def case32():
    return make_case(B=3, T=10, H=16, V=37, seed=0, dtype=torch.float32)


@pytest.mark.parametrize("backend,path", BACKENDS)
@pytest.mark.parametrize("cfg", CASES)
def test_matches_trl_dpo(case64, case32, cfg, backend, path):
    if path == "pair-chunked" and coupled(cfg):
        path = "auto"
    if cfg.get("f_divergence_type") == "alpha_divergence":
        # TRL's alpha_divergence knows float16/bfloat16/float32 only (a KeyError on float64).
        assert_matches_trl(case32, cfg, backend=backend, path=path, tol=1e-5)
    else:
        assert_matches_trl(case64, cfg, backend=backend, path=path)


@pytest.mark.parametrize("cfg", [
    pytest.param(dict(loss_type="sigmoid"), id="sigmoid"),
    pytest.param(dict(loss_type="ipo", use_weighting=True), id="ipo-wpo"),
    pytest.param(dict(loss_type=["sigmoid", "sft"], loss_weights=[0.8, 0.2], ld_alpha=0.3), id="mpo-ld"),
    pytest.param(dict(loss_type="aot_unpaired", label_smoothing=0.1), id="aot_unpaired"),
])
@pytest.mark.parametrize("seed", [1, 2])
def test_matches_trl_with_bias_and_float32(cfg, seed):
    """Another shape, a biased head, and float32 inputs (TRL's fields in float32 too)."""
    assert_matches_trl(make_case(B=2, T=13, H=8, V=50, bias=True, seed=seed), cfg, path="auto")
    case32 = make_case(B=4, T=11, H=24, V=29, dtype=torch.float32, seed=seed)
    assert_matches_trl(case32, cfg, path="auto", tol=1e-5)


def test_use_weighting_with_sft_leaves_sft_unweighted(case64):
    """TRL 1.16 raises on use_weighting with "sft" (an in-place product on an expanded
    tensor); alphapo weights the pair losses and leaves the NLL term unweighted: the sum of
    TRL's weighted sigmoid and its plain sft."""
    with pytest.raises(RuntimeError):
        run_trl(case64, loss_type=["sigmoid", "sft"], use_weighting=True)
    sig_loss, sig_grads, _ = run_trl(case64, loss_type="sigmoid", use_weighting=True)
    sft_loss, sft_grads, _ = run_trl(case64, loss_type="sft")
    loss, grads, _ = run_ours(case64, beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5],
                              use_weighting=True)
    assert rel_err(loss, sig_loss + 0.5 * sft_loss) < 1e-10
    for got, a, b in zip(grads[:2], sig_grads[:2], sft_grads[:2]):
        assert rel_err(got, a + 0.5 * b) < 1e-9


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm"])
def test_empty_prompt_length_is_the_scored_count(loss_type):
    """With an empty prompt TRL divides IPO/sigmoid_norm by the unshifted completion count,
    which counts the first token although nothing scores it; alphapo divides by the scored
    tokens: TRL's value once the unscored first token leaves its mask."""
    case = make_case(B=3, T=10, seed=4, empty_prompt=True)
    assert case.inputs["completion_mask"][:, 0].any()
    loss_ours = run_ours(case, beta=0.1, loss_type=loss_type)[0]
    assert rel_err(loss_ours, run_trl(case, loss_type=loss_type)[0]) > 1e-4  # the documented difference
    scored = dict(case.inputs, completion_mask=case.inputs["completion_mask"].clone())
    scored["completion_mask"][:, 0] = 0
    assert rel_err(loss_ours, run_trl(SimpleNamespace(**dict(vars(case), inputs=scored)), loss_type=loss_type)[0]) < 1e-10


def test_precomputed_reference_matches_reference_model(case64):
    """ref_chosen/rejected_logps given (TRL's precompute_ref_log_probs) equal the reference
    model's hidden states and head, LD-weighted alike."""
    weight, hidden, _ = case64.policy
    ref_weight, ref_hidden, _ = case64.ref
    with torch.no_grad():
        ref_seq = alphapo_loss(ref_weight, ref_hidden, case64.target, alpha=0.0, gamma=0.0, average_log_prob=False,
                               ld_alpha=0.4, backend="torch")[1]
        common = dict(alpha=0.0, gamma=0.0, average_log_prob=False, ld_alpha=0.4, backend="torch")
        via_model = alphapo_loss(weight, hidden, case64.target, ref_hidden=ref_hidden, ref_weight=ref_weight, **common)
        via_logps = alphapo_loss(weight, hidden, case64.target, None, ref_seq.chosen_logps.double(),
                                 ref_seq.rejected_logps.double(), **common)
    assert rel_err(via_logps[0], via_model[0]) < 1e-6


# ---------------------------------------------------------------------------------------
# Away from TRL: alpha != 0
# ---------------------------------------------------------------------------------------


def alpha_cfg(t):
    return dict(loss_type=t, label_smoothing=smoothing_for(t))


@pytest.mark.parametrize("alpha", [0.5, -1.0])
@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_alpha_reward_is_finite(case64, loss_type, alpha):
    loss, grads, metrics = run_ours(case64, alpha=alpha, **ours_cfg(alpha_cfg(loss_type)))
    assert math.isfinite(loss.item())
    assert all(torch.isfinite(g).all() for g in grads if g is not None)
    assert all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "aot", "bco_pair", "discopop", "sigmoid_norm"])
def test_alpha_to_zero_is_continuous(case64, loss_type):
    loss0, grads0, _ = run_ours(case64, alpha=0.0, **ours_cfg(alpha_cfg(loss_type)))
    loss_eps, grads_eps, _ = run_ours(case64, alpha=1e-6, **ours_cfg(alpha_cfg(loss_type)))
    assert rel_err(loss_eps, loss0) < 1e-5
    assert rel_err(grads_eps[1], grads0[1]) < 1e-4


@pytest.mark.parametrize("coef", [0.3, 1.5])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "exo_pair", "robust", "discopop", "sigmoid_norm"])
def test_alpha_divergence_is_the_alpha_reward(case32, loss_type, coef):
    """TRL's f_divergence_type="alpha_divergence" with coefficient a (α = 0) is alphapo's
    reverse-KL loss with alpha = 1 - a: loss and gradients (the rewards differ: TRL logs
    β·log-ratio, alphapo β·f_α(log-ratio)). float32: TRL's alpha_divergence has no float64."""
    cfg = dict(loss_type=loss_type, label_smoothing=smoothing_for(loss_type))
    loss_t, grads_t, _ = run_trl(case32, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=coef, **cfg)
    loss_o, grads_o, _ = run_ours(case32, alpha=1.0 - coef, **ours_cfg(cfg))
    assert rel_err(loss_o, loss_t) < 1e-5
    assert rel_err(grads_o[1], grads_t[1]) < 1e-5 and rel_err(grads_o[0], grads_t[0]) < 1e-5


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "robust"])
def test_alpha_divergence_large_log_ratios_match_trl(loss_type):
    """A chosen log-ratio near -117 (a policy far from its reference): TRL's exponent (a - 1)·r
    passes 30, where the α reward leaves its curve for the tangent, but not TRL's clamp at
    80: the score must still be TRL's curve."""
    case = make_case(B=3, T=10, H=16, V=37, dtype=torch.float32, seed=2)
    weight, hidden, bias = case.policy
    case.policy = (6.0 * weight, hidden, bias)
    case.ref = (-6.0 * weight, hidden, bias)  # every token's log-ratio is tens of nats
    cfg = dict(loss_type=loss_type, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5,
               label_smoothing=smoothing_for(loss_type))
    logps = head_fields(*case.policy, case.target)["log_probs"].sum(1)
    ref_logps = head_fields(*case.ref, case.target)["log_probs"].sum(1)
    exponent = -0.5 * (logps - ref_logps)
    chosen = exponent[:3]
    assert ((chosen > 30) & (chosen < 80)).any()
    # e^t turns float32 rounding of the log-ratio (~1e-6 of 117) into ~1e-5 of the score.
    assert_matches_trl(case, cfg, tol=1e-4)
