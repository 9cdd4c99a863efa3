"""Shared test helpers: a preference-batch factory, error measures and a gradient harness.

Every numerical test in the suite follows one recipe::

    weight, hidden, target, bias = make_batch(B, T, H, V, torch.float32)
    out, grads = loss_and_grads(lambda W, h, b: alphapo_loss(W, h, target, b, backend=...)[0],
                                weight, hidden, bias, seed=1)
    ref, ref_grads = loss_and_grads(..., *upcast(weight, hidden, bias), seed=1)   # float64 reference
    assert rel_err(out, ref) < tol

``loss_and_grads`` contracts the output with a random upstream gradient (the same one for
every dtype and backend given the same ``seed``), so a backward that is right only for
``grad_output == 1`` — or only for a uniform gradient over sequences — fails.

The helpers are backend-agnostic: the Triton tests parametrize ``backend="triton"`` (on
CUDA, or on CPU under ``TRITON_INTERPRET=1``) over the same factory.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable

import pytest
import torch


def _import_triton_for_the_interpreter():
    """Without CUDA, import Triton (and our kernels) once with ``TRITON_INTERPRET=1`` set.

    ``@triton.jit`` picks the interpreter at decoration time, Triton's own library
    functions included: a Triton first imported without the variable leaves JIT-compiled
    library functions that the interpreter cannot call ("Cannot call @triton.jit'd outside
    of the scope of a kernel"), whatever is set later. The variable is restored at once,
    so tests still see the environment they set themselves (see tests/triton_interp.py).
    """
    if torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        return
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401

        import alphapo.kernels.fused  # noqa: F401
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


_import_triton_for_the_interpreter()

IGNORE_INDEX = -100

# Norm-wise relative tolerances against a float64 reference (see ``rel_err``). float64
# backends differ from the reference only in summation order; float32 ones by float32
# rounding of the logits and of the chunked sums; half precisions by the GEMM's inputs.
TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models and tensors: a second thread only adds
    hand-off latency there (10x on the TRL loss tests)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def peaked_tiny_llama():
    """The TRL trainer tests' model: the character tokenizer and a one-layer tiny Llama
    (seed 0) whose head is scaled ×10, so softmaxes are peaked and rewards unequal — a
    check away from uniform logits. Returns ``(tokenizer, model)``."""
    from alphapo.training.modeling import tiny_llama
    from alphapo.training.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    torch.manual_seed(0)
    lm = tiny_llama(len(tok), tok, n_layer=1, n_embd=32, n_head=2)
    with torch.no_grad():
        lm.lm_head.weight.mul_(10)
    return tok, lm


def make_batch(
    B: int,
    T: int,
    H: int,
    V: int,
    dtype: torch.dtype = torch.float32,
    *,
    bias: bool = True,
    prompt_len: int | None = None,
    ragged: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
    scale: float = 1.0,
    peak: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
):
    """A random preference batch ``(weight (V, H), hidden (2B, T, H), target (2B, T), bias (V,) | None)``.

    Rows 0..B-1 are the chosen sequences, B..2B-1 the rejected ones (pair j = rows j and
    B + j). Pair j shares one prompt of length ``P_j`` (``prompt_len`` for every pair, or
    drawn in [0, T // 3] when None); its targets are ``ignore_index``. With ``ragged`` each
    row then keeps a random completion length in [1, T - P_j] and is right-padded with
    ``ignore_index``; without it every completion runs to T. Every row keeps >= 1 valid
    target, drawn uniformly from [0, V).

    Values: ``hidden ~ N(0, 1)``, ``weight ~ N(0, scale² / H)`` and ``bias ~ N(0, (scale/2)²)``,
    so logits are ``≈ N(0, scale²)`` whatever H: ``scale`` sets how peaked the softmax is.
    ``peak`` > 0 moves each valid position's hidden state along its target's weight row,
    ``h += peak · W_y / ‖W_y‖²``, which raises the target logit by exactly ``peak``: with
    ``peak ≈ log V`` the targets get probability ≈ 1/2 and average log-probs ≈ -1, as for
    a trained model (random targets under random logits sit at ≈ -log V, where large α
    blows the reward up to e^(α log V) and the loss saturates).
    Drawn in float64 on the CPU from ``seed`` then cast, so that a float32 and a float64
    batch with the same arguments hold the same numbers up to rounding. The float tensors
    are leaves with ``requires_grad=False``; ``loss_and_grads`` makes its own copies.
    """
    if prompt_len is not None and not 0 <= prompt_len < T:
        raise ValueError(f"prompt_len must lie in [0, T) = [0, {T}) so a completion token fits, got {prompt_len}")
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    weight = torch.randn(V, H, generator=gen, dtype=f64) * (scale / H**0.5)
    hidden = torch.randn(2 * B, T, H, generator=gen, dtype=f64)
    b = torch.randn(V, generator=gen, dtype=f64) * (scale / 2) if bias else None
    target = torch.randint(0, V, (2 * B, T), generator=gen)

    if prompt_len is None:
        prompts = torch.randint(0, T // 3 + 1, (B,), generator=gen)
    else:
        prompts = torch.full((B,), prompt_len)
    prompts = prompts.repeat(2)  # the chosen and the rejected answer share their prompt
    if ragged:
        room = T - prompts  # >= 1
        lengths = 1 + (torch.rand(2 * B, generator=gen, dtype=f64) * room).long().clamp(max=room - 1)
    else:
        lengths = T - prompts
    pos = torch.arange(T)
    valid = (pos >= prompts[:, None]) & (pos < (prompts + lengths)[:, None])
    if peak:
        w_y = weight[target]  # (2B, T, H)
        hidden = hidden + valid[..., None] * (peak * w_y / w_y.pow(2).sum(-1, keepdim=True))
    target = torch.where(valid, target, ignore_index)

    cast = dict(dtype=dtype, device=device)
    return (
        weight.to(**cast),
        hidden.to(**cast),
        target.to(device),
        b.to(**cast) if b is not None else None,
    )


def upcast(*tensors, dtype: torch.dtype = torch.float64):
    """The same tensors in float64 (None stays None): the inputs of the reference run."""
    return tuple(None if t is None else t.detach().to(dtype) for t in tensors)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error ``‖a - e‖₂ / ‖e‖₂`` in float64 (absolute when ``e == 0``)."""
    a = actual.detach().to(device="cpu", dtype=torch.float64)
    e = expected.detach().to(device="cpu", dtype=torch.float64)
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else diff


def upstream_like(out: torch.Tensor, seed: int) -> torch.Tensor:
    """A random upstream gradient for ``out``: N(0, 1) entries, or a scalar in ±[0.5, 2).

    A scalar is kept away from 0 (so gradients are not trivially small) and may be
    negative (so a backward that drops its sign fails). Same numbers for every dtype.
    """
    gen = torch.Generator().manual_seed(seed)
    if out.dim() == 0:
        mag = 0.5 + 1.5 * torch.rand((), generator=gen, dtype=torch.float64)
        sign = 1.0 if torch.rand((), generator=gen).item() < 0.5 else -1.0
        g = sign * mag
    else:
        g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    return g.to(dtype=out.dtype, device=out.device)


def loss_and_grads(
    fn: Callable,
    weight: torch.Tensor,
    hidden: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    seed: int = 0,
):
    """Run ``out = fn(weight, hidden, bias)`` on fresh leaf copies and backprop ``Σ g ⊙ out``.

    ``fn`` returns a tensor (a scalar loss or per-sequence values such as
    :func:`alphapo.sequence_logprobs`) or a tuple whose first item is that tensor (the
    ``(loss, aux)`` of :func:`alphapo.alphapo_loss`). ``g`` is :func:`upstream_like`
    ``(out, seed)``. Returns ``(out detached, {"hidden", "weight", "bias"} gradients)``;
    ``"bias"`` is None when ``bias`` is.
    """
    leaves = {
        name: (t.detach().clone().requires_grad_(True) if t is not None else None)
        for name, t in (("weight", weight), ("hidden", hidden), ("bias", bias))
    }
    result = fn(leaves["weight"], leaves["hidden"], leaves["bias"])
    out = result[0] if isinstance(result, tuple) else result
    g = upstream_like(out, seed)
    (out * g).sum().backward()
    grads = {name: (t.grad if t is not None else None) for name, t in leaves.items()}
    for name, t in leaves.items():
        if t is not None:
            assert grads[name] is not None, f"no gradient reached {name}"
    return out.detach(), grads


def assert_grads_close(grads: dict, ref_grads: dict, tol: float, what: str = ""):
    """Every gradient within ``tol`` norm-wise relative error of the reference's."""
    for name, ref in ref_grads.items():
        got = grads[name]
        if ref is None:
            assert got is None, f"{what}: unexpected gradient for {name}"
            continue
        err = rel_err(got, ref)
        assert err < tol, f"{what}: grad {name} relative error {err:.3g} >= {tol:g}"


# Backends other than the reference. "triton" runs on CUDA here (the interpreter tests,
# TRITON_INTERPRET=1 on small shapes, live with the kernels' own tests: the full parity
# matrix is too slow for the interpreter).
def triton_runnable() -> bool:
    if importlib.util.find_spec("triton") is None or importlib.util.find_spec("alphapo.kernels.fused") is None:
        return False
    return torch.cuda.is_available()


FUSED_BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param(
        "triton",
        id="triton",
        marks=pytest.mark.skipif(not triton_runnable(), reason="triton backend: needs CUDA and alphapo.kernels.fused"),
    ),
]


def device_for(backend: str) -> str:
    """Where a backend's parity tests run: the Triton kernels on CUDA, the rest on CPU."""
    return "cuda" if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
