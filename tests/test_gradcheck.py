"""``torch.autograd.gradcheck`` of the chunked backend (float64, finite differences).

The parity tests compare the backward with the reference's autograd; these compare it
with finite differences of the backend's own forward, so a backward that is consistent
with a wrong reference, or a forward whose chunking breaks differentiability, still
fails. Problems are tiny (gradcheck perturbs every input element twice) and the scratch
budget holds a few tokens, so every call crosses chunk boundaries. One case checks the
full Jacobian; the option sweep uses gradcheck's ``fast_mode`` (it compares ``vᵀ J u``
for random ``u``, ``v`` — one backward and two finite differences per input, not one per
element), which catches the same wrong-gradient bugs at a fraction of the cost.
"""

from __future__ import annotations

import pytest
import torch

import alphapo
from alphapo.epilogue import EXP_CAP, AlphaPOConfig, preference_loss
from conftest import make_batch

V = 13
SCRATCH = 5 * V * 4  # five tokens per chunk (chunked.py sizes chunks at 4 bytes per logit)


def leaves(*tensors):
    return tuple(t.detach().clone().requires_grad_(True) for t in tensors)


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(dict(alpha=0.25), id="alphapo"),
        pytest.param(dict(alpha=-1.0, beta=4.0, label_smoothing=0.2, nll_weight=0.3), id="alpha-1-smoothing-nll"),
        pytest.param(dict(alpha=0.0, loss_type="hinge", gamma=-3.0), id="simpo-hinge"),
        pytest.param(dict(alpha=1.0, beta=0.5, loss_type="ipo"), id="ipo"),
        pytest.param(dict(alpha=0.1, beta=0.2, average_log_prob=False, ref=True), id="summed-ref"),
    ],
)
def test_gradcheck_alphapo_loss_torch_backend(options):
    options = dict(options)
    full = options == dict(alpha=0.25)
    weight, hidden, target, bias = make_batch(2, 5, 4, V, torch.float64, seed=21, peak=2.0)
    refs = ()
    if options.pop("ref", False):
        refs = leaves(torch.tensor([-9.0, -4.0], dtype=torch.float64), torch.tensor([-7.5, -10.0], dtype=torch.float64))

    def fn(W, h, b, *ref):
        return alphapo.alphapo_loss(W, h, target, b, *ref, backend="torch", scratch_bytes=SCRATCH, **options)[0]

    inputs = leaves(weight, hidden, bias) + refs
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=not full)


@pytest.mark.parametrize("average", [pytest.param(True, id="average"), pytest.param(False, id="sum")])
def test_gradcheck_sequence_logprobs_torch_backend(average):
    """The Jacobian of all 2B outputs (gradcheck probes each output separately), no bias."""
    weight, hidden, target, _ = make_batch(2, 6, 4, V, torch.float64, bias=False, seed=22)

    def fn(W, h):
        return alphapo.sequence_logprobs(h, W, target, average=average, backend="torch", scratch_bytes=SCRATCH)

    assert torch.autograd.gradcheck(fn, leaves(weight, hidden), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_gradcheck_only_some_inputs_need_grad():
    """The backward skips the gradients nobody asked for and still gets the others right."""
    weight, hidden, target, bias = make_batch(2, 5, 4, V, torch.float64, seed=23)
    (h,) = leaves(hidden)

    def fn(h):
        return alphapo.alphapo_loss(weight, h, target, bias, backend="torch", scratch_bytes=SCRATCH)[0]

    assert torch.autograd.gradcheck(fn, (h,), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("alpha", [-2.0, 0.5, 2.0])
def test_gradcheck_epilogue_across_the_cap(alpha):
    """The pair loss is differentiable on both sides of EXP_CAP (where the reward turns
    into its tangent): finite differences agree with autograd just below and past it."""
    x_cap = -EXP_CAP / alpha
    side = 1.0 if alpha < 0 else -1.0  # direction in which the exponent -αx grows
    # chosen below the cap, rejected past it, and the reverse
    s = torch.tensor([x_cap - side * 0.3, x_cap + side * 0.4, x_cap + side * 0.2, x_cap - side * 0.5], dtype=torch.float64)
    n = torch.ones(4, dtype=torch.float64)
    cfg = AlphaPOConfig(alpha=alpha, beta=1e-13, gamma=0.0, average_log_prob=False)  # β·e^30 ≈ 1: u stays O(1)
    (leaf,) = leaves(s)
    assert torch.autograd.gradcheck(lambda x: preference_loss(x, n, cfg)[0], (leaf,), eps=1e-7, atol=1e-8, rtol=1e-5)
