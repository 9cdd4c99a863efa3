"""The one ``autograd.Function`` behind every fused backend.

A backend module provides two steps over the N valid tokens (see :mod:`alphapo.chunked`
and :mod:`alphapo.kernels.fused`)::

    forward_stats(h2d, W, b, flat_idx, target, scratch_bytes, acc_dtype) -> lse, tgt   # (N,), (N,)
    backward_grads(h2d, W, b, flat_idx, target, lse, coef, scratch_bytes, needs) -> grad_h, grad_W, grad_b

and this Function turns them into differentiable per-sequence sums
``S_i = Σ_t (tgt_t - lse_t)``. Vocabulary parallelism sits here too, once for every
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

from ._tokens import TokenPlan, accumulation_dtype, sequence_sum


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


def _combine_shards(lse: torch.Tensor, tgt: torch.Tensor, group):
    """Whole-vocabulary lse and target logit from per-rank partials: two all-reduces,
    the max, then the rescaled exp-sums stacked with the target logits (0 off-owner)."""
    import torch.distributed as dist

    m = lse.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    both = torch.stack([torch.exp(lse - m), tgt])
    dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
    return m + torch.log(both[0]), both[1]


class FusedSequenceLogProbs(torch.autograd.Function):
    """``(hidden, weight, bias) -> S``: summed log-probs per sequence, (2B,), float32/64."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: TokenPlan, backend, scratch_bytes, shard: VocabShard | None = None,
                filter_eps: float | None = None):
        H = hidden.shape[-1]
        acc = accumulation_dtype(hidden.dtype)
        h2d = hidden.reshape(-1, H)
        target = plan.target
        if shard is not None:
            target = target - shard.offset
            target = torch.where((target >= 0) & (target < weight.shape[0]), target, -1)
        lse, tgt = backend.forward_stats(h2d, weight, bias, plan.flat_idx, target, scratch_bytes, acc)
        if shard is not None:
            lse, tgt = _combine_shards(lse, tgt, shard.group)
        ctx.save_for_backward(hidden, weight, bias, plan.flat_idx, target, plan.seq_id, lse)
        group = shard.group if shard is not None else None
        ctx.backend, ctx.scratch_bytes, ctx.group, ctx.filter_eps = backend, scratch_bytes, group, filter_eps
        return sequence_sum(tgt - lse, plan)

    @staticmethod
    def backward(ctx, grad_seq):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "alphapo: double backward (create_graph=True) is not supported: the fused backward "
                "computes first-order gradients without a graph (use backend='reference' for higher orders)"
            )
        hidden, weight, bias, flat_idx, target, seq_id, lse = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if ctx.group is not None:
            needs = (True, needs[1], needs[2])  # every rank must join the grad_h all-reduce
        coef = grad_seq.to(lse.dtype)[seq_id]  # dL/dlogp_t of each valid token
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
        return grad_h, grad_w, grad_b, None, None, None, None, None
