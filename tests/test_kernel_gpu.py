"""GPU-only checks of the Triton backend (skipped without CUDA): bf16 parity at a slice of
a real model shape, bitwise determinism, and peak extra memory within the scratch budget,
on both paths (pair-chunked, recompute)."""

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


PATHS = ["pair-chunked", "recompute"]


@pytest.mark.parametrize("scratch", [None, 64 * 2**20], ids=["one-chunk", "several-chunks"])
@pytest.mark.parametrize("path", PATHS)
def test_bf16_error_within_torch_bf16_error(path, scratch):
    """Triton bf16 vs fp32: loss and grads within 1.5× of torch's own bf16 path's error
    (several chunks: grad_W accumulates over them in float32)."""
    batch = _bf16_case()
    weight, hidden, target, bias = batch
    dev = "cuda"

    def run(backend, dtype, **kw):
        W, h, b = (t.to(device=dev, dtype=dtype) for t in (weight, hidden, bias))
        fn = lambda W, h, b: alphapo.alphapo_loss(W, h, target.to(dev), b, backend=backend, **kw)  # noqa: E731
        return loss_and_grads(fn, W, h, b, seed=3)

    ref, ref_g = run("reference", torch.float32)
    torch_out, torch_g = run("reference", torch.bfloat16)
    out, g = run("triton", torch.bfloat16, path=path, scratch_bytes=scratch)
    assert rel_err(out, ref) <= 1.5 * rel_err(torch_out, ref) + 1e-4
    for name in ("hidden", "weight", "bias"):
        assert rel_err(g[name], ref_g[name]) <= 1.5 * rel_err(torch_g[name], ref_g[name]) + 1e-4, name


@pytest.mark.parametrize("path", PATHS)
def test_bitwise_deterministic(path):
    weight, hidden, target, bias = (t.cuda() if t is not None else t for t in _bf16_case(seed=1, V=8192, H=1024))
    weight, hidden, bias = (t.bfloat16() for t in (weight, hidden, bias))
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (weight, hidden, bias)]
        scratch = 2**20 if path == "recompute" else 8 * 2**20  # pair-chunked: a pair of 2 × 512 tokens fits
        loss, _ = alphapo.alphapo_loss(leaves[0], leaves[1], target, leaves[2], backend="triton",
                                       scratch_bytes=scratch, path=path)
        loss.backward()
        runs.append([loss.detach()] + [t.grad for t in leaves])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("scratch_mb", [16, 192])
def test_peak_extra_memory_recompute(scratch_mb):
    """Peak memory above inputs and gradients: dz slice + O(N·H) buffers, no N·V term."""
    V, H, B, T = 65536, 2048, 2, 1024
    weight = torch.randn(V, H, device="cuda", dtype=torch.bfloat16).mul_(0.02).requires_grad_()
    hidden = torch.randn(2 * B, T, H, device="cuda", dtype=torch.bfloat16).requires_grad_()
    target = torch.randint(0, V, (2 * B, T), device="cuda")
    N = target.numel()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss, _ = alphapo.alphapo_loss(weight, hidden, target, backend="triton", scratch_bytes=scratch_mb * 2**20,
                                   path="recompute")
    loss.backward()
    torch.cuda.synchronize()
    grads = weight.grad.numel() * 2 + hidden.grad.numel() * 2
    extra = torch.cuda.max_memory_allocated() - base - grads
    budget = scratch_mb * 2**20 + N * H * 4 + 16 * 2**20  # dz slice + fp32 grad_h accumulator + O(N) stats
    assert extra <= budget, f"extra {extra / 2**20:.0f} MiB > {budget / 2**20:.0f} MiB"
    assert extra < N * V * 2, "a logits-sized buffer was allocated"


@pytest.mark.parametrize("pairs_per_chunk", [1, 2])
def test_peak_extra_memory_pair_chunked(pairs_per_chunk):
    """Pair-chunked: one chunk of logits (≤ scratch_bytes) + the float32 grad_W
    accumulator (several chunks) + O(N·H); the budget holds 1 or 2 pairs of 2 × 1024."""
    V, H, B, T = 65536, 2048, 2, 1024
    weight = torch.randn(V, H, device="cuda", dtype=torch.bfloat16).mul_(0.02).requires_grad_()
    hidden = torch.randn(2 * B, T, H, device="cuda", dtype=torch.bfloat16).requires_grad_()
    target = torch.randint(0, V, (2 * B, T), device="cuda")
    N = target.numel()
    scratch = pairs_per_chunk * 2 * T * V * 2
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss_fn = alphapo.AlphaPOLoss(backend="triton", scratch_bytes=scratch)
    loss, _ = loss_fn(weight, hidden, target)
    loss.backward()
    torch.cuda.synchronize()
    assert loss_fn.last_path == "pair-chunked"
    grads = weight.grad.numel() * 2 + hidden.grad.numel() * 2
    extra = torch.cuda.max_memory_allocated() - base - grads
    accumulator = V * H * 4 if pairs_per_chunk < B else 0
    budget = scratch + accumulator + 3 * N * H * 2 + 16 * 2**20  # + chunk rows, dz·W, O(N) stats
    assert extra <= budget, f"extra {extra / 2**20:.0f} MiB > {budget / 2**20:.0f} MiB"
