"""Under torch.autocast the head runs in the autocast dtype, as F.linear would, and the
gradients reach float32 parameters in float32."""

import pytest
import torch
from conftest import make_batch, rel_err

import alphapo


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_autocast_bf16_casts_head_like_linear(backend):
    weight, hidden, target, bias = make_batch(2, 9, 32, 64, torch.float32, seed=3)
    w32 = weight.clone().requires_grad_()
    h32 = hidden.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, aux = alphapo.alphapo_loss(w32, h32, target, bias, backend=backend)
    loss.backward()
    assert w32.grad.dtype == torch.float32 and h32.grad.dtype == torch.float32

    w16 = weight.bfloat16().requires_grad_()
    h16 = hidden.bfloat16().requires_grad_()
    loss16, _ = alphapo.alphapo_loss(w16, h16, target, bias.bfloat16(), backend=backend)
    loss16.backward()
    assert rel_err(loss, loss16) < 1e-6
    assert rel_err(w32.grad, w16.grad.float()) < 1e-2
    assert rel_err(h32.grad, h16.grad.float()) < 1e-2


def test_without_autocast_mixed_dtypes_are_refused():
    weight, hidden, target, bias = make_batch(1, 5, 16, 20, torch.float32)
    with pytest.raises(TypeError, match="lin_weight dtype"):
        alphapo.alphapo_loss(weight, hidden.bfloat16(), target, bias)
