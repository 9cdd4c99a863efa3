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

Two orders of work (``path=``): with a gradient wanted, the **pair-chunked** path
(:mod:`alphapo._pairchunk`, 6·N·H·V) walks the batch a chunk of whole pairs at a time and
forms the gradients in the forward; the **recompute** path (:mod:`alphapo._autograd`,
8·N·H·V) reduces the logits to log-sum-exps in the forward and rebuilds them in the
backward (``sequence_logprobs``, batch-coupled losses, pairs too long for the budget).

``scratch_bytes`` bounds the extra memory of the fused backends: the logits of one chunk
of pairs (pair-chunked), of one chunk of tokens (torch, recompute) or one vocabulary
slice of ``dz`` (triton, recompute); ``None`` takes each backend's default.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from typing import NamedTuple

import torch
from torch import nn

from . import chunked
from ._autograd import FusedSequenceLogProbs, VocabShard, vocab_layout
from ._pairchunk import PATHS, PairChunkedLoss, PairJob, budget_tokens, chunk_pairs
from ._tokens import accumulation_dtype, plan_tokens, sequence_sum, with_ld_weights
from ._validation import NAMES, REF_NAMES, check_inputs, scan_inputs
from .epilogue import AlphaPOConfig, AlphaPOOutput, SequenceSums, make_output, preference_loss
from .reference import alphapo_loss_reference, sequence_logprobs_reference

BACKENDS = ("auto", "reference", "torch", "triton")
logger = logging.getLogger("alphapo")


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


def _check_path(path):
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")


def _check_nll_tokens(value):
    """``nll_num_tokens``: None, or a positive finite count (a number or a 0-dim tensor)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"nll_num_tokens must be a positive number or a 0-dim tensor, got a tensor of shape "
                             f"{tuple(value.shape)} and dtype {value.dtype}")
        return value.double()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"nll_num_tokens must be a positive, finite token count, got {value!r}")
    return float(value)


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


def _backend_module(backend):
    if backend == "torch":
        return chunked
    from .kernels import fused  # imported lazily: triton is optional

    return fused


def _recompute_sums(weight, hidden, bias, plan, module, scratch_bytes, shard=None, filter_eps=None, want_wpo=False):
    """Per sequence, through the recompute path: the summed log-probs (2B, K), differentiable,
    and the metric sums (2B, 2 or 3)."""
    if filter_eps is not None and module is chunked:
        raise ValueError('filter_eps (gradient filtering) needs backend="triton", got backend="torch"')
    budget = module.DEFAULT_SCRATCH_BYTES if scratch_bytes is None else scratch_bytes
    return FusedSequenceLogProbs.apply(hidden, weight, bias, plan, module, budget, shard, filter_eps, want_wpo)


def _logit_sums(scan, group=None):
    """Σ over valid tokens of Σ_v z, per sequence, with no logits: ``h·Σ_v W_v + n·Σ_v b_v``.

    Under vocabulary parallelism the per-rank partials are summed across ``group``.
    """
    sums = scan.h_sum @ scan.w_sum
    if scan.b_sum is not None:
        sums = sums + scan.n_tokens.double() * scan.b_sum
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(sums, group=group)
    return sums


def _scan(weight, hidden, target, bias, vocab_size, ignore_index, refs, check_finite, group, averaged=None,
          names=NAMES):
    refs = (("ref_chosen_logps", refs[0]), ("ref_rejected_logps", refs[1]))
    return scan_inputs(weight, hidden, target, bias, vocab_size, ignore_index, refs, check_finite, group, averaged,
                       names)


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
    check_finite: bool = True,
):
    """Per-sequence log-probs ``(2B,)`` of ``target`` under ``hidden @ weight.T + bias``.

    Differentiable w.r.t. ``hidden``, ``weight`` and ``bias``, with no logits in memory
    (``backend`` "torch"/"triton"): build any pair or sequence loss on top of it. Returns
    float32 (float64 for float64 inputs). Equivalent PyTorch::

        logp = log_softmax(hidden @ weight.T + bias, -1).gather(-1, target[..., None])[..., 0]
        s = (logp * mask).sum(-1) / (mask.sum(-1) if average else 1)

    Every row needs at least one valid token; rows need not come in pairs. It always runs
    the recompute path (8·N·H·V with gradients): its upstream gradient is arbitrary, so
    no coefficient is known in the forward.
    """
    weight, hidden, bias = _prepare(weight, hidden, bias, scratch_bytes, filter_eps)
    check_inputs(weight, hidden, target, bias, paired=False)
    backend = _backend_for(backend, hidden.device, process_group)
    if backend == "reference":
        return sequence_logprobs_reference(weight, hidden, target, bias, average, ignore_index, check_finite)
    vocab_size, shard = _vocab_shard(weight.shape[0], process_group, hidden.device)
    scan = _scan(weight, hidden, target, bias, vocab_size, ignore_index, (None, None), check_finite, process_group)
    plan = plan_tokens(target, ignore_index, scan.n_tokens, scan.n_host)
    summed = _recompute_sums(weight, hidden, bias, plan, _backend_module(backend), scratch_bytes, shard, filter_eps)[0]
    summed = summed[:, 0]
    return summed / scan.n_tokens.to(summed.dtype) if average else summed


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
    gamma: float | None = None,
    label_smoothing: float = 0.0,
    loss_type="sigmoid",
    average_log_prob: bool = True,
    nll_weight: float = 0.0,
    ignore_index: int = -100,
    loss_weights=None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    use_weighting: bool = False,
    ld_alpha: float | None = None,
    backend: str = "auto",
    scratch_bytes: int | None = None,
    process_group=None,
    filter_eps: float | None = None,
    path: str = "auto",
    check_finite: bool = True,
    ref_hidden=None,
    ref_weight=None,
    ref_bias=None,
    nll_num_tokens=None,
) -> tuple[torch.Tensor, AlphaPOOutput]:
    """The AlphaPO loss from last hidden states and the lm-head; see :class:`AlphaPOLoss`."""
    cfg = AlphaPOConfig(alpha, beta, gamma, label_smoothing, loss_type, average_log_prob, nll_weight, ignore_index,
                        loss_weights, f_divergence_type, f_alpha_divergence_coef, discopop_tau, use_weighting, ld_alpha)
    opts = _Options(backend, scratch_bytes, process_group, filter_eps, path, check_finite)
    return _alphapo_loss(lin_weight, hidden, target, bias, (ref_chosen_logps, ref_rejected_logps), cfg, opts,
                         nll_num_tokens, (ref_hidden, ref_weight, ref_bias))


def _vocab_shard(vocab_size, group, device):
    """(whole vocabulary size, VocabShard or None) for this rank's lm-head rows."""
    if group is None:
        return vocab_size, None
    offset, total = vocab_layout(vocab_size, group, device)
    return total, VocabShard(group, offset)


class _Options(NamedTuple):
    """How to compute (not what): the options beside :class:`AlphaPOConfig`."""

    backend: str = "auto"
    scratch_bytes: int | None = None
    process_group: object = None
    filter_eps: float | None = None
    path: str = "auto"
    check_finite: bool = True


def _choose_path(opts: _Options, cfg, weight, hidden, bias, refs, plan, module, shard=None):
    """The pair-chunked path and its chunks, or the recompute path (``(name, chunks)``).

    The rule: ``path="auto"`` takes the pair-chunked path when a gradient is wanted
    (grad mode on and some input requires it), the loss is pair-separable, the reference
    log-probs need no gradient, gradient filtering is off and every pair's valid tokens
    fit ``scratch_bytes`` as one chunk of logits; otherwise it recomputes.
    ``path="pair-chunked"`` insists (and says why it cannot), ``path="recompute"`` always
    recomputes. Under vocabulary parallelism each rank's budget counts its own slice of the
    vocabulary, and the ranks take the smallest token count of them (one all-reduce), so
    that every rank walks the same chunks and meets its peers in each chunk's collectives.
    """
    if opts.path == "recompute":
        return "recompute", None
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    ref_grad = any(r is not None and r.requires_grad for r in refs) and torch.is_grad_enabled()
    B = plan.rows // 2
    longest = max(plan.n_host[j] + plan.n_host[B + j] for j in range(B))
    per_token = weight.shape[0] * weight.element_size()  # one token's logits
    budget = opts.scratch_bytes
    if budget is None:
        budget = module.default_pair_scratch(longest * per_token, sum(plan.n_host) * per_token)
    tokens = budget_tokens(budget, weight.shape[0], weight.element_size())
    if shard is not None:
        import torch.distributed as dist

        agreed = torch.tensor([tokens], dtype=torch.int64, device=hidden.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=shard.group)
        tokens = int(agreed.item())
    chunks = chunk_pairs(plan.n_host, tokens)
    why = None
    if opts.filter_eps is not None:
        why = "filter_eps (gradient filtering) skips work in the recompute path's grad_hidden kernel"
    elif not cfg.pair_separable:
        why = f"loss_type={cfg.loss_type!r} couples pairs across the batch"
    elif ref_grad:
        why = "the reference log-probs require grad (the pair-chunked path differentiates the policy only)"
    elif chunks is None:
        why = (f"a pair has {longest} valid tokens, whose logits ({longest} x {weight.shape[0]} x "
               f"{weight.element_size()} bytes) do not fit scratch_bytes={budget}")
    if opts.path == "pair-chunked":
        if why is not None:
            raise ValueError(f'path="pair-chunked" cannot run: {why}; use path="auto" or "recompute"')
        return "pair-chunked", chunks
    if why is not None or not wants_grad:
        return "recompute", None
    return "pair-chunked", chunks


def _alphapo_loss(weight, hidden, target, bias, refs, cfg: AlphaPOConfig, opts: _Options, nll_num_tokens=None,
                  ref_model=(None, None, None), owner=None):
    _check_path(opts.path)
    nll_tokens = _check_nll_tokens(nll_num_tokens)
    weight, hidden, bias = _prepare(weight, hidden, bias, opts.scratch_bytes, opts.filter_eps)
    ref_w, ref_l = refs
    check_inputs(weight, hidden, target, bias, ref_w, ref_l)
    group = opts.process_group
    backend = _backend_for(opts.backend, hidden.device, group)
    if ref_model[0] is not None or ref_model[1] is not None:
        if ref_w is not None:
            raise ValueError("pass the reference model's ref_hidden/ref_weight or its precomputed "
                             "ref_chosen_logps/ref_rejected_logps, not both")
        ref_w, ref_l = _reference_logps(ref_model, hidden, target, cfg, opts, backend)
    if backend == "reference":
        loss, out = alphapo_loss_reference(weight, hidden, target, bias, ref_w, ref_l, config=cfg,
                                           nll_tokens=nll_tokens, check_finite=opts.check_finite)
        _record_path(owner, "reference")
        return loss, out
    vocab_size, shard = _vocab_shard(weight.shape[0], group, hidden.device)
    scan = _scan(weight, hidden, target, bias, vocab_size, cfg.ignore_index, (ref_w, ref_l), opts.check_finite, group,
                 averaged=cfg.average_log_prob)
    plan = with_ld_weights(plan_tokens(target, cfg.ignore_index, scan.n_tokens, scan.n_host), cfg.ld_alpha)
    module = _backend_module(backend)
    name, chunks = _choose_path(opts, cfg, weight, hidden, bias, (ref_w, ref_l), plan, module, shard)
    if name == "pair-chunked":
        job = PairJob(plan, chunks, module, cfg, ref_w, ref_l, nll_tokens, shard, torch.is_grad_enabled())
        loss, seq, metrics = PairChunkedLoss.apply(hidden, weight, bias, job)
        sums = SequenceSums.from_columns(seq, metrics, scan.n_tokens, cfg.use_weighting)
        epi = preference_loss(sums, None, cfg, ref_w, ref_l)  # the metrics; the loss came with the gradients
    else:
        seq, metrics = _recompute_sums(weight, hidden, bias, plan, module, opts.scratch_bytes, shard, opts.filter_eps,
                                       cfg.use_weighting)
        sums = SequenceSums.from_columns(seq, metrics, scan.n_tokens, cfg.use_weighting)
        epi = preference_loss(sums, None, cfg, ref_w, ref_l, nll_tokens=nll_tokens)
        loss = epi.loss
    out = make_output(epi, sums, _logit_sums(scan, group), vocab_size)
    _record_path(owner, name)
    return loss.to(accumulation_dtype(hidden.dtype)), out


@torch.no_grad()
def _reference_logps(ref_model, hidden, target, cfg: AlphaPOConfig, opts: _Options, backend):
    """The reference model's per-sequence log-probs from its last hidden states and head,
    without logits and without gradient, averaged (and LD-DPO-weighted) as the policy's:
    ``(ref_chosen_logps, ref_rejected_logps)``, float32/64 (B,)."""
    ref_hidden, ref_weight, ref_bias = ref_model
    if ref_hidden is None or ref_weight is None:
        raise ValueError("the reference model needs both ref_hidden and ref_weight (and ref_bias if its head has one)")
    ref_weight, ref_hidden, ref_bias = _autocast(ref_weight, ref_hidden, ref_bias)
    check_inputs(ref_weight, ref_hidden, target, ref_bias, names=REF_NAMES)
    if tuple(ref_hidden.shape[:2]) != tuple(hidden.shape[:2]):
        raise ValueError(f"ref_hidden must have the policy's (2B, T) = {tuple(hidden.shape[:2])} leading shape "
                         f"(the same sequences), got {tuple(ref_hidden.shape)}")
    group = opts.process_group if backend != "reference" else None
    B = hidden.shape[0] // 2
    vocab_size, shard = _vocab_shard(ref_weight.shape[0], group, ref_hidden.device)
    scan = _scan(ref_weight, ref_hidden, target, ref_bias, vocab_size, cfg.ignore_index, (None, None),
                 opts.check_finite, group, names=REF_NAMES)
    n = scan.n_tokens
    plan = with_ld_weights(plan_tokens(target, cfg.ignore_index, n, scan.n_host), cfg.ld_alpha)
    if backend == "reference":
        from .reference import token_logprobs_reference

        tok = token_logprobs_reference(ref_weight, ref_hidden, target, ref_bias, cfg.ignore_index)
        values = tok.reshape(-1)[plan.flat_idx]
        if plan.weights is not None:
            values = values * plan.weights[:, 1].to(values.dtype)
        seq = sequence_sum(values, plan)
    else:
        seq = _recompute_sums(ref_weight, ref_hidden, ref_bias, plan, _backend_module(backend), opts.scratch_bytes,
                              shard)[0][:, -1]
    logps = seq / n.to(seq.dtype) if cfg.average_log_prob else seq
    return logps[:B].detach(), logps[B:].detach()


def _record_path(owner, name):
    if owner is not None:
        owner.last_path = name
    logger.debug("alphapo: %s path", name)


class AlphaPOLoss(nn.Module):
    """AlphaPO (arXiv 2501.03884) computed from last hidden states, with no logits in memory.

    ``loss, aux = AlphaPOLoss(...)(lin_weight, hidden, target, bias=None,
    ref_chosen_logps=None, ref_rejected_logps=None, *, ref_hidden=None, ref_weight=None,
    ref_bias=None, nll_num_tokens=None)`` — Liger's chunked-loss call. The loss is
    ``mean_j loss_type(beta * (f(x_w) - f(x_l)) - gamma) + nll_weight * NLL`` with
    ``f(x) = (1 - exp(-alpha x)) / alpha`` (``x`` at alpha = 0, i.e. SimPO) and ``x`` the
    length-averaged log-prob (``average_log_prob=True``) or, with a reference model, the
    log-ratio to it; alpha = 0 with ``average_log_prob=False``, ``gamma=0`` and a
    reference is DPO, and every other loss of TRL's ``DPOTrainer`` is a ``loss_type``
    (:mod:`alphapo.pair_losses`). The reference comes as precomputed ``ref_*_logps`` (B,)
    — averaged or summed as ``average_log_prob`` says — or as the reference model's last
    hidden states and head (``ref_hidden`` (2B, T, H'), ``ref_weight``, ``ref_bias``), from
    which the loss computes them without gradient and without logits. ``aux`` is an
    :class:`~alphapo.epilogue.AlphaPOOutput` of detached metrics (TRL's names through
    ``aux.to_dict()``). ``self.last_path`` names the path the last call ran
    ("pair-chunked", "recompute" or "reference"; the functional form logs it at DEBUG level
    on the ``alphapo`` logger).

    Args:
        alpha: reward shape; 0.25 is the paper's value for Mistral-7B and Llama-3-8B.
            Sign convention as the paper and TRL; ``alpha -> -alpha`` gives the
            ``(1/alpha)[(pi/pi_ref)**alpha - 1]`` form (see :mod:`alphapo.epilogue`).
        beta: reward scale. 2.5 and ``gamma`` 1.375 are SimPO's Llama-3-8B-Instruct recipe
            (β = 2.5, γ/β = 0.55), AlphaPO's starting point.
        gamma: target reward margin; None: 1.375 for a lone "sigmoid", "hinge" or "ipo",
            0 for the other loss types (TRL's DPO losses have none).
        label_smoothing: ε, in [0, 0.5], of the losses that take one (sigmoid: cDPO,
            exo_pair, robust, aot, aot_unpaired); refused where it would be ignored.
        loss_type: "sigmoid" (AlphaPO/SimPO/DPO), "hinge", "ipo", or any other of TRL's
            DPO losses (:data:`alphapo.pair_losses.LOSS_TYPES`), or a list of them summed
            with ``loss_weights`` (MPO). "aot"/"aot_unpaired" couple the batch and run
            the recompute path.
        average_log_prob: length-normalise sequence log-probs (SimPO/AlphaPO) or sum them (DPO).
        nll_weight: weight λ of the mean NLL over chosen tokens added to the loss (CPO's alpha).
        ignore_index: target value of prompt and padding positions.
        backend: "auto", "reference", "torch" or "triton" (see :mod:`alphapo.loss`).
        scratch_bytes: extra-memory budget of the fused backends: the most logits a chunk
            may hold (pair-chunked path) or the recompute path's chunk (torch) or ``dz``
            slice (triton); None for each backend's default.
        process_group: vocabulary parallelism: each rank of this ``torch.distributed``
            group passes a contiguous slice of the vocabulary rows of ``lin_weight`` (and
            ``bias``), in rank order; every rank gets the same loss and ``grad_hidden``
            and the gradient of its own slice (see :mod:`alphapo._autograd`).
        filter_eps: gradient filtering, ``"triton"`` recompute path only, off (None) by
            default: ``dz`` tiles whose largest ``|dz|`` is at most this skip their
            ``grad_hidden`` GEMM work (``grad_weight`` stays exact).
        path: "auto" (the rule below), "pair-chunked" or "recompute". The pair-chunked
            path (6·N·H·V, :mod:`alphapo._pairchunk`) forms the gradients in the forward,
            a chunk of whole pairs at a time; the recompute path (8·N·H·V) keeps no logits
            and rebuilds them in the backward. "auto" takes the pair-chunked path when a
            gradient is wanted and every pair's logits fit ``scratch_bytes``.
        check_finite: refuse NaN/inf in ``hidden`` (valid positions), ``lin_weight``,
            ``bias`` and the reference log-probs, and reference log-probs that cannot be
            this loss's (positive, or far below any average with ``average_log_prob``),
            with a clear error. It costs nothing extra (it reads sums the metrics need, in
            the call's one host sync); turn it off only if you check elsewhere.
        loss_weights, f_divergence_type, f_alpha_divergence_coef, discopop_tau,
            use_weighting, ld_alpha: TRL's ``DPOConfig`` options of the same names (MPO
            weights, f-divergence scores, DiscoPOP's τ, WPO weighting, LD-DPO's α);
            see :class:`~alphapo.epilogue.AlphaPOConfig` and :mod:`alphapo.pair_losses`.

    Forward argument ``nll_num_tokens``: the count the NLL term divides the chosen tokens'
    summed NLL by (default: this call's own chosen-token count). For exact gradient
    accumulation, when k micro-batch losses are each divided by k (and, under data
    parallelism, averaged over R ranks), pass the step's total chosen tokens over all
    micro-batches and ranks divided by ``k · R``.
    """

    def __init__(
        self,
        alpha: float = 0.25,
        beta: float = 2.5,
        gamma: float | None = None,
        label_smoothing: float = 0.0,
        loss_type="sigmoid",
        average_log_prob: bool = True,
        nll_weight: float = 0.0,
        ignore_index: int = -100,
        backend: str = "auto",
        scratch_bytes: int | None = None,
        process_group=None,
        filter_eps: float | None = None,
        path: str = "auto",
        check_finite: bool = True,
        *,
        loss_weights=None,
        f_divergence_type: str = "reverse_kl",
        f_alpha_divergence_coef: float = 0.5,
        discopop_tau: float = 0.05,
        use_weighting: bool = False,
        ld_alpha: float | None = None,
    ):
        super().__init__()
        self.config = AlphaPOConfig(
            alpha, beta, gamma, label_smoothing, loss_type, average_log_prob, nll_weight, ignore_index,
            loss_weights, f_divergence_type, f_alpha_divergence_coef, discopop_tau, use_weighting, ld_alpha,
        )
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        _check_scratch(scratch_bytes)
        _check_filter(filter_eps)
        _check_path(path)
        if not isinstance(check_finite, bool):
            raise ValueError(f"check_finite must be True or False, got {check_finite!r}")
        self.options = _Options(backend, scratch_bytes, process_group, filter_eps, path, check_finite)
        self.last_path: str | None = None  # "pair-chunked", "recompute" or "reference", after a call

    # The options as attributes, as before they were grouped.
    backend = property(lambda self: self.options.backend)
    scratch_bytes = property(lambda self: self.options.scratch_bytes)
    process_group = property(lambda self: self.options.process_group)
    filter_eps = property(lambda self: self.options.filter_eps)
    path = property(lambda self: self.options.path)

    def forward(self, lin_weight, hidden, target, bias=None, ref_chosen_logps=None, ref_rejected_logps=None, *,
                ref_hidden=None, ref_weight=None, ref_bias=None, nll_num_tokens=None):
        return _alphapo_loss(
            lin_weight, hidden, target, bias, (ref_chosen_logps, ref_rejected_logps), self.config, self.options,
            nll_num_tokens, (ref_hidden, ref_weight, ref_bias), owner=self,
        )

    def extra_repr(self) -> str:
        c = self.config
        parallel = ", vocab_parallel=True" if self.process_group is not None else ""
        return (
            f"alpha={c.alpha}, beta={c.beta}, gamma={c.gamma}, loss_type={c.loss_type!r}, "
            f"average_log_prob={c.average_log_prob}, nll_weight={c.nll_weight}, backend={self.backend!r}, "
            f"path={self.path!r}{parallel}"
        )
