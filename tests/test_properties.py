"""Property tests (hypothesis) over random shapes, masks and options, in float64.

* the chunked torch backend equals the reference, loss, gradients and metrics;
* permuting pairs permutes the per-pair metrics and the hidden-state gradient rows, and
  leaves the loss and the weight gradient alone;
* appending ignored positions (more padding) changes nothing, and their gradient is 0;
* swapping chosen and rejected at γ = 0, ε = 0 moves the sigmoid loss by exactly mean(u):
  ``-logσ(-u) - (-logσ(u)) = u``;
* α → 0 is continuous: α = 1e-7 gives SimPO's loss and gradients to ~1e-6.

Masks are arbitrary (holes anywhere, not just prompt + right padding) with at least one
valid token per row. Examples are few (``max_examples=25``) and derandomized, so the suite
is fast and CI sees the same examples every run.
"""

from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import alphapo  # noqa: E402
from conftest import IGNORE_INDEX, assert_grads_close, loss_and_grads, rel_err  # noqa: E402

SETTINGS = settings(
    max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None
)
F64 = torch.float64


@st.composite
def batches(draw, max_B=3, max_T=12, max_H=9, max_V=40):
    """``(weight, hidden, target, bias)`` in float64 with a random mask per row."""
    B = draw(st.integers(1, max_B))
    T = draw(st.integers(1, max_T))
    H = draw(st.integers(1, max_H))
    V = draw(st.integers(2, max_V))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.5, 1.0, 3.0]))
    with_bias = draw(st.booleans())
    rows = []
    for _ in range(2 * B):
        mask = draw(st.lists(st.booleans(), min_size=T, max_size=T))
        mask[draw(st.integers(0, T - 1))] = True  # every row keeps a valid token
        rows.append(mask)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, H, generator=gen, dtype=F64) * (scale / H**0.5)
    hidden = torch.randn(2 * B, T, H, generator=gen, dtype=F64)
    bias = torch.randn(V, generator=gen, dtype=F64) if with_bias else None
    ids = torch.randint(0, V, (2 * B, T), generator=gen)
    target = torch.where(torch.tensor(rows), ids, IGNORE_INDEX)
    return weight, hidden, target, bias


@st.composite
def options(draw):
    """Loss options; beta is kept modest so the pair losses are not all saturated."""
    loss_type = draw(st.sampled_from(["sigmoid", "hinge", "ipo"]))
    return dict(
        alpha=draw(st.sampled_from([-2.0, -1.0, 0.0, 0.25, 1.0, 2.0]) | st.floats(-2.0, 2.0)),
        beta=draw(st.floats(0.05, 3.0)),
        gamma=draw(st.floats(-1.0, 2.0)),
        label_smoothing=draw(st.floats(0.0, 0.5)) if loss_type == "sigmoid" else 0.0,
        loss_type=loss_type,
        average_log_prob=draw(st.booleans()),
        nll_weight=draw(st.sampled_from([0.0, 0.5])),
    )


def loss_fn(target, backend="torch", **kw):
    return lambda W, h, b: alphapo.alphapo_loss(W, h, target, b, backend=backend, **kw)


@SETTINGS
@given(batch=batches(), opts=options(), scratch_tokens=st.integers(1, 50))
def test_torch_backend_equals_reference(batch, opts, scratch_tokens):
    weight, hidden, target, bias = batch
    V = weight.shape[0]
    loss, grads = loss_and_grads(loss_fn(target, scratch_bytes=scratch_tokens * V * 4, **opts), weight, hidden, bias, seed=3)
    ref, ref_grads = loss_and_grads(loss_fn(target, backend="reference", **opts), weight, hidden, bias, seed=3)
    assert rel_err(loss, ref) < 1e-10
    # Absolute floor: a hinge or a saturated pair can give a zero gradient, whose relative error is moot.
    for name, g in grads.items():
        if g is not None:
            assert (g - ref_grads[name]).norm() <= 1e-10 * ref_grads[name].norm() + 1e-13, name
    with torch.no_grad():
        _, aux = loss_fn(target, **opts)(weight, hidden, bias)
        _, ref_aux = loss_fn(target, backend="reference", **opts)(weight, hidden, bias)
    for name, value in aux._asdict().items():
        torch.testing.assert_close(value, getattr(ref_aux, name), rtol=1e-6, atol=1e-6, msg=name)


@SETTINGS
@given(batch=batches(max_B=4), opts=options(), data=st.data())
def test_permuting_pairs_permutes_the_metrics(batch, opts, data):
    weight, hidden, target, bias = batch
    B = hidden.shape[0] // 2
    perm = torch.tensor(data.draw(st.permutations(range(B))))
    rows = torch.cat([perm, perm + B])  # the same permutation of chosen and of rejected rows
    loss, grads = loss_and_grads(loss_fn(target, **opts), weight, hidden, bias, seed=5)
    p_loss, p_grads = loss_and_grads(loss_fn(target[rows], **opts), weight, hidden[rows], bias, seed=5)
    torch.testing.assert_close(p_loss, loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(p_grads["hidden"], grads["hidden"][rows], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(p_grads["weight"], grads["weight"], rtol=1e-10, atol=1e-14)
    with torch.no_grad():
        _, aux = loss_fn(target, **opts)(weight, hidden, bias)
        _, p_aux = loss_fn(target[rows], **opts)(weight, hidden[rows], bias)
    for name in ("chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards", "reward_accuracy", "reward_margin"):
        torch.testing.assert_close(getattr(p_aux, name), getattr(aux, name)[perm], msg=name)
    for name in ("chosen_logits_mean", "rejected_logits_mean", "nll_loss"):
        torch.testing.assert_close(getattr(p_aux, name), getattr(aux, name), msg=name)


@SETTINGS
@given(batch=batches(), opts=options(), extra=st.integers(1, 9), seed=st.integers(0, 1000))
def test_extra_ignored_positions_change_nothing(batch, opts, extra, seed):
    weight, hidden, target, bias = batch
    rows, T, H = hidden.shape
    gen = torch.Generator().manual_seed(seed)
    pad_hidden = torch.cat([hidden, 100.0 * torch.randn(rows, extra, H, generator=gen, dtype=F64)], dim=1)
    pad_target = torch.cat([target, torch.full((rows, extra), IGNORE_INDEX)], dim=1)
    loss, grads = loss_and_grads(loss_fn(target, **opts), weight, hidden, bias, seed=7)
    p_loss, p_grads = loss_and_grads(loss_fn(pad_target, **opts), weight, pad_hidden, bias, seed=7)
    torch.testing.assert_close(p_loss, loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(p_grads["hidden"][:, :T], grads["hidden"], rtol=1e-10, atol=1e-14)
    assert torch.count_nonzero(p_grads["hidden"][:, T:]) == 0, "ignored positions must get exactly zero gradient"
    torch.testing.assert_close(p_grads["weight"], grads["weight"], rtol=1e-10, atol=1e-14)
    with torch.no_grad():
        _, aux = loss_fn(target, **opts)(weight, hidden, bias)
        _, p_aux = loss_fn(pad_target, **opts)(weight, pad_hidden, bias)
    for name, value in aux._asdict().items():
        torch.testing.assert_close(getattr(p_aux, name), value, msg=name)


@SETTINGS
@given(batch=batches(), alpha=st.floats(-2.0, 2.0), beta=st.floats(0.05, 3.0), average=st.booleans())
def test_swapping_chosen_and_rejected_shifts_the_loss_by_mean_u(batch, alpha, beta, average):
    weight, hidden, target, bias = batch
    B = hidden.shape[0] // 2
    swap = torch.cat([torch.arange(B, 2 * B), torch.arange(B)])
    opts = dict(alpha=alpha, beta=beta, gamma=0.0, average_log_prob=average)
    with torch.no_grad():
        loss, aux = loss_fn(target, **opts)(weight, hidden, bias)
        s_loss, s_aux = loss_fn(target[swap], **opts)(weight, hidden[swap], bias)
    u = aux.reward_margin.double()  # β·Δ, and γ = 0
    torch.testing.assert_close(s_loss - loss, u.mean(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(s_aux.reward_margin, -aux.reward_margin)
    torch.testing.assert_close(s_aux.chosen_logps, aux.rejected_logps)


@SETTINGS
@given(batch=batches(), beta=st.floats(0.05, 3.0), gamma=st.floats(-1.0, 2.0), loss_type=st.sampled_from(["sigmoid", "hinge", "ipo"]))
def test_alpha_to_zero_is_continuous(batch, beta, gamma, loss_type):
    """f_α(s) = s - αs²/2 + O(α²) and f'_α(s) = 1 - αs + O(α²): at α = 1e-7, with average
    log-probs |s| ≲ 20 here, loss and gradients stay within 1e-4 (relative) of α = 0 —
    the SimPO branch, a separate code path."""
    weight, hidden, target, bias = batch
    opts = dict(beta=beta, gamma=gamma, loss_type=loss_type)
    loss0, grads0 = loss_and_grads(loss_fn(target, alpha=0.0, **opts), weight, hidden, bias, seed=9)
    loss1, grads1 = loss_and_grads(loss_fn(target, alpha=1e-7, **opts), weight, hidden, bias, seed=9)
    torch.testing.assert_close(loss1, loss0, rtol=1e-4, atol=1e-9)
    for name, g in grads0.items():
        if g is not None:
            assert (grads1[name] - g).norm() <= 1e-4 * g.norm() + 1e-9, name
