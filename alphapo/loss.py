"""Public API: :class:`AlphaPOLoss`, :func:`alphapo_loss` and :func:`sequence_logprobs`.

The call follows Liger-Kernel's chunked losses, ``loss_fn(lin_weight, hidden, target,
bias=None)``: ``hidden`` (2B, T, H) holds the last hidden states, chosen sequences in rows
0..B-1 and rejected in B..2B-1; ``target`` (2B, T) is already shifted so that row ``t``
predicts ``target[t]``; ``ignore_index`` marks prompt and padding. The logits are never
materialised by the ``"torch"`` and ``"triton"`` backends.

Backends:

* ``"reference"``: materialised logits (:mod:`alphapo.reference`), for tests and tiny problems;
* ``"torch"``: chunked PyTorch (:mod:`alphapo.chunked`), any device and float dtype;
* ``"triton"``: fused Triton kernels (:mod:`alphapo.kernels`), CUDA (or ``TRITON_INTERPRET=1``);
* ``"auto"``: ``"triton"`` on CUDA when Triton imports, else ``"torch"``.

``scratch_bytes`` bounds the extra memory of the fused backends (a chunk of logits for
``"torch"``, a vocabulary slice of ``dz`` for ``"triton"``); ``None`` takes each backend's
default.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ._tokens import accumulation_dtype, plan_tokens
from ._validation import check_inputs, check_targets
from . import chunked
from ._autograd import FusedSequenceLogProbs, VocabShard, vocab_layout
from .epilogue import AlphaPOConfig, AlphaPOOutput, make_output, preference_loss
from .reference import alphapo_loss_reference, sequence_logprobs_reference

BACKENDS = ("auto", "reference", "torch", "triton")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``"auto"`` to a concrete backend and check that the one asked for can run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError('backend="triton" needs the triton package (pip install triton); use backend="torch"')
        if device.type != "cuda" and not interpret:
            raise RuntimeError(
                f'backend="triton" runs on CUDA tensors, got a {device.type} tensor: use backend="torch" '
                '(or "auto") on this device, or set TRITON_INTERPRET=1 to run the kernels in the slow interpreter'
            )
    return backend


def _autocast(weight, hidden, bias):
    """Under ``torch.autocast``, run the head in the autocast dtype, as ``F.linear`` would.

    A trainer under bf16 autocast hands over bf16 hidden states and an fp32 (master)
    lm-head; the cast is differentiable, so gradients reach the fp32 parameters in fp32.
    """
    if not isinstance(hidden, torch.Tensor):
        return weight, hidden, bias
    try:
        enabled = torch.is_autocast_enabled(hidden.device.type)
    except RuntimeError:  # a device type autocast does not know (e.g. "meta"): no autocast there
        return weight, hidden, bias
    if not enabled:
        return weight, hidden, bias
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type)
    cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    return cast(weight), cast(hidden), cast(bias)


def _check_filter(filter_eps):
    if filter_eps is not None and (isinstance(filter_eps, bool) or not isinstance(filter_eps, (int, float))
                                   or not filter_eps >= 0):
        raise ValueError(f"filter_eps must be a non-negative number or None, got {filter_eps!r}")


def _check_scratch(scratch_bytes):
    if scratch_bytes is not None and (isinstance(scratch_bytes, bool) or not isinstance(scratch_bytes, int) or scratch_bytes <= 0):
        raise ValueError(f"scratch_bytes must be a positive byte count or None, got {scratch_bytes!r}")


def _prepare(weight, hidden, bias, scratch_bytes, filter_eps):
    """Option checks shared by the functional forms, then the autocast cast."""
    _check_scratch(scratch_bytes)
    _check_filter(filter_eps)
    return _autocast(weight, hidden, bias)


def _backend_for(backend, device, group):
    """resolve_backend, refusing vocabulary parallelism on the materialised reference."""
    backend = resolve_backend(backend, device)
    if backend == "reference" and group is not None:
        raise ValueError('process_group (vocabulary parallelism) needs backend "torch", "triton" or "auto"')
    return backend


def _fused_sequence_sums(
    weight, hidden, target, bias, ignore_index, backend, scratch_bytes, n_tokens, shard=None, filter_eps=None
):
    """Summed log-probs per sequence (2B,), differentiable, through a fused backend."""
    if filter_eps is not None and backend != "triton":
        raise ValueError(f'filter_eps (gradient filtering) needs backend="triton", got backend={backend!r}')
    plan = plan_tokens(target, ignore_index, n_tokens)
    if backend == "torch":
        module = chunked
    else:
        from .kernels import fused as module  # imported lazily: triton is optional
    budget = module.DEFAULT_SCRATCH_BYTES if scratch_bytes is None else scratch_bytes
    return FusedSequenceLogProbs.apply(hidden, weight, bias, plan, module, budget, shard, filter_eps)


@torch.no_grad()
def _logit_sums(weight, hidden, target, bias, ignore_index, n_tokens, group=None):
    """Σ over valid tokens of Σ_v z, per sequence, with no logits: ``h·Σ_v W_v + Σ_v b_v``.

    Under vocabulary parallelism the per-rank partials are summed across ``group``.
    """
    acc = torch.float64
    w_sum = weight.sum(0, dtype=acc)  # (H,): reduces in float64, no V×H copy
    mask = (target != ignore_index).to(hidden.dtype)
    h_sum = torch.bmm(mask.unsqueeze(1), hidden).squeeze(1).to(acc)  # (2B, H)
    sums = h_sum @ w_sum
    if bias is not None:
        sums = sums + n_tokens.to(acc) * bias.sum(dtype=acc)
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(sums, group=group)
    return sums


def sequence_logprobs(
    hidden,
    weight,
    target,
    bias=None,
    average: bool = True,
    ignore_index: int = -100,
    backend: str = "auto",
    scratch_bytes: int | None = None,
    process_group=None,
    filter_eps: float | None = None,
):
    """Per-sequence log-probs ``(2B,)`` of ``target`` under ``hidden @ weight.T + bias``.

    Differentiable w.r.t. ``hidden``, ``weight`` and ``bias``, with no logits in memory
    (``backend`` "torch"/"triton"): build any pair or sequence loss on top of it. Returns
    float32 (float64 for float64 inputs). Equivalent PyTorch::

        logp = log_softmax(hidden @ weight.T + bias, -1).gather(-1, target[..., None])[..., 0]
        s = (logp * mask).sum(-1) / (mask.sum(-1) if average else 1)

    Every row needs at least one valid token; rows need not come in pairs.
    """
    weight, hidden, bias = _prepare(weight, hidden, bias, scratch_bytes, filter_eps)
    check_inputs(weight, hidden, target, bias, paired=False)
    backend = _backend_for(backend, hidden.device, process_group)
    if backend == "reference":
        return sequence_logprobs_reference(weight, hidden, target, bias, average, ignore_index)
    vocab_size, shard = _vocab_shard(weight.shape[0], process_group, hidden.device)
    n_tokens = check_targets(target, vocab_size, ignore_index)
    summed = _fused_sequence_sums(
        weight, hidden, target, bias, ignore_index, backend, scratch_bytes, n_tokens, shard, filter_eps
    )
    return summed / n_tokens.to(summed.dtype) if average else summed


def alphapo_loss(
    lin_weight,
    hidden,
    target,
    bias=None,
    ref_chosen_logps=None,
    ref_rejected_logps=None,
    *,
    alpha: float = 0.25,
    beta: float = 2.5,
    gamma: float = 1.375,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    average_log_prob: bool = True,
    nll_weight: float = 0.0,
    ignore_index: int = -100,
    backend: str = "auto",
    scratch_bytes: int | None = None,
    process_group=None,
    filter_eps: float | None = None,
) -> tuple[torch.Tensor, AlphaPOOutput]:
    """The AlphaPO loss from last hidden states and the lm-head; see :class:`AlphaPOLoss`."""
    cfg = AlphaPOConfig(alpha, beta, gamma, label_smoothing, loss_type, average_log_prob, nll_weight, ignore_index)
    return _alphapo_loss(
        lin_weight, hidden, target, bias, ref_chosen_logps, ref_rejected_logps, cfg, backend, scratch_bytes,
        process_group, filter_eps,
    )


def _vocab_shard(vocab_size, group, device):
    """(whole vocabulary size, VocabShard or None) for this rank's lm-head rows."""
    if group is None:
        return vocab_size, None
    offset, total = vocab_layout(vocab_size, group, device)
    return total, VocabShard(group, offset)


def _alphapo_loss(
    weight, hidden, target, bias, ref_w, ref_l, cfg: AlphaPOConfig, backend, scratch_bytes, group=None, filter_eps=None
):
    weight, hidden, bias = _prepare(weight, hidden, bias, scratch_bytes, filter_eps)
    check_inputs(weight, hidden, target, bias, ref_w, ref_l)
    backend = _backend_for(backend, hidden.device, group)
    if backend == "reference":
        return alphapo_loss_reference(weight, hidden, target, bias, ref_w, ref_l, config=cfg)
    vocab_size, shard = _vocab_shard(weight.shape[0], group, hidden.device)
    n_tokens = check_targets(target, vocab_size, cfg.ignore_index)
    seq_sum = _fused_sequence_sums(
        weight, hidden, target, bias, cfg.ignore_index, backend, scratch_bytes, n_tokens, shard, filter_eps
    )
    loss, logps, _, rewards_w, rewards_l, nll = preference_loss(seq_sum, n_tokens, cfg, ref_w, ref_l)
    logit_sums = _logit_sums(weight, hidden, target, bias, cfg.ignore_index, n_tokens, group)
    out = make_output(logps, rewards_w, rewards_l, nll, logit_sums, n_tokens, vocab_size)
    return loss.to(accumulation_dtype(hidden.dtype)), out


class AlphaPOLoss(nn.Module):
    """AlphaPO (arXiv 2501.03884) computed from last hidden states, with no logits in memory.

    ``loss, aux = AlphaPOLoss(...)(lin_weight, hidden, target, bias=None,
    ref_chosen_logps=None, ref_rejected_logps=None)`` — Liger's chunked-loss call. The
    loss is ``mean_j loss_type(beta * (f(x_w) - f(x_l)) - gamma) + nll_weight * NLL`` with
    ``f(x) = (1 - exp(-alpha x)) / alpha`` (``x`` at alpha = 0, i.e. SimPO) and ``x`` the
    length-averaged log-prob (``average_log_prob=True``) or, given ``ref_*_logps``, the
    log-ratio to the reference; alpha = 0 with ``average_log_prob=False`` and reference
    log-probs is DPO. ``aux`` is an :class:`~alphapo.epilogue.AlphaPOOutput` of detached
    metrics (TRL's names through ``aux.to_dict()``).

    Args:
        alpha: reward shape; 0.25 is the paper's value for Mistral-7B and Llama-3-8B.
            Sign convention as the paper and TRL; ``alpha -> -alpha`` gives the
            ``(1/alpha)[(pi/pi_ref)**alpha - 1]`` form (see :mod:`alphapo.epilogue`).
        beta: reward scale. 2.5 and ``gamma`` 1.375 are SimPO's Llama-3-8B-Instruct recipe
            (β = 2.5, γ/β = 0.55), AlphaPO's starting point.
        gamma: target reward margin.
        label_smoothing: ε of the conservative sigmoid loss, in [0, 0.5].
        loss_type: "sigmoid" (AlphaPO/SimPO), "hinge" or "ipo".
        average_log_prob: length-normalise sequence log-probs (SimPO/AlphaPO) or sum them (DPO).
        nll_weight: weight λ of the mean NLL over chosen tokens added to the loss (CPO's alpha).
        ignore_index: target value of prompt and padding positions.
        backend: "auto", "reference", "torch" or "triton" (see :mod:`alphapo.loss`).
        scratch_bytes: extra-memory budget of the fused backends; None for their default.
        process_group: vocabulary parallelism: each rank of this ``torch.distributed``
            group passes a contiguous slice of the vocabulary rows of ``lin_weight`` (and
            ``bias``), in rank order; every rank gets the same loss and ``grad_hidden``
            and the gradient of its own slice (see :mod:`alphapo._autograd`).
        filter_eps: gradient filtering, ``"triton"`` only, off (None) by default: ``dz``
            tiles whose largest ``|dz|`` is at most this skip their ``grad_hidden`` GEMM
            work (``grad_weight`` stays exact). On peaked softmaxes most tiles are tiny;
            a value near the bf16 resolution of ``grad_hidden`` leaves it within bf16 error.
    """

    def __init__(
        self,
        alpha: float = 0.25,
        beta: float = 2.5,
        gamma: float = 1.375,
        label_smoothing: float = 0.0,
        loss_type: str = "sigmoid",
        average_log_prob: bool = True,
        nll_weight: float = 0.0,
        ignore_index: int = -100,
        backend: str = "auto",
        scratch_bytes: int | None = None,
        process_group=None,
        filter_eps: float | None = None,
    ):
        super().__init__()
        self.config = AlphaPOConfig(
            alpha, beta, gamma, label_smoothing, loss_type, average_log_prob, nll_weight, ignore_index
        )
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        _check_scratch(scratch_bytes)
        _check_filter(filter_eps)
        self.backend = backend
        self.scratch_bytes = scratch_bytes
        self.process_group = process_group
        self.filter_eps = filter_eps

    def forward(self, lin_weight, hidden, target, bias=None, ref_chosen_logps=None, ref_rejected_logps=None):
        return _alphapo_loss(
            lin_weight, hidden, target, bias, ref_chosen_logps, ref_rejected_logps,
            self.config, self.backend, self.scratch_bytes, self.process_group, self.filter_eps,
        )

    def extra_repr(self) -> str:
        c = self.config
        parallel = ", vocab_parallel=True" if self.process_group is not None else ""
        return (
            f"alpha={c.alpha}, beta={c.beta}, gamma={c.gamma}, loss_type={c.loss_type!r}, "
            f"average_log_prob={c.average_log_prob}, nll_weight={c.nll_weight}, backend={self.backend!r}{parallel}"
        )
