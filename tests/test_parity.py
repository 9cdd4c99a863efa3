"""Every backend against the materialised-logits reference: loss, every gradient, metrics.

The reference (:mod:`alphapo.reference`) runs in float64 on the upcast inputs; a backend
runs in the test's dtype on the original ones, and both backpropagate the same random
upstream gradient (:func:`conftest.loss_and_grads`). Tolerances are norm-wise relative
(:data:`conftest.TOL`): 1e-10 in float64, 1e-5 in float32. Shapes are odd on purpose
(T = 63, H = 80, a prime V standing in for 50257) and batches carry prompts and ragged
right-padding, so a kernel that assumes full tiles or reads ignored positions fails.
"""

from __future__ import annotations

import pytest
import torch

import alphapo
from conftest import (
    FUSED_BACKENDS,
    TOL,
    assert_grads_close,
    device_for,
    loss_and_grads,
    make_batch,
    rel_err,
    upcast,
)

# (B, T, H, V, make_batch options). peak = log V gives trained-model-like average
# log-probs (≈ -1.5) instead of -log V; see conftest.make_batch.
SHAPES = [
    pytest.param((2, 63, 80, 1031, {"peak": 6.9}), id="B2-T63-H80-V1031-ragged"),
    pytest.param((1, 9, 16, 50, {"prompt_len": 0, "ragged": False, "peak": 3.9}), id="B1-T9-H16-V50-dense"),
    pytest.param((3, 17, 24, 257, {"prompt_len": 12, "peak": 5.5}), id="B3-T17-H24-V257-longprompt"),
]

# Loss options: every loss type, the alpha grid of the issue, label smoothing, the NLL
# term, summed log-probs and reference log-probs (the DPO form included). beta is set per
# alpha so that u = beta·Δ - gamma stays O(1) on these batches (|Δ| reaches ~100 at
# alpha = 2, ~0.2 at alpha = -1): a saturated sigmoid, loss ≈ e^-u, turns an absolute
# error δu into a relative error δu of the loss, which no float32 backend could meet.
CONFIGS = [
    pytest.param(dict(alpha=-1.0, beta=10.0, gamma=0.5), id="alpha-1"),
    pytest.param(dict(alpha=0.0), id="alpha0-simpo"),
    pytest.param(dict(alpha=0.25), id="alpha0.25"),
    pytest.param(dict(alpha=1.0, beta=0.25, gamma=0.5), id="alpha1"),
    pytest.param(dict(alpha=2.0, beta=0.02, gamma=0.3), id="alpha2"),
    pytest.param(dict(alpha=0.25, loss_type="hinge"), id="hinge"),
    pytest.param(dict(alpha=0.25, loss_type="ipo", gamma=-1.0), id="ipo"),
    pytest.param(dict(alpha=1.0, label_smoothing=0.2), id="label-smoothing"),
    pytest.param(dict(alpha=0.25, nll_weight=0.7, gamma=0.0), id="nll-weight"),
    pytest.param(dict(alpha=0.05, beta=0.5, gamma=0.5, average_log_prob=False), id="summed-logps"),
    pytest.param(dict(alpha=0.5, ref=True), id="ref-logps"),
    pytest.param(dict(alpha=0.0, beta=0.1, gamma=0.0, average_log_prob=False, ref=True), id="dpo"),
    pytest.param(dict(alpha=0.5, beta=0.1, gamma=0.0, average_log_prob=False, ref=True), id="summed-ref-tangent"),
]

DTYPES = [pytest.param(torch.float64, id="fp64"), pytest.param(torch.float32, id="fp32")]
BIAS = [pytest.param(True, id="bias"), pytest.param(False, id="nobias")]


def ref_logps(B, average: bool, seed: int):
    """Reference-model log-probs of a plausible size for the chosen / rejected rows, float64."""
    gen = torch.Generator().manual_seed(1000 + seed)
    scale = 7.0 if average else 60.0
    return tuple(-scale * torch.rand(B, generator=gen, dtype=torch.float64) for _ in range(2))


def run_loss(backend, weight, hidden, target, bias, options, seed=1, **kwargs):
    """Loss and gradients of one backend under the shared random upstream gradient."""
    options = dict(options)
    refs = ref_logps(target.shape[0] // 2, options.get("average_log_prob", True), seed) if options.pop("ref", False) else (None, None)
    refs = tuple(r.to(hidden.device) for r in refs) if refs[0] is not None else refs

    def fn(W, h, b):
        return alphapo.alphapo_loss(W, h, target, b, *refs, backend=backend, **options, **kwargs)

    return loss_and_grads(fn, weight, hidden, bias, seed=seed)


def widest(backend):
    """The most precise dtype a backend takes: float64, or float32 for the Triton kernels."""
    return torch.float32 if backend == "triton" else torch.float64


PATHS = ("pair-chunked", "recompute")


def _backend_dtypes():
    """(backend, dtype, path) triples: each fused backend in float64 and float32 on both
    paths, and the reference itself in float32 (its float64 run is the expected value)."""
    triples = [pytest.param("reference", torch.float32, "auto", id="reference-fp32")]
    for bp in FUSED_BACKENDS:
        for dp in DTYPES:
            if bp.values[0] == "triton" and dp.values[0] == torch.float64:
                continue  # the Triton kernels take 16- and 32-bit floats
            for path in PATHS:
                triples.append(pytest.param(bp.values[0], dp.values[0], path, id=f"{bp.id}-{dp.id}-{path}",
                                            marks=bp.marks))
    return triples


@pytest.mark.parametrize("options", CONFIGS)
@pytest.mark.parametrize("bias", BIAS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend, dtype, path", _backend_dtypes())
def test_loss_and_grads_match_reference(backend, dtype, path, shape, bias, options):
    B, T, H, V, batch_opts = shape
    device = device_for(backend)
    weight, hidden, target, b = make_batch(B, T, H, V, dtype, bias=bias, device=device, seed=B * T, **batch_opts)
    loss, grads = run_loss(backend, weight, hidden, target, b, options, path=path)
    ref_loss, ref_grads = run_loss("reference", *upcast(weight, hidden), target, upcast(b)[0], options)

    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(loss)
    tol = TOL[dtype]
    err = rel_err(loss, ref_loss)
    assert err < tol, f"loss {loss.item():.10g} vs reference {ref_loss.item():.10g}: relative error {err:.3g}"
    for name, g in grads.items():
        if g is not None:
            assert g.dtype == dtype and g.device == hidden.device, f"grad {name}: {g.dtype} on {g.device}"
    assert_grads_close(grads, ref_grads, tol, what=f"{backend} {dtype}")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize(
    "scratch_bytes",
    [
        pytest.param(1, id="one-token-chunks"),
        pytest.param(7 * 257 * 4, id="7-token-chunks"),
        pytest.param(None, id="default"),
        pytest.param(2**40, id="one-chunk"),
    ],
)
def test_scratch_budget_does_not_change_the_result(backend, scratch_bytes):
    """Chunk boundaries fall anywhere, mid-sequence included; the result must not move."""
    device = device_for(backend)
    dtype = widest(backend)
    weight, hidden, target, b = make_batch(2, 31, 80, 257, dtype, device=device, seed=3, peak=5.5)
    options = dict(alpha=0.25)
    loss, grads = run_loss(backend, weight, hidden, target, b, options, scratch_bytes=scratch_bytes)
    ref_loss, ref_grads = run_loss("reference", *upcast(weight, hidden), target, upcast(b)[0], options)
    assert rel_err(loss, ref_loss) < TOL[dtype]
    assert_grads_close(grads, ref_grads, TOL[dtype], what=f"scratch_bytes={scratch_bytes}")


@pytest.mark.parametrize("average", [pytest.param(True, id="average"), pytest.param(False, id="sum")])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_sequence_logprobs_match_reference(backend, dtype, average):
    """Per-sequence log-probs under a random upstream vector, odd row count (rows need not pair)."""
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("the Triton kernels take 16- and 32-bit floats")
    device = device_for(backend)
    weight, hidden, target, b = make_batch(2, 63, 80, 1031, dtype, device=device, seed=5)
    hidden, target = hidden[:3], target[:3]  # 3 rows: sequence_logprobs takes any row count

    def fused(W, h, bb):
        return alphapo.sequence_logprobs(h, W, target, bb, average=average, backend=backend, scratch_bytes=4 * 1031 * 16)

    def reference(W, h, bb):
        return alphapo.sequence_logprobs(h, W, target, bb, average=average, backend="reference")

    out, grads = loss_and_grads(fused, weight, hidden, b, seed=7)
    ref, ref_grads = loss_and_grads(reference, *upcast(weight, hidden, b), seed=7)
    assert out.shape == (3,)
    assert rel_err(out, ref) < TOL[dtype]
    assert_grads_close(grads, ref_grads, TOL[dtype], what="sequence_logprobs")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("options", [CONFIGS[2], CONFIGS[9], CONFIGS[10]])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_metrics_match_reference(backend, options, path):
    """Every aux field of a fused backend equals the reference's (float64; Triton: float32),
    on inputs that require grad (the metrics must not carry a graph)."""
    device = device_for(backend)
    dtype = widest(backend)
    weight, hidden, target, b = make_batch(3, 31, 40, 509, dtype, device=device, seed=11)
    weight, hidden, b = (t.clone().requires_grad_() for t in (weight, hidden, b))
    opts = dict(options)
    refs = ref_logps(3, opts.get("average_log_prob", True), 0) if opts.pop("ref", False) else (None, None)
    refs = tuple(r.to(device) for r in refs) if refs[0] is not None else refs
    _, aux = alphapo.alphapo_loss(weight, hidden, target, b, *refs, backend=backend, path=path, **opts)
    _, ref_aux = alphapo.alphapo_loss(weight, hidden, target, b, *refs, backend="reference", **opts)
    for name, value in aux._asdict().items():
        expected = getattr(ref_aux, name)
        assert value.shape == expected.shape, name
        assert not value.requires_grad, name  # (the inputs require grad below too)
        rtol, atol = (1e-6, 1e-7) if dtype == torch.float64 else (1e-5, 1e-6)
        assert torch.allclose(value.double(), expected.double(), rtol=rtol, atol=atol), (name, value, expected)


@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_half_precision_no_worse_than_reference(backend, dtype):
    """In half precision a fused backend's error against float64 stays within twice the
    error of the reference run in the same half dtype (flash-attention's test rule)."""
    device = device_for(backend)
    weight, hidden, target, b = make_batch(2, 63, 80, 1031, dtype, device=device, seed=13)
    options = dict(alpha=0.25, nll_weight=0.3)
    exact, exact_grads = run_loss("reference", *upcast(weight, hidden), target, upcast(b)[0], options)
    half, half_grads = run_loss("reference", weight, hidden, target, b, options)
    fused, fused_grads = run_loss(backend, weight, hidden, target, b, options)
    atol = 1e-3
    assert rel_err(fused, exact) <= 2 * rel_err(half, exact) + atol
    for name in ("hidden", "weight", "bias"):
        assert fused_grads[name].dtype == dtype
        err_fused = rel_err(fused_grads[name], exact_grads[name])
        err_half = rel_err(half_grads[name], exact_grads[name])
        assert err_fused <= 2 * err_half + atol, f"grad {name}: {err_fused:.3g} vs reference-in-{dtype} {err_half:.3g}"
        assert err_fused < TOL[dtype], f"grad {name}: {err_fused:.3g}"


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_module_equals_functional(backend):
    """``AlphaPOLoss(...)(...)`` and ``alphapo_loss(..., **same)`` are one computation."""
    device = device_for(backend)
    weight, hidden, target, b = make_batch(2, 20, 16, 97, widest(backend), device=device, seed=17)
    options = dict(alpha=0.5, beta=1.5, gamma=0.3, label_smoothing=0.1, nll_weight=0.2)
    module = alphapo.AlphaPOLoss(**options, backend=backend)
    loss_m, aux_m = module(weight, hidden, target, b)
    loss_f, aux_f = alphapo.alphapo_loss(weight, hidden, target, b, **options, backend=backend)
    assert torch.equal(loss_m, loss_f)
    assert module.last_path == "recompute"  # nothing requires grad: the forward alone, no gradient formed
    for x, y in zip(aux_m, aux_f):
        assert torch.equal(x, y)


def test_auto_backend_on_cpu_is_torch():
    assert alphapo.resolve_backend("auto", torch.device("cpu")) == "torch"


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_real_vocabulary_size_fp32(backend):
    """GPT-2's V = 50257 (odd, not a multiple of any tile) in float32: the log-sum-exp over
    a real vocabulary keeps loss and gradients within 1e-5 of float64."""
    device = device_for(backend)
    weight, hidden, target, b = make_batch(2, 24, 64, 50257, torch.float32, device=device, seed=19, peak=10.8)
    options = dict(alpha=0.25, nll_weight=0.1)
    loss, grads = run_loss(backend, weight, hidden, target, b, options)
    ref_loss, ref_grads = run_loss("reference", *upcast(weight, hidden), target, upcast(b)[0], options)
    assert rel_err(loss, ref_loss) < TOL[torch.float32]
    assert_grads_close(grads, ref_grads, TOL[torch.float32], what="V=50257")
