"""The pair-chunked path (6·N·H·V, gradients formed in the forward): when it runs, what it
computes, and autograd's contract — on the torch backend (the Triton one runs the same
driver; see test_kernel_parity.py and test_kernel_memory.py).

Parity with the float64 reference over every loss option lives in test_parity.py (both
paths); here: the rule that picks the path, the fallback, work that is skipped when no
one needs it, upstream scalars, retained graphs, double backward, determinism, exact
gradient accumulation with the NLL term, and the float32 accumulation of grad_W.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import alphapo
from alphapo._pairchunk import budget_tokens, chunk_pairs
from conftest import TOL, assert_grads_close, loss_and_grads, make_batch, rel_err, upcast

OPTIONS = dict(alpha=0.25, nll_weight=0.3, label_smoothing=0.1)


def _leaves(weight, hidden, bias, grad=(True, True, True)):
    return [t.detach().clone().requires_grad_(g) for t, g in zip((weight, hidden, bias), grad)]


def _grads(loss_fn, batch, upstream=None, grad=(True, True, True)):
    weight, hidden, target, bias = batch
    W, h, b = _leaves(weight, hidden, bias, grad)
    loss, aux = loss_fn(W, h, target, b)
    loss.backward(upstream)
    return loss.detach(), W.grad, h.grad, b.grad


class MatmulRecorder(TorchDispatchMode):
    """Output shapes of every matrix product (mm / addmm) under the mode."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.split(".")[0] in ("mm", "addmm"):
            self.shapes.append(tuple(out.shape))
        return out


# ----------------------------------------------------------------------------- the rule


def test_chunk_pairs_packs_whole_pairs_in_order():
    # pairs of 5, 3, 7, 2 tokens (chosen + rejected) into chunks of at most 8 tokens
    n_host = [3, 1, 4, 1, 2, 2, 3, 1]
    assert chunk_pairs(n_host, 8) == [(0, 2), (2, 3), (3, 4)]
    assert chunk_pairs(n_host, 17) == [(0, 4)]
    assert chunk_pairs(n_host, 6) is None  # the pair of 7 tokens fits no chunk
    assert budget_tokens(8 * 100 * 4, 100, 4) == 8


MiB = 2**20


@pytest.mark.parametrize(
    "H, V, pairs, positions, path",
    [
        (512, 16384, 1, 1024, "pair-chunked"),  # the whole batch is one 128 MiB pair
        (512, 16384, 4, 256, "pair-chunked"),
        (4096, 32000, 4, 256, "pair-chunked"),  # one 62.5 MiB pair per 64 MiB chunk
        (4096, 32000, 2, 512, "recompute"),  # one pair would be half the batch's logits
        (4096, 32000, 1, 1024, "recompute"),  # a 250 MiB pair
        (896, 151936, 16, 64, "pair-chunked"),  # one 74 MiB pair per chunk of 1.2 GB
        (896, 151936, 4, 256, "recompute"),
    ],
)
def test_default_pair_budget_keeps_a_chunk_under_half_the_logits(H, V, pairs, positions, path):
    """The default budget: the longest pair within [64, 128] MiB, and within 40% of the
    batch's logits once they pass 128 MiB (float32, every position valid)."""
    from alphapo.chunked import default_pair_scratch

    per_token = V * 4
    pair, batch = 2 * positions * per_token, 2 * pairs * positions * per_token
    budget = default_pair_scratch(pair, batch)
    assert 64 * MiB <= budget <= 128 * MiB
    fits = chunk_pairs([positions] * (2 * pairs), budget_tokens(budget, V, 4)) is not None
    assert fits == (path == "pair-chunked")
    if fits and batch > 128 * MiB:
        assert budget <= max(0.4 * batch, 64 * MiB)


def test_auto_takes_the_pair_chunked_path_when_a_gradient_is_wanted():
    batch = make_batch(3, 17, 24, 101, torch.float32, seed=1)
    weight, hidden, target, bias = batch
    loss_fn = alphapo.AlphaPOLoss(backend="torch")
    W, h, b = _leaves(weight, hidden, bias)
    loss_fn(W, h, target, b)
    assert loss_fn.last_path == "pair-chunked"
    with torch.no_grad():
        loss_fn(W, h, target, b)
    assert loss_fn.last_path == "recompute"  # no gradient wanted: the forward alone
    loss_fn(weight, hidden, target, bias)  # nothing requires grad
    assert loss_fn.last_path == "recompute"
    reference = alphapo.AlphaPOLoss(backend="reference")
    reference(W, h, target, b)
    assert reference.last_path == "reference"


def test_a_pair_longer_than_the_budget_falls_back_to_recompute():
    batch = make_batch(3, 17, 24, 101, torch.float64, seed=2)
    n = (batch[2] != -100).sum(1).tolist()
    longest = max(n[j] + n[3 + j] for j in range(3))
    scratch = (longest - 1) * 101 * 8  # the longest pair does not fit
    auto = alphapo.AlphaPOLoss(backend="torch", scratch_bytes=scratch, **OPTIONS)
    out = _grads(auto, batch)
    assert auto.last_path == "recompute"
    ref = _grads(alphapo.AlphaPOLoss(backend="reference", **OPTIONS), batch)
    for x, y in zip(out, ref):
        assert rel_err(x, y) < TOL[torch.float64]
    forced = alphapo.AlphaPOLoss(backend="torch", scratch_bytes=scratch, path="pair-chunked")
    with pytest.raises(ValueError, match=r"scratch_bytes=.*path=\"auto\" or \"recompute\""):
        _grads(forced, batch)


def test_reference_logps_that_require_grad_take_the_recompute_path():
    """The pair-chunked path differentiates the policy only; a differentiable reference
    (unusual, but autograd allows it) gets its gradient through the recompute path."""
    weight, hidden, target, bias = make_batch(2, 11, 16, 53, torch.float64, seed=3)
    ref_w = (-5 * torch.rand(2, dtype=torch.float64)).requires_grad_()
    ref_l = (-5 * torch.rand(2, dtype=torch.float64)).requires_grad_()
    loss_fn = alphapo.AlphaPOLoss(backend="torch")
    loss, _ = loss_fn(weight, hidden.clone().requires_grad_(), target, bias, ref_w, ref_l)
    assert loss_fn.last_path == "recompute"
    (g_w,) = torch.autograd.grad(loss, ref_w)
    ref_loss, _ = alphapo.alphapo_loss(weight, hidden, target, bias, ref_w, ref_l, backend="reference")
    (want,) = torch.autograd.grad(ref_loss, ref_w)
    assert rel_err(g_w, want) < 1e-10


def test_path_option_is_checked():
    with pytest.raises(ValueError, match="path must be one of"):
        alphapo.AlphaPOLoss(path="fast")
    weight, hidden, target, bias = make_batch(1, 5, 8, 17, torch.float32)
    with pytest.raises(ValueError, match="path must be one of"):
        alphapo.alphapo_loss(weight, hidden, target, bias, path=None)


# ----------------------------------------------------------------------------- no work nobody asked for


def _products(batch, grad, path="pair-chunked"):
    weight, hidden, target, bias = batch
    leaves = _leaves(weight, hidden, bias, grad)
    rec = MatmulRecorder()
    with rec:
        loss, _ = alphapo.alphapo_loss(leaves[0], leaves[1], target, leaves[2], backend="torch", path=path)
        if loss.requires_grad:
            loss.backward()
    return rec.shapes, leaves


@pytest.mark.parametrize("path", ["pair-chunked", "recompute"])
def test_frozen_head_skips_the_grad_weight_gemm(path):
    """LoRA-style: weight and bias frozen: the logits GEMM and dz·W only (4·N·H·V)."""
    batch = make_batch(2, 13, 24, 97, torch.float32, seed=4)
    V, H = 97, 24
    full, _ = _products(batch, (True, True, True), path)
    frozen, leaves = _products(batch, (False, True, False), path)
    assert leaves[0].grad is None and leaves[1].grad is not None
    assert any(s == (V, H) for s in full)  # grad_W = dz^T h
    assert not any(s == (V, H) for s in frozen)
    assert len(frozen) == len(full) - sum(1 for s in full if s == (V, H))


def test_frozen_hidden_skips_the_grad_hidden_gemm():
    batch = make_batch(2, 13, 24, 97, torch.float32, seed=5)
    shapes, leaves = _products(batch, (True, False, True))
    n_valid = int((batch[2] != -100).sum())
    assert leaves[1].grad is None and leaves[0].grad is not None
    assert not any(s[-1] == 24 and s[0] <= n_valid and s != (97, 24) for s in shapes), shapes


def test_no_gradient_is_formed_without_grad_mode():
    batch = make_batch(2, 13, 24, 97, torch.float32, seed=6)
    with torch.no_grad():
        shapes, _ = _products(batch, (True, True, True), path="pair-chunked")
    assert shapes and all(s[-1] == 97 for s in shapes), f"only logit GEMMs expected: {shapes}"


# ----------------------------------------------------------------------------- autograd's contract


@pytest.mark.parametrize("scale", [0.0, 2.0, -1.5, 1 / 3], ids=["zero", "two", "negative", "third"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_upstream_scalar_scales_exactly(scale, dtype):
    batch = make_batch(2, 13, 24, 97, dtype, seed=7)
    loss_fn = alphapo.AlphaPOLoss(backend="torch", **OPTIONS)
    _, *unit = _grads(loss_fn, batch)
    _, *scaled = _grads(loss_fn, batch, upstream=torch.tensor(scale))
    assert loss_fn.last_path == "pair-chunked"
    for g1, gs in zip(unit, scaled):
        assert gs.dtype == g1.dtype
        assert torch.equal(gs, g1 * torch.tensor(scale)), "the upstream scalar must scale the saved gradients"


@pytest.mark.parametrize("path", ["pair-chunked", "recompute"])
def test_retained_graph_second_backward_accumulates_like_autograd(path):
    weight, hidden, target, bias = make_batch(2, 13, 24, 97, torch.float64, seed=8)

    def twice(backend, path="auto"):
        W, h, b = _leaves(weight, hidden, bias)
        loss, _ = alphapo.alphapo_loss(W, h, target, b, backend=backend, path=path, **OPTIONS)
        loss.backward(retain_graph=True)
        first = [t.grad.clone() for t in (W, h, b)]
        loss.backward(torch.tensor(0.5, dtype=loss.dtype))
        return first, [t.grad for t in (W, h, b)]

    first, second = twice("torch", path)
    ref_first, ref_second = twice("reference")
    for f, s, rf, rs in zip(first, second, ref_first, ref_second):
        assert rel_err(f, rf) < 1e-10 and rel_err(s, rs) < 1e-10
        assert torch.allclose(s, 1.5 * f, rtol=1e-12, atol=0)


@pytest.mark.parametrize("path", ["pair-chunked", "recompute"])
def test_double_backward_is_refused_clearly(path):
    weight, hidden, target, bias = make_batch(1, 7, 8, 31, torch.float64, seed=9)
    W, h, b = _leaves(weight, hidden, bias)
    loss, _ = alphapo.alphapo_loss(W, h, target, b, backend="torch", path=path)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, h, create_graph=True)


@pytest.mark.parametrize("path", ["pair-chunked", "recompute"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_deterministic(path, dtype):
    batch = make_batch(3, 17, 24, 101, dtype, seed=10)
    loss_fn = alphapo.AlphaPOLoss(backend="torch", path=path, scratch_bytes=40 * 101 * 4, **OPTIONS)
    a, b = _grads(loss_fn, batch), _grads(loss_fn, batch)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ----------------------------------------------------------------------------- gradient accumulation


@pytest.mark.parametrize("backend, path", [("torch", "pair-chunked"), ("torch", "recompute"), ("reference", "auto")])
def test_nll_num_tokens_makes_accumulation_exact(backend, path):
    """4 micro-batches, each loss / 4, with nll_num_tokens = the step's chosen tokens / 4,
    give the gradient of the whole batch in one call (float64: to rounding)."""
    B, k = 8, 4
    weight, hidden, target, bias = make_batch(B, 15, 16, 61, torch.float64, seed=11)
    options = dict(alpha=0.25, nll_weight=0.7)
    whole = _leaves(weight, hidden, bias)
    loss, _ = alphapo.alphapo_loss(whole[0], whole[1], target, whole[2], backend=backend, path=path, **options)
    loss.backward()

    chosen_tokens = (target[:B] != -100).sum()
    W, b = _leaves(weight, hidden, bias)[0::2]
    h = hidden.detach().clone().requires_grad_()
    m = B // k
    total = 0.0
    for i in range(k):
        rows = torch.cat([torch.arange(i * m, (i + 1) * m), torch.arange(B + i * m, B + (i + 1) * m)])
        micro, _ = alphapo.alphapo_loss(W, h[rows], target[rows], b, backend=backend, path=path,
                                        nll_num_tokens=chosen_tokens / k, **options)
        (micro / k).backward()
        total += float(micro.detach()) / k
    assert total == pytest.approx(float(loss), rel=1e-12)
    for got, want in ((W.grad, whole[0].grad), (h.grad, whole[1].grad), (b.grad, whole[2].grad)):
        assert rel_err(got, want) < 1e-12


def test_nll_num_tokens_is_checked():
    weight, hidden, target, bias = make_batch(1, 5, 8, 17, torch.float32)
    for bad in (0, -3, float("nan"), "12", True, torch.ones(2)):
        with pytest.raises(ValueError, match="nll_num_tokens"):
            alphapo.alphapo_loss(weight, hidden, target, bias, nll_num_tokens=bad)


# ----------------------------------------------------------------------------- grad_W accumulation on CPU


def test_bf16_grad_weight_over_several_chunks_within_torch_bf16_error():
    """On CPU a bf16 GEMM rounds its product: each chunk's dz^T h reaches the float32
    grad_W accumulator rounded once to bf16 (CUDA adds it unrounded, out_dtype=float32).
    Measured against float64 over 6 chunks: within 1.5× of torch's own bf16 error (the
    materialised reference run in bf16, one GEMM), on loss and every gradient."""
    B, T, H, V = 8, 24, 64, 512
    weight, hidden, target, bias = make_batch(B, T, H, V, torch.bfloat16, seed=12, peak=5.0)
    n = (target != -100).sum(1).tolist()
    pair = max(n[j] + n[B + j] for j in range(B))
    options = dict(alpha=0.25, nll_weight=0.3)
    exact = loss_and_grads(lambda W, h, b: alphapo.alphapo_loss(W, h, target, b, backend="reference", **options),
                           *upcast(weight, hidden, bias), seed=3)
    torch_bf16 = loss_and_grads(lambda W, h, b: alphapo.alphapo_loss(W, h, target, b, backend="reference", **options),
                                weight, hidden, bias, seed=3)
    loss_fn = alphapo.AlphaPOLoss(backend="torch", scratch_bytes=pair * V * 2, path="pair-chunked", **options)
    ours = loss_and_grads(lambda W, h, b: loss_fn(W, h, target, b), weight, hidden, bias, seed=3)
    assert len(chunk_pairs(n, pair)) >= 4  # several roundings of grad_W's partials
    assert rel_err(ours[0], exact[0]) <= 1.5 * rel_err(torch_bf16[0], exact[0]) + 1e-4
    for name in ("hidden", "weight", "bias"):
        err, base = rel_err(ours[1][name], exact[1][name]), rel_err(torch_bf16[1][name], exact[1][name])
        assert err <= 1.5 * base, f"grad {name}: {err:.3g} vs torch bf16 {base:.3g}"


def test_scratch_bytes_of_a_whole_batch_is_one_chunk():
    batch = make_batch(2, 13, 24, 97, torch.float32, seed=13)
    shapes, _ = _products(batch, (True, True, True))
    n_valid = int((batch[2] != -100).sum())
    assert (n_valid, 97) in shapes  # the default budget holds every pair at once here
    out = loss_and_grads(lambda W, h, b: alphapo.alphapo_loss(W, h, batch[2], b, backend="torch"),
                         batch[0], batch[1], batch[3])
    ref = loss_and_grads(lambda W, h, b: alphapo.alphapo_loss(W, h, batch[2], b, backend="reference"),
                         *upcast(batch[0], batch[1], batch[3]))
    assert rel_err(out[0], ref[0]) < TOL[torch.float32]
    assert_grads_close(out[1], ref[1], TOL[torch.float32], "one chunk")
