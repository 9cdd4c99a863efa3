"""Parity with the peers: TRL's CPO trainer (the AlphaPO reference implementation) and
Liger-Kernel's fused SimPO loss; and where and why our epilogue departs from TRL's formula.

TRL (``trl.experimental.cpo``) is driven without a trainer: its ``cpo_loss`` method runs
on a ``SimpleNamespace`` holding the attributes it reads, and its own ``get_batch_logps``
turns materialised float64 logits into sequence log-probs (it shifts labels itself, so we
hand it the unshifted layout). Our options map onto its loss types as::

    TRL loss_type   log-probs  TRL formula                      ours
    "simpo"/alpha   average    -logσ(β(Δ - γ/β)) (smoothed)     sigmoid, gamma = simpo_gamma
    "sigmoid"       summed     -logσ(βΔ) (smoothed)             sigmoid, gamma = 0, average_log_prob=False
    "hinge"         summed     relu(1 - βΔ)                     hinge,   gamma = 0, average_log_prob=False
    "ipo"           average    (Δ - 1/(2β))²                    ipo,     gamma = 0
    cpo_alpha · CE(chosen)                                      nll_weight

with ``Δ = f_α(s_w) - f_α(s_l)`` in both (``loss_type="alphapo"`` in ``CPOConfig`` is
"simpo" with ``cpo_alpha = 0``). Liger's ``alpha`` is its NLL weight (our ``nll_weight``);
it has no reward exponent, so it is compared at α = 0. Neither peer's ``logits/*`` metric
is compared: both average over every position, padding and prompt included, where ours
averages over the valid tokens (the tokens the loss sees).
"""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch

import alphapo
from alphapo.epilogue import AlphaPOConfig, preference_loss
from conftest import IGNORE_INDEX, assert_grads_close, loss_and_grads, make_batch, rel_err, upcast

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def trl_cpo():
    pytest.importorskip("trl")
    cpo = pytest.importorskip("trl.experimental.cpo")
    return cpo.CPOTrainer


def trl_self(alpha, beta, loss_type, simpo_gamma=0.5, label_smoothing=0.0):
    """The attributes ``CPOTrainer.cpo_loss`` reads, without building a trainer."""
    return SimpleNamespace(
        alpha=alpha, beta=beta, loss_type=loss_type, simpo_gamma=simpo_gamma, label_smoothing=label_smoothing,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )


def trl_layout(logits, target):
    """TRL shifts inside ``get_batch_logps`` (labels[:, 1:], logits[:, :-1]): undo ours."""
    rows, T, V = logits.shape
    labels = torch.cat([torch.full((rows, 1), IGNORE_INDEX, dtype=target.dtype), target], dim=1)
    logits = torch.cat([logits, logits.new_zeros(rows, 1, V)], dim=1)  # the last position predicts nothing
    return logits, labels


# (TRL loss_type, TRL args, our options)
TRL_CASES = [
    pytest.param("simpo", dict(alpha=0.25, beta=2.5, simpo_gamma=1.375),
                 dict(alpha=0.25, beta=2.5, gamma=1.375), id="alphapo-0.25"),
    pytest.param("simpo", dict(alpha=-1.0, beta=10.0, simpo_gamma=0.5, label_smoothing=0.2),
                 dict(alpha=-1.0, beta=10.0, gamma=0.5, label_smoothing=0.2), id="alphapo-minus1-smoothing"),
    pytest.param("simpo", dict(alpha=2.0, beta=0.02, simpo_gamma=0.3),
                 dict(alpha=2.0, beta=0.02, gamma=0.3), id="alphapo-2"),
    pytest.param("simpo", dict(alpha=0.0, beta=2.0, simpo_gamma=1.0),
                 dict(alpha=0.0, beta=2.0, gamma=1.0), id="simpo"),
    pytest.param("sigmoid", dict(alpha=0.05, beta=0.1, label_smoothing=0.1),
                 dict(alpha=0.05, beta=0.1, gamma=0.0, label_smoothing=0.1, average_log_prob=False), id="sigmoid-summed"),
    pytest.param("hinge", dict(alpha=0.02, beta=0.1),
                 dict(alpha=0.02, beta=0.1, gamma=0.0, loss_type="hinge", average_log_prob=False), id="hinge-summed"),
    pytest.param("ipo", dict(alpha=0.5, beta=0.5),
                 dict(alpha=0.5, beta=0.5, gamma=0.0, loss_type="ipo"), id="ipo"),
]


@pytest.mark.parametrize("cpo_alpha", [pytest.param(0.0, id="no-nll"), pytest.param(0.6, id="nll")])
@pytest.mark.parametrize("trl_loss_type, trl_args, ours", TRL_CASES)
def test_matches_trl_cpo_loss(trl_loss_type, trl_args, ours, cpo_alpha):
    """Loss, every gradient and the shared metrics equal TRL's on the same float64 batch."""
    CPOTrainer = trl_cpo()
    trainer = trl_self(loss_type=trl_loss_type, **trl_args)
    average = trl_loss_type in ("ipo", "simpo")  # what CPOTrainer.concatenated_forward uses
    assert average == ours.get("average_log_prob", True)
    weight, hidden, target, bias = make_batch(3, 25, 16, 97, torch.float64, seed=31, peak=4.6)
    B = 3
    trl_out = {}

    def trl_fn(W, h, b):
        logits, labels = trl_layout(h @ W.t() + b, target)
        logps = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=average)
        losses, r_w, r_l = CPOTrainer.cpo_loss(trainer, logps[:B], logps[B:])
        # concatenated_forward's NLL: CrossEntropyLoss over the shifted chosen rows
        nll = torch.nn.functional.cross_entropy(
            logits[:B, :-1].reshape(-1, logits.shape[-1]), labels[:B, 1:].reshape(-1), ignore_index=IGNORE_INDEX
        )
        trl_out.update(logps=logps.detach(), r_w=r_w, r_l=r_l, nll=nll.detach())
        return losses.mean() + cpo_alpha * nll

    def our_fn(W, h, b):
        return alphapo.alphapo_loss(W, h, target, b, nll_weight=cpo_alpha, backend="torch", **ours)

    trl_loss, trl_grads = loss_and_grads(trl_fn, weight, hidden, bias, seed=2)
    loss, grads = loss_and_grads(our_fn, weight, hidden, bias, seed=2)
    assert torch.isfinite(trl_loss)
    assert rel_err(loss, trl_loss) < 1e-10, (loss.item(), trl_loss.item())
    assert_grads_close(grads, trl_grads, 1e-9, what=f"TRL {trl_loss_type}")

    with torch.no_grad():
        _, aux = our_fn(weight, hidden, bias)
    f32 = lambda t: t.float()
    torch.testing.assert_close(aux.chosen_logps, f32(trl_out["logps"][:B]))
    torch.testing.assert_close(aux.rejected_logps, f32(trl_out["logps"][B:]))
    torch.testing.assert_close(aux.chosen_rewards, f32(trl_out["r_w"]))
    torch.testing.assert_close(aux.rejected_rewards, f32(trl_out["r_l"]))
    torch.testing.assert_close(aux.reward_accuracy, (trl_out["r_w"] > trl_out["r_l"]).float())
    torch.testing.assert_close(aux.nll_loss, f32(trl_out["nll"]))


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(dict(beta=2.5, gamma=1.375), id="simpo"),
        pytest.param(dict(beta=2.0, gamma=0.5, label_smoothing=0.15), id="smoothing"),
        pytest.param(dict(beta=2.5, gamma=1.0, nll_weight=0.8), id="nll"),
    ],
)
@pytest.mark.parametrize("bias", [pytest.param(True, id="bias"), pytest.param(False, id="nobias")])
def test_matches_liger_simpo_at_alpha_zero(options, bias):
    """At α = 0 we are SimPO: loss, gradients and per-pair metrics equal Liger's fused
    SimPO loss (float32, eager: ``compiled=False``)."""
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    weight, hidden, target, b = make_batch(2, 37, 48, 509, torch.float32, bias=bias, seed=33, peak=6.2)
    nll_weight = options.get("nll_weight", 0.0)
    liger_loss_fn = liger.LigerFusedLinearSimPOLoss(
        ignore_index=IGNORE_INDEX, beta=options["beta"], gamma=options["gamma"], alpha=nll_weight,
        label_smoothing=options.get("label_smoothing", 0.0), compute_nll_loss=nll_weight > 0, compiled=False,
    )

    def our_fn(W, h, bb):
        return alphapo.alphapo_loss(W, h, target, bb, alpha=0.0, backend="torch", **options)

    def ref_fn(W, h, bb):
        return alphapo.alphapo_loss(W, h, target, bb, alpha=0.0, backend="reference", **options)

    l_loss, l_grads = loss_and_grads(lambda W, h, bb: liger_loss_fn(W, h, target, bb), weight, hidden, b, seed=4)
    loss, grads = loss_and_grads(our_fn, weight, hidden, b, seed=4)
    ref_loss, ref_grads = loss_and_grads(ref_fn, *upcast(weight, hidden, b), seed=4)
    # Both in float32: each within float32 error of the float64 reference, and of each other.
    for name, (got, got_grads) in {"liger": (l_loss, l_grads), "alphapo": (loss, grads)}.items():
        assert rel_err(got, ref_loss) < 1e-5, name
        assert_grads_close(got_grads, ref_grads, 1e-5, what=name)
    assert rel_err(loss, l_loss) < 2e-5
    assert_grads_close(grads, l_grads, 2e-5, what="alphapo vs liger")

    with torch.no_grad():
        _, l_aux = liger_loss_fn(weight, hidden, target, b)
        _, aux = our_fn(weight, hidden, b)
    chosen_logps, rejected_logps, _, _, nll, chosen_rewards, rejected_rewards = l_aux
    close = dict(rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(aux.chosen_logps, chosen_logps, **close)
    torch.testing.assert_close(aux.rejected_logps, rejected_logps, **close)
    torch.testing.assert_close(aux.chosen_rewards, chosen_rewards, **close)
    torch.testing.assert_close(aux.rejected_rewards, rejected_rewards, **close)
    if nll_weight:
        torch.testing.assert_close(aux.nll_loss, nll, **close)


# ------------------------------------------------ where TRL's formula breaks and ours holds

EXTREMES = [
    # (alpha, average log-prob or summed log-prob per row (chosen, rejected), average?, dtype TRL runs in)
    pytest.param(2.0, (-50.0, -45.0), True, torch.float32, id="avg-50-alpha2-fp32"),
    pytest.param(1.0, (-5000.0, -4000.0), False, torch.float64, id="sum-5000-alpha1-fp64"),
    pytest.param(0.25, (-5000.0, -20.0), False, torch.float64, id="sum-5000-alpha0.25-fp64"),
]


@pytest.mark.parametrize("alpha, logps, average, dtype", EXTREMES)
def test_trl_formula_overflows_where_ours_stays_finite(alpha, logps, average, dtype):
    """TRL computes ``exp(s).pow(-alpha)``: ``exp(s)`` underflows to 0 (summed log-probs
    of -5000, even in float64) and ``0 ** -alpha = inf``, or ``exp(-50) ** -2 = e^100``
    overflows float32 — the rewards become ±inf and Δ = inf - inf = NaN. Ours forms the
    exponent ``-alpha * s`` directly, in float64, and follows the tangent past EXP_CAP, so
    loss and gradient stay finite (in float32 too) and the chosen answer's lower log-prob
    still gets the larger loss."""
    CPOTrainer = trl_cpo()
    s = torch.tensor(logps, dtype=dtype, requires_grad=True)
    losses, _, _ = CPOTrainer.cpo_loss(trl_self(alpha, beta=0.1, loss_type="simpo", simpo_gamma=0.5), s[:1], s[1:])
    losses.sum().backward()
    trl_bad = (~torch.isfinite(losses)).any() or (~torch.isfinite(s.grad)).any()
    assert trl_bad, f"TRL's formula is finite here ({losses}, {s.grad}): the documented difference is gone"

    cfg = AlphaPOConfig(alpha=alpha, beta=0.1, gamma=0.5, average_log_prob=average)
    n = torch.tensor([4.0, 4.0], dtype=torch.float64)
    seq_sum = (torch.tensor(logps, dtype=torch.float64) * (n if average else 1.0)).requires_grad_(True)
    loss, *_ = preference_loss(seq_sum, n, cfg)
    loss.backward()
    assert math.isfinite(loss.item()) and math.isfinite(loss.float().item())
    assert torch.isfinite(seq_sum.grad).all() and torch.isfinite(seq_sum.grad.float()).all()
    assert loss.item() > 1.0, "a chosen answer far less likely than the rejected one must cost more than log 2"
    assert seq_sum.grad[0] < 0 < seq_sum.grad[1], "raising the chosen / lowering the rejected log-prob lowers the loss"
