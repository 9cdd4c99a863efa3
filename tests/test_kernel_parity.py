"""The Triton backend against the float64 reference: loss and every gradient.

Runs on CUDA when present, else in Triton's CPU interpreter (float32 and float16 only,
small odd shapes). Tolerances: float32 to 1e-5 relative; float16 per flash-attention's
rule, ``err_triton <= 2 * err_torch_fp16 + atol`` — no worse than PyTorch's own path in
the same dtype, both measured against float64.
"""

from triton_interp import device, triton_interpreter  # noqa: F401  (first: see its docstring)

import pytest
import torch
from conftest import TOL, assert_grads_close, loss_and_grads, make_batch, rel_err, upcast

import alphapo
from alphapo.kernels import fused

# (B, T, H, V): odd sizes that straddle the tile edges (interpreter tiles are 16×32×16).
SHAPES = [
    pytest.param((2, 13, 40, 150), id="B2-T13-H40-V150"),
    pytest.param((1, 9, 16, 31), id="B1-T9-H16-V31-V<tile"),
    pytest.param((3, 7, 80, 257), id="B3-T7-H80-V257"),
]

OPTIONS = [
    pytest.param(dict(alpha=0.25), id="alpha0.25"),
    pytest.param(dict(alpha=-1.0, label_smoothing=0.1), id="alpha-1-ls0.1"),
    pytest.param(dict(alpha=0.0, nll_weight=0.5), id="simpo-nll"),
    pytest.param(dict(alpha=2.0, loss_type="hinge"), id="alpha2-hinge"),
    pytest.param(dict(alpha=1.0, loss_type="ipo", average_log_prob=False, beta=0.1), id="alpha1-ipo-sum"),
]


def _loss(backend, options, target, ref_logps=(None, None), scratch_bytes=None):
    def fn(W, h, b):
        return alphapo.alphapo_loss(
            W, h, target, b, *ref_logps, backend=backend, scratch_bytes=scratch_bytes, **options
        )

    return fn


def _run(backend, options, batch, dtype, device, scratch_bytes=None, ref_logps=(None, None), seed=1):
    weight, hidden, target, bias = batch
    if backend == "reference":
        weight, hidden, bias = upcast(weight, hidden, bias)
        ref_logps = upcast(*ref_logps)
    else:
        weight, hidden, bias = (None if t is None else t.to(device=device, dtype=dtype) for t in (weight, hidden, bias))
        ref_logps = tuple(None if r is None else r.to(device) for r in ref_logps)
        target = target.to(device)
    return loss_and_grads(_loss(backend, options, target, ref_logps, scratch_bytes), weight, hidden, bias, seed=seed)


PATHS = [pytest.param("pair-chunked", id="pair-chunked"), pytest.param("recompute", id="recompute")]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("options", OPTIONS)
def test_fp32_matches_reference(shape, options, path, device):
    batch = make_batch(*shape, torch.float64, seed=sum(shape))
    ref, ref_grads = _run("reference", options, batch, torch.float64, "cpu")
    out, grads = _run("triton", dict(options, path=path), batch, torch.float32, device)
    assert rel_err(out, ref) < TOL[torch.float32]
    assert_grads_close(grads, ref_grads, TOL[torch.float32], f"triton fp32 {options} {path}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_fp16_no_worse_than_torch(bias, path, device):
    batch = make_batch(2, 13, 48, 200, torch.float64, bias=bias, seed=7)
    options = dict(alpha=0.25)
    ref, ref_grads = _run("reference", options, batch, torch.float64, "cpu")
    out, grads = _run("triton", dict(options, path=path), batch, torch.float16, device)
    base, base_grads = _run("torch", options, batch, torch.float16, "cpu")
    assert rel_err(out, ref) <= 2 * rel_err(base, ref) + 1e-4
    for name, g in ref_grads.items():
        if g is None:
            continue
        assert rel_err(grads[name], g) <= 2 * rel_err(base_grads[name], g) + 1e-4, name


@pytest.mark.parametrize("scratch_bytes", [1, 4 * 1024], ids=["one-tile-slices", "4KiB-slices"])
def test_several_backward_slices(scratch_bytes, device):
    """A small scratch budget forces the backward through several vocabulary slices."""
    batch = make_batch(2, 11, 24, 300, torch.float64, seed=3)
    options = dict(alpha=0.5, nll_weight=0.3)
    ref, ref_grads = _run("reference", options, batch, torch.float64, "cpu")
    out, grads = _run("triton", dict(options, path="recompute"), batch, torch.float32, device,
                      scratch_bytes=scratch_bytes)
    n_valid = int((batch[2] != -100).sum())
    assert fused.slice_columns(n_valid, 300, 4, scratch_bytes, 32) < 300  # really several slices
    assert rel_err(out, ref) < TOL[torch.float32]
    assert_grads_close(grads, ref_grads, TOL[torch.float32], f"scratch {scratch_bytes}")


def test_pair_chunks_of_unequal_pairs(device):
    """The pair-chunked path over several chunks whose pairs differ in length, a bias, the
    NLL term and label smoothing: every chunk's gradients are the batch's."""
    batch = make_batch(4, 12, 24, 130, torch.float64, seed=31)
    n = (batch[2] != -100).sum(1).tolist()
    pair = [n[j] + n[4 + j] for j in range(4)]
    assert len(set(pair)) > 1
    options = dict(alpha=0.5, nll_weight=0.3, label_smoothing=0.1, path="pair-chunked")
    scratch = max(pair) * 130 * 4  # the longest pair alone fills a chunk
    ref, ref_grads = _run("reference", dict(options, path="auto"), batch, torch.float64, "cpu")
    out, grads = _run("triton", options, batch, torch.float32, device, scratch_bytes=scratch)
    assert rel_err(out, ref) < TOL[torch.float32]
    assert_grads_close(grads, ref_grads, TOL[torch.float32], "pair chunks")


def test_reference_logps_dpo(device):
    """With reference log-probs, summed log-probs and alpha = 0 the loss is DPO."""
    batch = make_batch(2, 10, 32, 97, torch.float64, seed=11)
    gen = torch.Generator().manual_seed(0)
    ref_logps = (-20 * torch.rand(2, generator=gen, dtype=torch.float64), -20 * torch.rand(2, generator=gen, dtype=torch.float64))
    options = dict(alpha=0.0, beta=0.1, gamma=0.0, average_log_prob=False)
    ref, ref_grads = _run("reference", options, batch, torch.float64, "cpu", ref_logps=ref_logps)
    out, grads = _run("triton", options, batch, torch.float32, device, ref_logps=ref_logps)
    assert rel_err(out, ref) < TOL[torch.float32]
    assert_grads_close(grads, ref_grads, TOL[torch.float32], "dpo")


def test_sequence_logprobs_odd_rows(device):
    """The generic primitive: any number of rows, per-row upstream gradients."""
    weight, hidden, target, bias = make_batch(2, 12, 40, 120, torch.float64, seed=5)
    hidden, target = hidden[:3], target[:3]

    def run(dtype, dev, backend):
        W, h, b = (t.to(device=dev, dtype=dtype) for t in (weight, hidden, bias))
        return loss_and_grads(
            lambda W, h, b: alphapo.sequence_logprobs(h, W, target.to(dev), b, backend=backend), W, h, b, seed=2
        )

    ref, ref_grads = run(torch.float64, "cpu", "reference")
    out, grads = run(torch.float32, device, "triton")
    assert out.shape == (3,)
    assert rel_err(out, ref) < TOL[torch.float32]
    assert_grads_close(grads, ref_grads, TOL[torch.float32], "sequence_logprobs")


def test_long_prompts_and_padding(device):
    """Most positions ignored (long shared prompts, ragged padding): only valid rows count."""
    batch = make_batch(3, 24, 32, 90, torch.float64, prompt_len=18, seed=13)
    options = dict(alpha=0.25)
    ref, ref_grads = _run("reference", options, batch, torch.float64, "cpu")
    out, grads = _run("triton", options, batch, torch.float32, device)
    assert rel_err(out, ref) < TOL[torch.float32]
    assert_grads_close(grads, ref_grads, TOL[torch.float32], "long prompts")
    ignored = batch[2] == -100
    assert torch.all(grads["hidden"][ignored.to(grads["hidden"].device)] == 0)


def test_strided_inputs(device):
    """A transposed-storage weight and a sliced hidden: kernels honour strides."""
    weight, hidden, target, bias = make_batch(2, 9, 40, 70, torch.float64, seed=17)
    options = dict(alpha=0.25)
    ref, ref_grads = _run("reference", options, (weight, hidden, target, bias), torch.float64, "cpu")
    W = weight.to(device=device, dtype=torch.float32).t().contiguous().t()  # (V, H), strides (1, V)
    wide = torch.zeros(4, 9, 80, dtype=torch.float32, device=device)
    wide[..., ::2] = hidden.to(device=device, dtype=torch.float32)
    h = wide[..., ::2]  # non-contiguous last dimension
    assert W.stride() == (1, 70) and h.stride(-1) == 2
    out, grads = loss_and_grads(_loss("triton", options, target.to(device)), W, h, bias.float().to(device), seed=1)
    assert rel_err(out, ref) < TOL[torch.float32]
    assert_grads_close(grads, ref_grads, TOL[torch.float32], "strided")


@pytest.mark.parametrize("ragged", [True, False], ids=["ragged", "all-valid"])
def test_tma_forward_matches_reference(ragged, device, monkeypatch):
    """The persistent TMA forward (opt-in until measured on Hopper) gives the same loss
    and gradients as the reference; 16-bit inputs, the interpreter runs fp16."""
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA descriptors need sm_90+")
    monkeypatch.setenv("ALPHAPO_FWD_IMPL", "tma")
    half = torch.empty(200, 48, dtype=torch.float16, device=device)
    assert fused._use_tma(half, half, torch.device(device)), "the TMA path would not run"
    batch = make_batch(2, 13, 48, 200, torch.float64, ragged=ragged, prompt_len=None if ragged else 0, seed=23)
    options = dict(alpha=0.25, path="recompute")  # the TMA kernel is the recompute path's forward
    ref, ref_grads = _run("reference", options, batch, torch.float64, "cpu")
    base, base_grads = _run("torch", options, batch, torch.float16, "cpu")
    out, grads = _run("triton", options, batch, torch.float16, device)
    assert rel_err(out, ref) <= 2 * rel_err(base, ref) + 1e-4
    for name, g in ref_grads.items():
        assert rel_err(grads[name], g) <= 2 * rel_err(base_grads[name], g) + 1e-4, name


@pytest.mark.parametrize("filter_eps", [0.0, 1e-3], ids=["eps0-exact", "eps1e-3"])
def test_gradient_filtering(filter_eps, device, monkeypatch):
    """filter_eps skips grad_hidden work on dz tiles whose largest |dz| is <= eps.

    With eps = 0 only all-zero tiles are skipped: the result equals the unfiltered one.
    With a small eps on a peaked softmax, tiles really are skipped and grad_hidden stays
    within 1e-3 of the exact gradient (the rest is exact).
    """
    batch = make_batch(2, 16, 32, 600, torch.float64, seed=29, peak=8.0, scale=6.0)
    options = dict(alpha=0.25)
    # filtering is a recompute-path feature: compare with that path unfiltered
    exact, exact_grads = _run("triton", dict(options, path="recompute"), batch, torch.float32, device)
    skipped = []
    real = fused._grad_h_kernel

    class Counting:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                if kwargs.get("FILTER"):
                    tile_max = args[real.arg_names.index("tile_max_ptr")]
                    skipped.append(int((tile_max <= filter_eps).sum()))
                return real[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(fused, "_grad_h_kernel", Counting())
    weight, hidden, target, bias = batch
    W, h, b = (t.to(device=device, dtype=torch.float32) for t in (weight, hidden, bias))
    out, grads = loss_and_grads(
        lambda W, h, b: alphapo.alphapo_loss(W, h, target.to(device), b, backend="triton", filter_eps=filter_eps, **options),
        W, h, b, seed=1,
    )
    assert skipped, "the filtering path did not run"
    assert torch.equal(out, exact)
    assert torch.equal(grads["weight"], exact_grads["weight"]) and torch.equal(grads["bias"], exact_grads["bias"])
    if filter_eps == 0.0:
        assert torch.equal(grads["hidden"], exact_grads["hidden"])
    else:
        assert sum(skipped) > 0, "no tile was skipped: the test shape is not peaked enough"
        assert rel_err(grads["hidden"], exact_grads["hidden"]) < 1e-3


def test_filter_eps_needs_triton():
    weight, hidden, target, bias = make_batch(1, 4, 16, 20, torch.float32)
    with pytest.raises(ValueError, match="filter_eps"):
        alphapo.alphapo_loss(weight, hidden, target, bias, backend="torch", filter_eps=1e-3)


DPO_FAMILY = [
    pytest.param(dict(alpha=0.0, beta=0.1, gamma=0.0, average_log_prob=False, loss_type="ipo"), id="dpo-ipo"),
    pytest.param(dict(alpha=0.5, beta=0.1, average_log_prob=False, loss_type=["sigmoid", "sft", "bco_pair"],
                      loss_weights=[0.7, 0.2, 0.1], gamma=0.0), id="mpo-list"),
    pytest.param(dict(alpha=0.0, beta=0.2, gamma=0.0, average_log_prob=False, use_weighting=True), id="wpo"),
    pytest.param(dict(alpha=-0.5, beta=0.2, gamma=0.0, average_log_prob=False, ld_alpha=0.3,
                      loss_type="robust", label_smoothing=0.1), id="ld-robust"),
    pytest.param(dict(alpha=0.0, beta=0.1, gamma=0.0, average_log_prob=False, loss_type="discopop",
                      f_divergence_type="js_divergence"), id="discopop-js"),
    pytest.param(dict(alpha=0.0, beta=0.1, gamma=0.0, average_log_prob=False, loss_type="aot"), id="aot-recompute"),
]


@pytest.mark.parametrize("path", ["auto", "recompute"])
@pytest.mark.parametrize("options", DPO_FAMILY)
def test_dpo_family_and_metrics_match_reference(options, path, device):
    """TRL's loss family on the Triton kernels (reference log-probs, WPO's log Σp², LD-DPO's
    token weights, batch-coupled aot) and the token metrics the forward folds online:
    entropy and top-1 accuracy (float32, 1e-5) against the float64 reference."""
    batch = make_batch(3, 11, 24, 150, torch.float64, seed=41, peak=4.0)
    gen = torch.Generator().manual_seed(3)
    refs = tuple(-30 * torch.rand(3, generator=gen, dtype=torch.float64) for _ in range(2))
    ref, ref_grads = _run("reference", options, batch, torch.float64, "cpu", ref_logps=refs)
    out, grads = _run("triton", dict(options, path=path), batch, torch.float32, device, ref_logps=refs)
    assert rel_err(out, ref) < TOL[torch.float32]
    assert_grads_close(grads, ref_grads, TOL[torch.float32], f"{options}")
    weight, hidden, target, bias = batch
    _, aux = alphapo.alphapo_loss(*(t.to(device=device, dtype=torch.float32) for t in (weight, hidden)),
                                  target.to(device), bias.to(device=device, dtype=torch.float32),
                                  *(r.to(device) for r in refs), backend="triton", **options)
    _, want = alphapo.alphapo_loss(weight, hidden, target, bias, *refs, backend="reference", **options)
    for name in ("entropy", "mean_token_accuracy", "chosen_logits_mean", "chosen_rewards", "tangent_fraction"):
        torch.testing.assert_close(getattr(aux, name).cpu().double(), getattr(want, name).double(), rtol=1e-5,
                                   atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_reference_model_through_the_fused_path(device):
    """ref_hidden / ref_weight: the reference log-probs computed by the kernels (no grad)
    equal the reference's own, and so do loss and gradients."""
    batch = make_batch(2, 13, 24, 120, torch.float64, seed=43)
    ref_batch = make_batch(2, 13, 32, 120, torch.float64, seed=44)  # another model: its own H
    options = dict(alpha=0.0, beta=0.1, gamma=0.0, average_log_prob=False, ld_alpha=0.5)
    target = batch[2]

    def run(backend, dtype, dev):
        W, h, b = (t.to(device=dev, dtype=dtype) for t in (batch[0], batch[1], batch[3]))
        rW, rh = (t.to(device=dev, dtype=dtype) for t in (ref_batch[0], ref_batch[1]))
        return loss_and_grads(lambda W, h, b: alphapo.alphapo_loss(
            W, h, target.to(dev), b, ref_hidden=rh, ref_weight=rW, backend=backend, **options), W, h, b, seed=2)

    ref, ref_grads = run("reference", torch.float64, "cpu")
    out, grads = run("triton", torch.float32, device)
    assert rel_err(out, ref) < TOL[torch.float32]
    assert_grads_close(grads, ref_grads, TOL[torch.float32], "ref model")


@pytest.mark.parametrize("path", ["pair-chunked", "recompute"])
@pytest.mark.parametrize("frozen", ["head", "hidden"])
def test_frozen_inputs(frozen, path, device):
    """A frozen head (LoRA) or frozen hidden states: the other gradient still exact."""
    weight, hidden, target, bias = make_batch(2, 11, 24, 90, torch.float64, seed=47)
    grad = {"head": (False, True, False), "hidden": (True, False, True)}[frozen]
    options = dict(alpha=0.25, nll_weight=0.2)

    def run(backend, dtype, dev, **kw):
        leaves = [t.detach().to(device=dev, dtype=dtype).clone().requires_grad_(g)
                  for t, g in zip((weight, hidden, bias), grad)]
        loss, _ = alphapo.alphapo_loss(leaves[0], leaves[1], target.to(dev), leaves[2], backend=backend,
                                       **options, **kw)
        loss.backward()
        return loss, [t.grad for t in leaves]

    ref, ref_grads = run("reference", torch.float64, "cpu")
    out, grads = run("triton", torch.float32, device, path=path)
    assert rel_err(out, ref) < TOL[torch.float32]
    for g, want, needed in zip(grads, ref_grads, grad):
        assert (g is None) == (not needed)
        if needed:
            assert rel_err(g, want) < TOL[torch.float32]
