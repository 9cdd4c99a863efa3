"""pytest-benchmark front end: ``pytest benchmarks/ --benchmark-only [--bench-preset gpu]``.

One benchmark per provider × case times forward+backward (the loss and its gradients
w.r.t. hidden and weight); ``extra_info`` carries n_valid, H, V, the provider's α, its
peak memory above inputs and gradients, and its error against the exact reference,
which is also asserted (per dtype), so a fast wrong provider fails instead of winning.
``python -m benchmarks`` measures the same things with percentiles, the floor and the
per-process CPU memory, and writes the committed tables.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import harness, providers as P
from benchmarks.cases import IGNORE_INDEX, make_batch
from benchmarks.conftest import bench_device

# Norm-wise relative error allowed against the exact reference: float32 differs by
# summation order; bfloat16 by its 8-bit mantissa (CCE's gradient filter adds ~1e-2 on
# grad_hidden, DESIGN.md §3).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@pytest.fixture(scope="module")
def prepared(bench_case, bench_dtype):
    """The case's batch and its references, built once per case (module scope)."""
    device = bench_device()
    batch = make_batch(bench_case, device, bench_dtype)
    refs = {}
    if bench_case.accuracy:
        acc = torch.float32 if device.type == "cuda" else torch.float64
        refs = harness.accuracy_reference(batch.weight, batch.hidden, batch.target, [0.0, P.ALPHA], acc)
    return batch, refs


def test_fwd_bwd(benchmark, bench_case, provider, prepared, bench_dtype):
    device = bench_device()
    try:
        fn = P.build(provider, P.BuildOptions(device, bench_dtype))
    except P.Unavailable as exc:
        pytest.skip(str(exc))
    batch, refs = prepared
    w = batch.weight.detach().requires_grad_()
    h = batch.hidden.detach().requires_grad_()

    def step():
        loss = fn(w, h, batch.target)
        grads = torch.autograd.grad(loss, (h, w))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss, grads

    step()  # compile / autotune outside the timing
    peak = (lambda f: harness.gpu_peak_bytes(f, device)) if device.type == "cuda" else harness.cpu_peak_bytes
    (loss, (grad_h, grad_w)), peak_bytes = peak(step)
    benchmark.pedantic(step, rounds=5 if device.type == "cuda" else 3, warmup_rounds=1, iterations=1)

    n_valid = int((batch.target != IGNORE_INDEX).sum())
    grad_bytes = h.numel() * h.element_size() + w.numel() * w.element_size()
    info = {
        "provider": provider, "alpha": P.PROVIDERS[provider].alpha, "case": bench_case.id, "n_valid": n_valid,
        "H": bench_case.H, "V": bench_case.V, "dtype": str(bench_dtype), "flop": 8 * n_valid * bench_case.H * bench_case.V,
        "peak_mem_mb": max(0, peak_bytes - grad_bytes) / 2**20,
    }  # fmt: skip
    ref = refs.get(P.PROVIDERS[provider].alpha)
    if ref is not None:
        info.update(
            loss_rel_err=harness.rel_err(loss, ref.loss),
            grad_h_rel_err=harness.rel_err(grad_h, ref.grad_h),
            grad_w_rel_err=harness.rel_err(grad_w, ref.grad_w),
        )
    benchmark.extra_info.update(info)
    if ref is not None:
        tol = TOLERANCE[bench_dtype]
        for key in ("loss_rel_err", "grad_h_rel_err", "grad_w_rel_err"):
            assert info[key] < tol, f"{provider} on {bench_case.id}: {key} = {info[key]:.3g} >= {tol:g}"
