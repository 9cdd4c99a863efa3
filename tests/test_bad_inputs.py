"""One test per bad input or option: the exception type, and a message naming the culprit.

A wrong shape, dtype or target id must fail at the API edge with an error that says which
argument is wrong, never deep inside a GEMM or as a NaN loss. Every input check runs for
the reference and for the fused backends alike (they share :mod:`alphapo._validation`).
"""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch

import alphapo
from conftest import IGNORE_INDEX, make_batch

BACKENDS = [pytest.param("reference", id="reference"), pytest.param("torch", id="torch")]
B, T, H, V = 2, 7, 8, 19


@pytest.fixture
def batch():
    return make_batch(B, T, H, V, torch.float32, seed=41)


def call(backend, weight, hidden, target, bias=None, ref_w=None, ref_l=None, **options):
    return alphapo.alphapo_loss(weight, hidden, target, bias, ref_w, ref_l, backend=backend, **options)


# ------------------------------------------------------------------------ inputs


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_number_of_rows(backend, batch):
    weight, hidden, target, bias = batch
    with pytest.raises(ValueError, match=r"hidden must hold an even, non-zero number of rows.*got 3"):
        call(backend, weight, hidden[:3], target[:3], bias)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rows(backend, batch):
    weight, hidden, target, bias = batch
    with pytest.raises(ValueError, match=r"hidden must hold an even, non-zero number of rows.*got 0"):
        call(backend, weight, hidden[:0], target[:0], bias)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_not_three_dimensional(backend, batch):
    weight, hidden, target, bias = batch
    with pytest.raises(ValueError, match=r"hidden must have shape \(2B, T, H\)"):
        call(backend, weight, hidden.reshape(-1, H), target, bias)


@pytest.mark.parametrize(
    "bad_target",
    [
        pytest.param(lambda y: y[:, :-1], id="short-T"),
        pytest.param(lambda y: y[:2], id="fewer-rows"),
        pytest.param(lambda y: y.reshape(-1), id="flat"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_target_shape_mismatch(backend, batch, bad_target):
    weight, hidden, target, bias = batch
    with pytest.raises(ValueError, match=r"target must have shape \(2B, T\)"):
        call(backend, weight, hidden, bad_target(target), bias)


@pytest.mark.parametrize(
    "bad_weight",
    [
        pytest.param(lambda w: w[:, :-1], id="wrong-H"),
        pytest.param(lambda w: w.t(), id="transposed"),
        pytest.param(lambda w: w[None], id="3d"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_shape_mismatch(backend, batch, bad_weight):
    weight, hidden, target, bias = batch
    with pytest.raises(ValueError, match=r"lin_weight must have shape \(V, H\)"):
        call(backend, bad_weight(weight), hidden, target, bias)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_shape_mismatch(backend, batch):
    weight, hidden, target, bias = batch
    with pytest.raises(ValueError, match=r"bias must be None or a tensor of shape \(V,\)"):
        call(backend, weight, hidden, target, bias[:-1])


@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float32, id="float"), pytest.param(torch.bool, id="bool")]
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_integer_target(backend, batch, dtype):
    weight, hidden, target, bias = batch
    with pytest.raises(TypeError, match=r"target must be an integer tensor"):
        call(backend, weight, hidden, target.clamp(min=0).to(dtype), bias)


@pytest.mark.parametrize(
    "bad_id",
    [pytest.param(V, id="V"), pytest.param(10 * V, id="10V"), pytest.param(-1, id="minus1"), pytest.param(IGNORE_INDEX - 1, id="minus101")],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_target_outside_vocabulary(backend, batch, bad_id):
    weight, hidden, target, bias = batch
    target = target.clone()
    target[1, -1] = bad_id  # a padding position of row 1 or a valid one: either way not ignore_index
    with pytest.raises(ValueError, match=rf"target holds ids outside \[0, V\) = \[0, {V}\).*\[{bad_id}\]"):
        call(backend, weight, hidden, target, bias)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_ignore_index_is_a_bad_id_under_another_ignore_index(backend, batch):
    """With ``ignore_index=-1``, a leftover -100 is an out-of-range id, not padding."""
    weight, hidden, target, bias = batch
    with pytest.raises(ValueError, match=r"target holds ids outside .*ignore_index \(-1\)"):
        call(backend, weight, hidden, target, bias, ignore_index=-1)


@pytest.mark.parametrize("row", [pytest.param(0, id="chosen"), pytest.param(2 * B - 1, id="rejected")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_with_every_target_ignored(backend, batch, row):
    weight, hidden, target, bias = batch
    target = target.clone()
    target[row] = IGNORE_INDEX
    with pytest.raises(ValueError, match=rf"target rows \[{row}\] have no valid tokens"):
        call(backend, weight, hidden, target, bias)


@pytest.mark.parametrize(
    "which, match",
    [
        pytest.param("weight", r"lin_weight dtype torch.float64 must match hidden dtype torch.float32", id="weight"),
        pytest.param("bias", r"bias dtype torch.float64 must match hidden dtype torch.float32", id="bias"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mismatched_dtypes(backend, batch, which, match):
    weight, hidden, target, bias = batch
    if which == "weight":
        weight = weight.double()
    else:
        bias = bias.double()
    with pytest.raises(TypeError, match=match):
        call(backend, weight, hidden, target, bias)


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_hidden(backend, batch):
    weight, hidden, target, bias = batch
    with pytest.raises(TypeError, match=r"hidden must be a floating tensor"):
        call(backend, weight.long(), hidden.long(), target, None)


@pytest.mark.parametrize("which", ["hidden", "lin_weight", "target", "bias"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mismatched_devices(backend, batch, which):
    """One input on the "meta" device (no GPU needed): refused before any computation,
    with the message naming the argument that sits on it."""
    weight, hidden, target, bias = batch
    args = dict(hidden=hidden, lin_weight=weight, target=target, bias=bias)
    args[which] = args[which].to("meta")
    with pytest.raises(ValueError, match=rf"all inputs must be on one device, got .*{which} on meta"):
        call(backend, args["lin_weight"], args["hidden"], args["target"], args["bias"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_logps_on_another_device(backend, batch):
    weight, hidden, target, bias = batch
    ref = torch.zeros(B, device="meta")
    with pytest.raises(ValueError, match=r"one device"):
        call(backend, weight, hidden, target, bias, ref, torch.zeros(B))


@pytest.mark.parametrize(
    "which, shape",
    [
        pytest.param("ref_chosen_logps", (B + 1,), id="chosen-too-long"),
        pytest.param("ref_rejected_logps", (B, 1), id="rejected-2d"),
        pytest.param("ref_chosen_logps", (2 * B,), id="chosen-all-rows"),
        pytest.param("ref_rejected_logps", (), id="rejected-scalar"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_logps_of_the_wrong_shape(backend, batch, which, shape):
    weight, hidden, target, bias = batch
    refs = {"ref_chosen_logps": torch.zeros(B), "ref_rejected_logps": torch.zeros(B)}
    refs[which] = torch.zeros(shape)
    with pytest.raises(ValueError, match=rf"{which} must be a tensor of shape \(B,\) = \({B},\)"):
        call(backend, weight, hidden, target, bias, refs["ref_chosen_logps"], refs["ref_rejected_logps"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_one_reference_logps(backend, batch):
    weight, hidden, target, bias = batch
    with pytest.raises(ValueError, match=r"ref_chosen_logps and ref_rejected_logps must be given together"):
        call(backend, weight, hidden, target, bias, torch.zeros(B), None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_reference_logps(backend, batch):
    weight, hidden, target, bias = batch
    with pytest.raises(TypeError, match=r"ref_chosen_logps must be a floating tensor"):
        call(backend, weight, hidden, target, bias, torch.zeros(B, dtype=torch.long), torch.zeros(B))


@pytest.mark.parametrize("backend", BACKENDS)
def test_not_a_tensor(backend, batch):
    weight, hidden, target, bias = batch
    with pytest.raises(TypeError, match=r"target must be a torch.Tensor, got list"):
        call(backend, weight, hidden, target.tolist(), bias)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_logprobs_checks_its_inputs_too(backend, batch):
    """sequence_logprobs takes any row count but the same checks otherwise."""
    weight, hidden, target, bias = batch
    out = alphapo.sequence_logprobs(hidden[:3], weight, target[:3], bias, backend=backend)
    assert out.shape == (3,)
    bad = target.clone()
    bad[0] = IGNORE_INDEX
    with pytest.raises(ValueError, match=r"target rows \[0\] have no valid tokens"):
        alphapo.sequence_logprobs(hidden, weight, bad, bias, backend=backend)
    with pytest.raises(ValueError, match=r"lin_weight must have shape \(V, H\)"):
        alphapo.sequence_logprobs(hidden, weight[:, :-1], target, bias, backend=backend)


# ----------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "options, error, match",
    [
        pytest.param(dict(loss_type="dpo"), ValueError, r"loss_type must be one of .*'dpo'", id="unknown-loss-type"),
        pytest.param(dict(beta=0.0), ValueError, r"beta must be > 0, got 0", id="beta-zero"),
        pytest.param(dict(beta=-1.0), ValueError, r"beta must be > 0, got -1", id="beta-negative"),
        pytest.param(dict(label_smoothing=-0.1), ValueError, r"label_smoothing must lie in \[0, 0.5\]", id="smoothing-negative"),
        pytest.param(dict(label_smoothing=0.6), ValueError, r"label_smoothing must lie in \[0, 0.5\]", id="smoothing-above-half"),
        pytest.param(dict(nll_weight=-0.5), ValueError, r"nll_weight must be >= 0", id="nll-weight-negative"),
        pytest.param(dict(alpha=float("nan")), ValueError, r"alpha must be a finite number", id="alpha-nan"),
        pytest.param(dict(gamma=float("inf")), ValueError, r"gamma must be a finite number", id="gamma-inf"),
        pytest.param(dict(ignore_index=-100.0), ValueError, r"ignore_index must be an int", id="float-ignore-index"),
        pytest.param(dict(backend="cuda"), ValueError, r"backend must be one of .*'cuda'", id="unknown-backend"),
        pytest.param(dict(scratch_bytes=0), ValueError, r"scratch_bytes must be a positive byte count", id="scratch-zero"),
    ],
)
def test_bad_options_rejected_by_the_module(options, error, match):
    """``AlphaPOLoss(...)`` refuses a bad option when it is built, before any data."""
    with pytest.raises(error, match=match):
        alphapo.AlphaPOLoss(**options)


@pytest.mark.parametrize(
    "options, match",
    [
        pytest.param(dict(loss_type="simpo"), r"loss_type must be one of", id="unknown-loss-type"),
        pytest.param(dict(beta=0.0), r"beta must be > 0", id="beta-zero"),
        pytest.param(dict(label_smoothing=1.0), r"label_smoothing must lie in \[0, 0.5\]", id="smoothing"),
        pytest.param(dict(backend="jax"), r"backend must be one of", id="unknown-backend"),
    ],
)
def test_bad_options_rejected_by_the_function(batch, options, match):
    weight, hidden, target, bias = batch
    with pytest.raises(ValueError, match=match):
        alphapo.alphapo_loss(weight, hidden, target, bias, **options)


def test_sequence_logprobs_unknown_backend(batch):
    weight, hidden, target, bias = batch
    with pytest.raises(ValueError, match=r"backend must be one of"):
        alphapo.sequence_logprobs(hidden, weight, target, bias, backend="fast")


def test_triton_backend_refuses_cpu_tensors(batch, monkeypatch):
    """Outside the interpreter the Triton backend needs CUDA, and says what to use instead."""
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    weight, hidden, target, bias = batch
    with pytest.raises(RuntimeError, match=r'backend="triton" runs on CUDA tensors.*backend="torch"'):
        alphapo.alphapo_loss(weight, hidden, target, bias, backend="triton")


def test_process_group_needs_a_fused_backend(batch):
    weight, hidden, target, bias = batch
    with pytest.raises(ValueError, match=r"process_group .* needs backend"):
        alphapo.alphapo_loss(weight, hidden, target, bias, backend="reference", process_group=object())


# ----------------------------------------------------------------------- numbers and flags


def _python_number(v):
    if isinstance(v, (Decimal, Fraction)):
        return float(v)
    return v.item() if hasattr(v, "item") else v


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(dict(alpha=np.float32(0.25)), id="numpy-float32-alpha"),
        pytest.param(dict(beta=np.float64(2.5), gamma=np.int64(1)), id="numpy-beta-gamma"),
        pytest.param(dict(alpha=1), id="int-alpha"),
        pytest.param(dict(alpha=torch.tensor(0.25)), id="0-dim-tensor-alpha"),
        pytest.param(dict(beta=np.array([2.5])), id="one-element-array-beta"),
        pytest.param(dict(alpha=Decimal("0.25"), gamma=Fraction(11, 8)), id="decimal-fraction"),
        pytest.param(dict(average_log_prob=np.bool_(False), gamma=0.0), id="numpy-bool"),
        pytest.param(dict(ignore_index=np.int64(-100)), id="numpy-int-ignore-index"),
    ],
)
def test_real_numbers_of_any_numeric_type_are_accepted(batch, options):
    weight, hidden, target, bias = batch
    loss, _ = alphapo.alphapo_loss(weight, hidden, target, bias, **options)
    reference, _ = alphapo.alphapo_loss(weight, hidden, target, bias,
                                        **{k: _python_number(v) for k, v in options.items()})
    assert torch.equal(loss, reference)


@pytest.mark.parametrize(
    "options, match",
    [
        pytest.param(dict(alpha=True), r"alpha must be a finite number \(not a bool\), got True", id="bool-alpha"),
        pytest.param(dict(beta=np.bool_(True)), r"beta must be a finite number \(not a bool\)", id="numpy-bool-beta"),
        pytest.param(dict(alpha=torch.tensor(True)), r"alpha must be a finite number, got a torch.bool tensor",
                     id="bool-tensor-alpha"),
        pytest.param(dict(alpha=torch.tensor([0.1, 0.2])), r"alpha must be a finite number, got Tensor", id="tensor"),
        pytest.param(dict(alpha="0.25"), r"alpha must be a finite number, got str '0.25'", id="str-alpha"),
        pytest.param(dict(alpha=Decimal("NaN")), r"alpha must be a finite number, got nan", id="decimal-nan"),
        pytest.param(dict(average_log_prob="no"), r"average_log_prob must be True or False, got 'no'", id="str-flag"),
        pytest.param(dict(average_log_prob=1), r"average_log_prob must be True or False, got 1", id="int-flag"),
        pytest.param(dict(use_weighting="yes"), r"use_weighting must be True or False", id="str-weighting"),
        pytest.param(dict(ignore_index=True), r"ignore_index must be an int", id="bool-ignore-index"),
        pytest.param(dict(check_finite="no"), r"check_finite must be True or False", id="str-check-finite"),
    ],
)
def test_bools_and_non_bools_where_they_do_not_belong(options, match):
    with pytest.raises(ValueError, match=match):
        alphapo.AlphaPOLoss(**options)


@pytest.mark.parametrize(
    "options, match",
    [
        pytest.param(dict(loss_type="hinge", label_smoothing=0.1), r"label_smoothing=0.1 would be ignored by loss_type 'hinge'", id="hinge"),
        pytest.param(dict(loss_type="ipo", label_smoothing=0.1), r"would be ignored by loss_type 'ipo'", id="ipo"),
        pytest.param(dict(loss_type="nca_pair", gamma=0.5), r"gamma .* has no place in loss_type 'nca_pair'", id="gamma-no-margin"),
        pytest.param(dict(loss_type="exo_pair"), r"exo_pair.* needs label_smoothing > 0", id="exo-needs-eps"),
        pytest.param(dict(loss_type="robust", label_smoothing=0.5), r"robust.* needs label_smoothing < 0.5", id="robust-half"),
        pytest.param(dict(loss_type="bco_pair", f_divergence_type="js_divergence"), r"does not apply to loss_type 'bco_pair'", id="fdiv"),
        pytest.param(dict(f_divergence_type="kl"), r"f_divergence_type must be one of", id="fdiv-unknown"),
        pytest.param(dict(loss_type="aot", use_weighting=True), r"use_weighting \(WPO\) is not defined for aot", id="wpo-aot"),
        pytest.param(dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), r"loss_weights must give one weight per loss type \(2\)", id="weights-length"),
        pytest.param(dict(loss_type=[]), r"loss_type must be a name or a non-empty list", id="empty-list"),
        pytest.param(dict(ld_alpha=1.5), r"ld_alpha must lie in \[0, 1\]", id="ld-alpha"),
        pytest.param(dict(discopop_tau=0.0), r"discopop_tau must be > 0", id="tau"),
    ],
)
def test_options_that_a_loss_type_cannot_honour_are_refused(options, match):
    """An option the chosen loss would silently ignore, or a combination TRL refuses too."""
    with pytest.raises(ValueError, match=match):
        alphapo.AlphaPOLoss(**options)


def test_bf16_is_refused_in_the_triton_interpreter(monkeypatch):
    """The interpreter's bf16 tl.dot is wrong (9.06e21 for 3.885): refuse, don't compute."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("on CUDA the kernels compute bf16")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    weight, hidden, target, bias = make_batch(1, 6, 16, 40, torch.bfloat16)
    for path in ("pair-chunked", "recompute"):
        with pytest.raises(TypeError, match=r"TRITON_INTERPRET=1 cannot compute bfloat16"):
            alphapo.alphapo_loss(weight.requires_grad_(), hidden, target, bias, backend="triton", path=path)


# ----------------------------------------------------------------------- non-finite values


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize(
    "where, match",
    [
        pytest.param("hidden", r"non-finite values .* in hidden at a valid", id="nan-hidden"),
        pytest.param("weight", r"non-finite values .* in lin_weight", id="inf-weight"),
        pytest.param("bias", r"non-finite values .* in bias", id="nan-bias"),
        pytest.param("ref", r"non-finite values .* in ref_chosen_logps", id="nan-ref"),
    ],
)
def test_non_finite_inputs_are_refused(backend, where, match):
    weight, hidden, target, bias = make_batch(2, 9, 16, 40, torch.float32, seed=3)
    refs = [-torch.rand(2), -torch.rand(2)]
    if where == "hidden":
        row, t = (target != -100).nonzero()[0].tolist()
        hidden[row, t, 3] = float("nan")
    elif where == "weight":
        weight[7, 2] = float("inf")
    elif where == "bias":
        bias[5] = float("nan")
    else:
        refs[0][1] = float("nan")
    with pytest.raises(ValueError, match=match):
        alphapo.alphapo_loss(weight, hidden, target, bias, *refs, backend=backend)
    # the documented opt-out computes anyway (and gets the NaN the check would have prevented)
    loss, _ = alphapo.alphapo_loss(weight, hidden, target, bias, *refs, backend=backend, check_finite=False)
    assert not torch.isfinite(loss)


@pytest.mark.parametrize("path", ["pair-chunked", "recompute"])
def test_nan_at_ignored_positions_is_harmless_on_every_backend(path):
    """A NaN where target is ignore_index is no token of the loss: every backend gives the
    finite loss and gradients of the clean batch (the reference used to poison grad_W)."""
    weight, hidden, target, bias = make_batch(2, 12, 16, 40, torch.float64, seed=5, prompt_len=4)
    dirty = hidden.clone()
    dirty[target == -100] = float("nan")
    out = {}
    for backend in ("reference", "torch"):
        for h in (hidden, dirty):
            W, hh, b = (t.clone().requires_grad_() for t in (weight, h, bias))
            loss, _ = alphapo.alphapo_loss(W, hh, target, b, backend=backend,
                                           **({} if backend == "reference" else {"path": path}))
            loss.backward()
            out[(backend, h is dirty)] = (loss, W.grad, torch.nan_to_num(hh.grad, nan=123.0), b.grad)
    clean = out[("reference", False)]
    for key, got in out.items():
        for g, want in zip(got, clean):
            assert torch.allclose(g, want, rtol=1e-10, atol=1e-12), key


@pytest.mark.parametrize(
    "refs, average, match",
    [
        pytest.param((0.5, -1.0), True, r"ref_chosen_logps.*a log-prob is <= 0", id="positive"),
        pytest.param((-90.0, -80.0), True, r"ref_chosen_logps, ref_rejected_logps.*look summed", id="summed-as-averaged"),
    ],
)
def test_reference_logps_that_cannot_be_this_losss_are_refused(refs, average, match):
    weight, hidden, target, bias = make_batch(1, 9, 16, 40, torch.float32, seed=7)
    ref_w, ref_l = (torch.tensor([r]) for r in refs)
    for backend in ("reference", "torch"):
        with pytest.raises(ValueError, match=match):
            alphapo.alphapo_loss(weight, hidden, target, bias, ref_w, ref_l, backend=backend, average_log_prob=average)
    # summed references of that size are plausible with summed log-probs
    alphapo.alphapo_loss(weight, hidden, target, bias, -torch.abs(ref_w), -torch.abs(ref_l), backend="torch",
                         average_log_prob=False, gamma=0.0)


@pytest.mark.parametrize(
    "where, match",
    [
        pytest.param("hidden", r"non-finite values .* in ref_hidden at a valid", id="nan-ref-hidden"),
        pytest.param("weight", r"non-finite values .* in ref_weight", id="inf-ref-weight"),
    ],
)
def test_the_reference_models_tensors_are_checked_under_their_own_names(where, match):
    """The check that the loss runs on ref_hidden / ref_weight names them, not the policy's
    hidden / lin_weight (a user would look for the NaN in the wrong model)."""
    from alphapo._validation import REF_NAMES, check_inputs, scan_inputs

    weight, hidden, target, bias = make_batch(2, 9, 16, 40, torch.float32, seed=3)
    if where == "hidden":
        row, t = (target != -100).nonzero()[0].tolist()
        hidden[row, t, 3] = float("nan")
    else:
        weight[7, 2] = float("inf")
    with pytest.raises(TypeError, match=r"ref_weight dtype torch.float64 must match ref_hidden"):
        check_inputs(weight.double(), hidden, target, names=REF_NAMES)
    with pytest.raises(ValueError, match=match):
        scan_inputs(weight, hidden, target, None, 40, IGNORE_INDEX, names=REF_NAMES)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_in_ref_hidden_is_named_as_ref_hidden(backend):
    weight, hidden, target, bias = make_batch(2, 9, 16, 40, torch.float32, seed=3)
    ref_hidden = hidden.clone()
    row, t = (target != -100).nonzero()[0].tolist()
    ref_hidden[row, t, 3] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values .* in ref_hidden"):
        alphapo.alphapo_loss(weight, hidden, target, bias, backend=backend, gamma=0.0, ref_hidden=ref_hidden,
                             ref_weight=weight, ref_bias=bias)
