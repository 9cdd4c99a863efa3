"""The one ``autograd.Function`` behind every fused backend.

A backend module provides two steps over the N valid tokens (see :mod:`alphapo.chunked`
and :mod:`alphapo.kernels.fused`)::

    forward_stats(h2d, W, b, flat_idx, target, scratch_bytes, acc_dtype, want_sq) -> TokenStats  # (N,) each
    backward_grads(h2d, W, b, flat_idx, target, lse, coef, scratch_bytes, needs) -> grad_h, grad_W, grad_b

and this Function turns them into differentiable per-sequence sums
``S_i = Σ_t w_t (tgt_t - lse_t)`` (w = 1, or LD-DPO's token weights beside it) and the
metrics' sums (entropy, top-1 hits, WPO's log-prob excess). Vocabulary parallelism sits here too, once for every
backend: when each rank of ``group`` holds a contiguous slice of the vocabulary rows, the
per-token log-sum-exp partials are combined with an all-reduce of the max ``m`` and one
all-reduce of ``exp(lse - m)`` stacked with the target logit, which comes from the rank
that owns it (the others see target -1 and contribute 0); ``grad_h`` is summed across
ranks over the valid rows alone, so
every rank returns the same ``S`` and the same ``grad_hidden`` and keeps the gradient of
its own weight slice.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._tokens import TokenPlan, TokenStats, accumulation_dtype, logp_values, metric_values, sequence_sum


class VocabShard(NamedTuple):
    """This rank's place in a vocabulary-parallel lm-head: its group and first row."""

    group: object
    offset: int


def vocab_layout(vocab_size: int, group, device) -> tuple[int, int]:
    """``(offset, total)``: this rank's first vocabulary row and the whole vocabulary size,
    from one all-gather of the slice sizes (slices are held in group-rank order)."""
    import torch.distributed as dist

    sizes = torch.empty(dist.get_world_size(group), dtype=torch.int64, device=device)
    dist.all_gather_into_tensor(sizes, torch.tensor([vocab_size], dtype=torch.int64, device=device), group=group)
    sizes = sizes.tolist()
    rank = dist.get_rank(group)
    return sum(sizes[:rank]), sum(sizes)


def _combine_shards(stats: TokenStats, group) -> TokenStats:
    """Whole-vocabulary statistics from per-rank partials: the max, then one sum of the
    rescaled exp-sums stacked with the target logits (0 off-owner) and the rescaled
    metric terms. Top-1 ties between ranks' maxima (measure zero in float logits) count
    for every rank holding the maximum."""
    import torch.distributed as dist

    m = stats.lse.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    zmax = stats.zmax.clone()
    dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=group)
    w = torch.exp(stats.lse - m)  # this rank's share of the softmax mass, times e^{lse - m}
    parts = [w, stats.tgt, w * stats.zbar, stats.hit * (stats.zmax >= zmax)]
    if stats.lsq is not None:
        parts.append(w * w * torch.exp(stats.lsq))  # Σ_{v in r} p_v², on the common scale e^{2(m - lse)}
    both = torch.stack(parts)
    dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
    lse = m + torch.log(both[0])
    lsq = torch.log(both[4]) - 2.0 * torch.log(both[0]) if stats.lsq is not None else None
    return TokenStats(lse, both[1], both[2] / both[0], zmax, both[3], lsq)


def sequence_sums(stats: TokenStats, plan: TokenPlan, want_wpo: bool):
    """(2B, K) weighted log-prob sums (K = 2 with LD-DPO weights: raw, weighted) and
    (2B, 2 or 3) metric sums (entropy, hits[, WPO]) of one batch's token statistics."""
    return sequence_sum(logp_values(stats, plan.weights), plan), sequence_sum(metric_values(stats, want_wpo), plan)


class FusedSequenceLogProbs(torch.autograd.Function):
    """``(hidden, weight, bias) -> (S, M)``: per sequence, the summed log-probs ``S`` (2B, K)
    (K = 2 under LD-DPO: raw and weighted) and the metric sums ``M`` (not differentiable)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: TokenPlan, backend, scratch_bytes, shard: VocabShard | None = None,
                filter_eps: float | None = None, want_wpo: bool = False):
        H = hidden.shape[-1]
        acc = accumulation_dtype(hidden.dtype)
        h2d = hidden.reshape(-1, H)
        target = plan.target
        if shard is not None:
            target = target - shard.offset
            target = torch.where((target >= 0) & (target < weight.shape[0]), target, -1)
        stats = TokenStats(*backend.forward_stats(h2d, weight, bias, plan.flat_idx, target, scratch_bytes, acc, want_wpo))
        if shard is not None:
            stats = _combine_shards(stats, shard.group)
        weights = plan.weights if plan.weights is not None else torch.ones((0, 1), dtype=acc, device=h2d.device)
        ctx.save_for_backward(hidden, weight, bias, plan.flat_idx, target, plan.seq_id, stats.lse, weights)
        group = shard.group if shard is not None else None
        ctx.backend, ctx.scratch_bytes, ctx.group, ctx.filter_eps = backend, scratch_bytes, group, filter_eps
        seq, metrics = sequence_sums(stats, plan, want_wpo)
        ctx.mark_non_differentiable(metrics)
        return seq, metrics

    @staticmethod
    def backward(ctx, grad_seq, _grad_metrics):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "alphapo: double backward (create_graph=True) is not supported: the fused backward "
                "computes first-order gradients without a graph (use backend='reference' for higher orders)"
            )
        hidden, weight, bias, flat_idx, target, seq_id, lse, weights = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if ctx.group is not None:
            needs = (True, needs[1], needs[2])  # every rank must join the grad_h all-reduce
        per_token = grad_seq.to(lse.dtype)[seq_id]  # dL/dS_k of each valid token's sequence, (N, K)
        coef = per_token[:, 0] if weights.numel() == 0 else (per_token * weights.to(lse.dtype)).sum(1)
        extra = {} if ctx.filter_eps is None else {"filter_eps": ctx.filter_eps}
        grad_h, grad_w, grad_b = ctx.backend.backward_grads(
            hidden.reshape(-1, hidden.shape[-1]), weight, bias, flat_idx, target, lse, coef,
            ctx.scratch_bytes, needs, **extra,
        )
        if ctx.group is not None:
            import torch.distributed as dist

            # Only valid rows carry gradient: reduce those, not the (2B·T, H) tensor.
            rows = grad_h.index_select(0, flat_idx)
            dist.all_reduce(rows, op=dist.ReduceOp.SUM, group=ctx.group)
            grad_h.index_copy_(0, flat_idx, rows)
        if grad_h is not None:
            grad_h = grad_h.view_as(hidden)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None
