"""The specification checked against an independent computation, and the epilogue's numerics.

:mod:`alphapo.reference` is what every backend is compared with, so it is itself checked
here against a second, independent derivation: logits materialised in float64, the
log-softmax written out as ``z[y] - (m + log Σ exp(z - m))``, the pair loss evaluated in
Python floats with the paper's formulas. The metrics (aux fields) of every backend are
checked against the same derivation. The last part drives the epilogue
(:mod:`alphapo.epilogue`) with extreme log-probs: no NaN or inf, and the exact curve below
``EXP_CAP``.
"""

from __future__ import annotations

import math

import pytest
import torch

import alphapo
from alphapo.epilogue import EXP_CAP, AlphaPOConfig, alpha_reward, preference_loss
from alphapo.pair_losses import LOSS_TYPES
from conftest import FUSED_BACKENDS, IGNORE_INDEX, device_for, make_batch


def independent_token_logps(weight, hidden, target, bias):
    """(2B, T) token log-probs (0 where ignored) and the float64 logits, by hand."""
    z = hidden.double() @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    m = z.max(-1, keepdim=True).values
    lse = (m + (z - m).exp().sum(-1, keepdim=True).log()).squeeze(-1)
    valid = target != IGNORE_INDEX
    z_y = z.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, z_y - lse, 0.0), z, valid


def f_alpha(x: float, alpha: float) -> float:
    """The paper's reward ``(1 - exp(-alpha x)) / alpha``, ``x`` at alpha = 0."""
    return x if alpha == 0 else (1.0 - math.exp(-alpha * x)) / alpha


def log_sigmoid(u: float) -> float:
    return -math.log1p(math.exp(-u)) if u >= 0 else u - math.log1p(math.exp(u))


def independent_loss(seq_sum, n, options, ref_w=None, ref_l=None):
    """Loss, β·rewards and NLL from per-sequence sums, pair by pair in Python floats."""
    cfg = AlphaPOConfig(**options)
    B = len(seq_sum) // 2
    x = [seq_sum[i] / n[i] if cfg.average_log_prob else seq_sum[i] for i in range(2 * B)]
    losses, r_w, r_l = [], [], []
    for j in range(B):
        x_w, x_l = x[j], x[B + j]
        if ref_w is not None:
            x_w, x_l = x_w - ref_w[j], x_l - ref_l[j]
        fw, fl = f_alpha(x_w, cfg.alpha), f_alpha(x_l, cfg.alpha)
        u = cfg.beta * (fw - fl) - cfg.gamma
        if cfg.loss_type == "sigmoid":
            eps = cfg.label_smoothing
            losses.append(-(1 - eps) * log_sigmoid(u) - eps * log_sigmoid(-u))
        elif cfg.loss_type == "hinge":
            losses.append(max(0.0, 1.0 - u))
        else:  # IPO, eq. 17 of the IPO paper with the SimPO margin: (Δ - γ/β - 1/(2β))²
            losses.append((fw - fl - cfg.gamma / cfg.beta - 1 / (2 * cfg.beta)) ** 2)
        r_w.append(cfg.beta * fw)
        r_l.append(cfg.beta * fl)
    nll = -sum(seq_sum[:B]) / sum(n[:B])
    loss = sum(losses) / B + cfg.nll_weight * nll
    return loss, r_w, r_l, nll, x


OPTIONS = [
    pytest.param(dict(alpha=0.25), id="alphapo"),
    pytest.param(dict(alpha=-1.0, beta=10.0, gamma=0.5), id="alpha-1"),
    pytest.param(dict(alpha=0.0), id="simpo"),
    pytest.param(dict(alpha=2.0, beta=0.02, gamma=0.3, label_smoothing=0.3), id="alpha2-smoothing"),
    pytest.param(dict(alpha=0.5, loss_type="hinge", gamma=0.2), id="hinge"),
    pytest.param(dict(alpha=0.5, loss_type="ipo", gamma=0.2), id="ipo"),
    pytest.param(dict(alpha=0.1, nll_weight=0.4), id="nll"),
    pytest.param(dict(alpha=0.05, beta=0.5, average_log_prob=False), id="summed"),
]


def test_sequence_logprobs_reference_is_the_masked_log_softmax():
    weight, hidden, target, bias = make_batch(2, 23, 12, 101, torch.float64, seed=1)
    token_logps, _, valid = independent_token_logps(weight, hidden, target, bias)
    summed = alphapo.sequence_logprobs(hidden, weight, target, bias, average=False, backend="reference")
    average = alphapo.sequence_logprobs(hidden, weight, target, bias, average=True, backend="reference")
    torch.testing.assert_close(summed, token_logps.sum(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(average, token_logps.sum(-1) / valid.sum(-1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("options", OPTIONS)
def test_reference_loss_matches_the_paper_formula(options):
    weight, hidden, target, bias = make_batch(3, 19, 16, 67, torch.float64, seed=2, peak=4.2)
    token_logps, _, valid = independent_token_logps(weight, hidden, target, bias)
    expected, *_ = independent_loss(token_logps.sum(-1).tolist(), valid.sum(-1).tolist(), options)
    loss, _ = alphapo.alphapo_loss(weight, hidden, target, bias, backend="reference", **options)
    assert loss.dtype == torch.float64
    assert math.isclose(loss.item(), expected, rel_tol=1e-11), (loss.item(), expected)


def test_reference_log_probs_give_dpo_and_the_seed_summary_form():
    """α = 0 with summed log-probs and reference log-probs is DPO; α = -a applied to the
    log-ratio gives the seed summary's ``(1/a)[(π/π_ref)^a - 1]`` reward."""
    weight, hidden, target, bias = make_batch(2, 15, 8, 41, torch.float64, seed=3, peak=3.7)
    ref_w = torch.tensor([-20.0, -9.5], dtype=torch.float64)
    ref_l = torch.tensor([-14.0, -17.25], dtype=torch.float64)
    s = alphapo.sequence_logprobs(hidden, weight, target, bias, average=False, backend="reference")
    beta = 0.1

    loss, aux = alphapo.alphapo_loss(
        weight, hidden, target, bias, ref_w, ref_l,
        alpha=0.0, beta=beta, gamma=0.0, average_log_prob=False, backend="reference",
    )
    logits = beta * ((s[:2] - ref_w) - (s[2:] - ref_l))
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(logits).mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(aux.reward_margin.double(), logits, rtol=1e-6, atol=0)

    a = 0.5
    _, aux = alphapo.alphapo_loss(
        weight, hidden, target, bias, ref_w, ref_l,
        alpha=-a, beta=beta, gamma=0.0, average_log_prob=False, backend="reference",
    )
    ratio_w = torch.exp(s[:2] - ref_w)  # π/π_ref of the chosen answers
    torch.testing.assert_close(aux.chosen_rewards.double(), beta * (ratio_w**a - 1) / a, rtol=1e-6, atol=0)


@pytest.mark.parametrize("options", OPTIONS[:2] + OPTIONS[6:])
@pytest.mark.parametrize("backend", [pytest.param("reference", id="reference"), *FUSED_BACKENDS])
def test_metrics_against_materialised_logits(backend, options):
    """Every aux field against its definition on float64 materialised logits."""
    device = device_for(backend)
    weight, hidden, target, bias = make_batch(3, 21, 16, 73, torch.float64, seed=4, device=device, peak=4.3)
    token_logps, z, valid = independent_token_logps(weight, hidden, target, bias)
    n = valid.sum(-1)
    loss_expected, r_w, r_l, nll, x = independent_loss(token_logps.sum(-1).tolist(), n.tolist(), options)
    loss, aux = alphapo.alphapo_loss(weight, hidden, target, bias, backend=backend, **options)
    B = 3
    f32 = dict(dtype=torch.float32, device=device)

    def close(name, got, want, rtol=1e-6):
        want = torch.as_tensor(want, **f32)
        assert got.dtype == torch.float32 and got.shape == want.shape, (name, got.dtype, got.shape)
        torch.testing.assert_close(got, want, rtol=rtol, atol=1e-6, msg=lambda m: f"{name}: {m}")

    assert math.isclose(loss.item(), loss_expected, rel_tol=1e-10)
    close("chosen_logps", aux.chosen_logps, x[:B])
    close("rejected_logps", aux.rejected_logps, x[B:])
    close("chosen_rewards", aux.chosen_rewards, r_w)
    close("rejected_rewards", aux.rejected_rewards, r_l)
    close("reward_margin", aux.reward_margin, [w - l for w, l in zip(r_w, r_l)])
    close("reward_accuracy", aux.reward_accuracy, [float(w > l) for w, l in zip(r_w, r_l)], rtol=0)
    logit_mean = lambda rows: z[rows][valid[rows]].mean().item()  # over valid tokens and the vocabulary
    close("chosen_logits_mean", aux.chosen_logits_mean, logit_mean(slice(0, B)))
    close("rejected_logits_mean", aux.rejected_logits_mean, logit_mean(slice(B, 2 * B)))
    close("nll_loss", aux.nll_loss, nll)
    # TRL's token metrics: entropy over every valid token, top-1 accuracy over chosen ones
    logp_all = torch.log_softmax(z, -1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    close("entropy", aux.entropy, entropy[valid].mean().item())
    top1 = z.argmax(-1) == target
    close("mean_token_accuracy", aux.mean_token_accuracy, top1[:B][valid[:B]].double().mean().item())
    a = options.get("alpha", 0.25)
    close("tangent_fraction", aux.tangent_fraction, sum(-a * v > 30 for v in x) / (2 * B))
    close("saturated_fraction", aux.saturated_fraction, sum(a * v > 30 for v in x) / (2 * B))
    assert not any(t.requires_grad for t in aux)

    logged = aux.to_dict()
    assert set(logged) == {
        "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
        "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "nll_loss",
        "entropy", "mean_token_accuracy", "rewards/tangent_fraction", "rewards/saturated_fraction",
    }
    assert all(v.dim() == 0 for v in logged.values())
    close("rewards/margins", logged["rewards/margins"], sum(r_w) / B - sum(r_l) / B)
    assert set(aux.to_dict(prefix="eval_")) == {f"eval_{k}" for k in logged}


def test_accuracy_counts_pairs_not_sequences():
    """Chosen rewards above rejected ones pair by pair, not against the batch mean."""
    weight, hidden, target, bias = make_batch(4, 9, 8, 29, torch.float64, seed=6, peak=3.0)
    _, aux = alphapo.alphapo_loss(weight, hidden, target, bias, alpha=0.25, backend="reference")
    expected = (aux.chosen_rewards > aux.rejected_rewards).float()
    assert torch.equal(aux.reward_accuracy, expected)
    assert 0 < expected.sum() < 4, "the batch should hold both won and lost pairs"


# ---------------------------------------------------------------- epilogue numerics

ALPHAS = [-2.0, -1.0, -0.25, 0.0, 1e-7, 0.25, 1.0, 2.0]


@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t not in ("aot", "sft")])
@pytest.mark.parametrize(
    "average, floor",
    [pytest.param(True, -50.0, id="average-to-minus50"), pytest.param(False, -5000.0, id="summed-to-minus5000")],
)
def test_epilogue_finite_for_extreme_logps(average, floor, loss_type):
    """Loss and dL/ds finite, in float64 and after the float32 cast at the API edge, for
    α in [-2, 2] and log-probs from 0 down to ``floor`` (both orders within a pair)."""
    n = torch.tensor([7.0, 3.0, 7.0, 3.0, 1.0, 1.0, 50.0, 50.0], dtype=torch.float64)
    x = torch.tensor([floor, 0.0, -1e-3, floor, floor / 2, floor, 0.0, floor / 3], dtype=torch.float64)
    seq_sum = x * n if average else x  # per-sequence values x exactly, average or not
    for alpha in ALPHAS:
        for beta in (0.1, 2.5, 10.0):
            info = LOSS_TYPES[loss_type]
            cfg = AlphaPOConfig(alpha=alpha, beta=beta, gamma=1.0 if info.margin else 0.0, loss_type=loss_type,
                                average_log_prob=average, nll_weight=0.5,
                                label_smoothing=0.1 if info.smoothing != "no" else 0.0)
            leaf = seq_sum.clone().requires_grad_(True)
            out = preference_loss(leaf, n, cfg)
            loss, r_w, r_l = out.loss, out.chosen_rewards, out.rejected_rewards
            loss.backward()
            what = f"alpha={alpha} beta={beta}"
            for name, t in (("loss", loss), ("grad", leaf.grad), ("rewards", torch.cat([r_w, r_l]))):
                assert torch.isfinite(t).all(), f"{what}: {name} = {t}"
                assert torch.isfinite(t.float()).all(), f"{what}: {name} overflows float32: {t}"


@pytest.mark.parametrize("alpha", ALPHAS)
def test_alpha_reward_exact_below_the_cap(alpha):
    """``alpha_reward`` equals ``(1 - e^(-αx))/α`` (Python's expm1) wherever ``-αx <= EXP_CAP``,
    and its derivative is ``e^(-αx)`` there (to 1e-15 absolute where it is tiny: autograd
    forms it as ``expm1(E) + 1``)."""
    x = torch.linspace(-50.0, 10.0, 2001, dtype=torch.float64)
    if alpha != 0:
        x = x[-alpha * x <= EXP_CAP]
    x = x.clone().requires_grad_(True)
    f = alpha_reward(x, alpha)
    f.sum().backward()
    exact = [xi if alpha == 0 else -math.expm1(-alpha * xi) / alpha for xi in x.tolist()]
    slope = [math.exp(-alpha * xi) for xi in x.tolist()]
    torch.testing.assert_close(f.detach(), torch.tensor(exact, dtype=torch.float64), rtol=1e-13, atol=1e-300)
    torch.testing.assert_close(x.grad, torch.tensor(slope, dtype=torch.float64), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("alpha", [-2.0, -0.5, 0.5, 2.0])
def test_alpha_reward_past_the_cap_is_the_tangent(alpha):
    """Past the cap the reward continues along its tangent: continuous, slope e^EXP_CAP,
    monotone increasing, and finite down to summed log-probs of -5000."""
    x_cap = -EXP_CAP / alpha
    side = 1.0 if alpha < 0 else -1.0  # the direction in which -αx grows
    x = torch.tensor([x_cap - side * 1e-9, x_cap, x_cap + side * 1e-9, x_cap + side * 100.0], dtype=torch.float64)
    x.requires_grad_(True)
    f = alpha_reward(x, alpha)
    f.sum().backward()
    cap_value = -math.expm1(EXP_CAP) / alpha
    assert math.isclose(f[1].item(), cap_value, rel_tol=1e-14)
    assert abs(f[2].item() - cap_value) <= math.exp(EXP_CAP) * 2e-9  # continuous across the cap
    assert math.isclose(f[3].item(), cap_value + math.exp(EXP_CAP) * side * 100.0, rel_tol=1e-12)
    torch.testing.assert_close(x.grad[2:], torch.full((2,), math.exp(EXP_CAP), dtype=torch.float64), rtol=1e-12, atol=0)
    grid = torch.linspace(-5000.0, 5000.0, 10001, dtype=torch.float64)
    values = alpha_reward(grid, alpha)
    assert torch.isfinite(values).all() and torch.isfinite(values.float()).all()
    assert (values.diff() >= 0).all(), "the reward must stay non-decreasing in the log-prob"


@pytest.mark.parametrize("alpha, tangent, flat", [(50.0, 1.0, 0.0), (10.0, 1.0, 0.0), (-50.0, 0.0, 1.0), (0.0, 0.0, 0.0)])
def test_extreme_alpha_is_visible_in_aux(alpha, tangent, flat):
    """Summed log-probs of a few hundred: α = 10 and 50 put every reward on the tangent (the
    loss no longer depends on α), α = -50 on the flat side (no gradient): aux says which."""
    weight, hidden, target, bias = make_batch(2, 40, 16, 97, torch.float64, seed=4)
    hidden = hidden.requires_grad_()
    loss, aux = alphapo.alphapo_loss(weight, hidden, target, bias, backend="reference", alpha=alpha,
                                     average_log_prob=False, gamma=0.0)
    assert aux.tangent_fraction.item() == tangent and aux.saturated_fraction.item() == flat
    if flat:
        (grad,) = torch.autograd.grad(loss, hidden)
        assert grad.abs().max().item() < 1e-12


@pytest.mark.parametrize("coef", [0.3, 0.5, 1.7])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "discopop"])
def test_alpha_divergence_is_the_alpha_reward_family(coef, loss_type):
    """TRL's α-divergence score (t^(a-1) - 1)/(a - 1) on the log-ratio is f_{1-a}: at α = 0
    it gives exactly the loss of the reverse-KL score with alpha = 1 - a."""
    weight, hidden, target, bias = make_batch(3, 13, 16, 61, torch.float64, seed=21, peak=3.5)
    gen = torch.Generator().manual_seed(5)
    refs = [-8 * torch.rand(3, generator=gen, dtype=torch.float64) for _ in range(2)]
    common = dict(beta=0.3, gamma=0.0, loss_type=loss_type, average_log_prob=True, backend="reference")
    fdiv, aux_f = alphapo.alphapo_loss(weight, hidden, target, bias, *refs, alpha=0.0,
                                       f_divergence_type="alpha_divergence", f_alpha_divergence_coef=coef, **common)
    shaped, _ = alphapo.alphapo_loss(weight, hidden, target, bias, *refs, alpha=1.0 - coef, **common)
    assert fdiv.item() == pytest.approx(shaped.item(), rel=1e-12)


@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t not in ("aot", "aot_unpaired", "sft")])
def test_alpha_to_zero_is_continuous_for_every_loss_type(loss_type):
    """α → 0 approaches the α = 0 loss (TRL's) for every pair loss; α ≠ 0 changes it."""
    weight, hidden, target, bias = make_batch(2, 11, 16, 53, torch.float64, seed=23, peak=3.0)
    gen = torch.Generator().manual_seed(7)
    refs = [-20 * torch.rand(2, generator=gen, dtype=torch.float64) for _ in range(2)]
    info = LOSS_TYPES[loss_type]
    opts = dict(beta=0.2, gamma=0.0, loss_type=loss_type, average_log_prob=False, backend="reference",
                label_smoothing=0.1 if info.smoothing != "no" else 0.0)
    at = {a: alphapo.alphapo_loss(weight, hidden, target, bias, *refs, alpha=a, **opts)[0].item()
          for a in (0.0, 1e-7, 0.5)}
    assert at[1e-7] == pytest.approx(at[0.0], rel=1e-5, abs=1e-9)
    assert at[0.5] != pytest.approx(at[0.0], rel=1e-6)
