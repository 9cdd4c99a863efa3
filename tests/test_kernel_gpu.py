"""GPU-only checks of the Triton backend (skipped without CUDA): bf16 parity at a slice of
a real model shape, bitwise determinism, and peak extra memory within the scratch budget."""

import pytest
import torch
from conftest import loss_and_grads, make_batch, rel_err, upcast

import alphapo

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _bf16_case(seed=0, V=32768, H=4096):
    """A slice of the Llama-3-8B head (H = 4096, V cut to 32k) over 2 pairs × 512 positions."""
    return make_batch(2, 512, H, V, torch.float64, seed=seed, prompt_len=128)


def test_bf16_error_within_torch_bf16_error():
    """Triton bf16 vs fp32: loss and grads within 1.5× of torch's own bf16 path's error."""
    batch = _bf16_case()
    weight, hidden, target, bias = batch
    dev = "cuda"

    def run(backend, dtype):
        W, h, b = (t.to(device=dev, dtype=dtype) for t in (weight, hidden, bias))
        fn = lambda W, h, b: alphapo.alphapo_loss(W, h, target.to(dev), b, backend=backend)  # noqa: E731
        return loss_and_grads(fn, W, h, b, seed=3)

    ref, ref_g = run("reference", torch.float32)
    torch_out, torch_g = run("reference", torch.bfloat16)
    out, g = run("triton", torch.bfloat16)
    assert rel_err(out, ref) <= 1.5 * rel_err(torch_out, ref) + 1e-4
    for name in ("hidden", "weight", "bias"):
        assert rel_err(g[name], ref_g[name]) <= 1.5 * rel_err(torch_g[name], ref_g[name]) + 1e-4, name


def test_bitwise_deterministic():
    weight, hidden, target, bias = (t.cuda() if t is not None else t for t in _bf16_case(seed=1, V=8192, H=1024))
    weight, hidden, bias = (t.bfloat16() for t in (weight, hidden, bias))
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (weight, hidden, bias)]
        loss, _ = alphapo.alphapo_loss(leaves[0], leaves[1], target, leaves[2], backend="triton", scratch_bytes=2**20)
        loss.backward()
        runs.append([loss.detach()] + [t.grad for t in leaves])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("scratch_mb", [16, 192])
def test_peak_extra_memory(scratch_mb):
    """Peak memory above inputs and gradients: dz slice + O(N·H) buffers, no N·V term."""
    V, H, B, T = 65536, 2048, 2, 1024
    weight = torch.randn(V, H, device="cuda", dtype=torch.bfloat16).mul_(0.02).requires_grad_()
    hidden = torch.randn(2 * B, T, H, device="cuda", dtype=torch.bfloat16).requires_grad_()
    target = torch.randint(0, V, (2 * B, T), device="cuda")
    N = target.numel()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss, _ = alphapo.alphapo_loss(weight, hidden, target, backend="triton", scratch_bytes=scratch_mb * 2**20)
    loss.backward()
    torch.cuda.synchronize()
    grads = weight.grad.numel() * 2 + hidden.grad.numel() * 2
    extra = torch.cuda.max_memory_allocated() - base - grads
    budget = scratch_mb * 2**20 + N * H * 4 + 16 * 2**20  # dz slice + fp32 grad_h accumulator + O(N) stats
    assert extra <= budget, f"extra {extra / 2**20:.0f} MiB > {budget / 2**20:.0f} MiB"
    assert extra < N * V * 2, "a logits-sized buffer was allocated"
