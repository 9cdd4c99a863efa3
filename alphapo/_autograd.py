"""The one ``autograd.Function`` behind every fused backend.

A backend module provides two steps over the N valid tokens (see :mod:`alphapo.chunked`
and :mod:`alphapo.kernels.fused`)::

    forward_stats(h2d, W, b, flat_idx, target, scratch_bytes, acc_dtype) -> lse, tgt   # (N,), (N,)
    backward_grads(h2d, W, b, flat_idx, target, lse, coef, scratch_bytes, needs) -> grad_h, grad_W, grad_b

and this Function turns them into differentiable per-sequence sums
``S_i = Σ_t (tgt_t - lse_t)``. Vocabulary parallelism sits here too, once for every
backend: when each rank of ``group`` holds a contiguous slice of the vocabulary rows, the
per-token log-sum-exp partials are combined with one all-reduce of ``exp(lse - m)``
after an all-reduce of the max ``m``, the target logit comes from the rank that owns it
(the others see target -1 and contribute 0), and ``grad_h`` is summed across ranks, so
every rank returns the same ``S`` and the same ``grad_hidden`` and keeps the gradient of
its own weight slice.
"""

from __future__ import annotations

import torch

from ._tokens import TokenPlan, accumulation_dtype, sequence_sum


def vocab_offset(vocab_size: int, group, device) -> int:
    """First vocabulary row of this rank's slice: the sum of the lower ranks' sizes."""
    import torch.distributed as dist

    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([vocab_size], dtype=torch.int64, device=device), group=group)
    rank = dist.get_rank(group)
    return int(sum(int(s.item()) for s in sizes[:rank]))


def _allreduce_lse(lse: torch.Tensor, group) -> torch.Tensor:
    import torch.distributed as dist

    m = lse.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    partial = torch.exp(lse - m)
    dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=group)
    return m + torch.log(partial)


class FusedSequenceLogProbs(torch.autograd.Function):
    """``(hidden, weight, bias) -> S``: summed log-probs per sequence, (2B,), float32/64."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: TokenPlan, backend, scratch_bytes, group=None):
        H = hidden.shape[-1]
        acc = accumulation_dtype(hidden.dtype)
        h2d = hidden.reshape(-1, H)
        target = plan.target
        if group is not None:
            import torch.distributed as dist

            offset = vocab_offset(weight.shape[0], group, hidden.device)
            target = target - offset
            target = torch.where((target >= 0) & (target < weight.shape[0]), target, -1)
        lse, tgt = backend.forward_stats(h2d, weight, bias, plan.flat_idx, target, scratch_bytes, acc)
        if group is not None:
            lse = _allreduce_lse(lse, group)
            dist.all_reduce(tgt, op=dist.ReduceOp.SUM, group=group)
        ctx.save_for_backward(hidden, weight, bias, plan.flat_idx, target, plan.seq_id, lse)
        ctx.backend, ctx.scratch_bytes, ctx.group = backend, scratch_bytes, group
        return sequence_sum(tgt - lse, plan)

    @staticmethod
    def backward(ctx, grad_seq):
        hidden, weight, bias, flat_idx, target, seq_id, lse = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if ctx.group is not None:
            needs = (True, needs[1], needs[2])  # every rank must join the grad_h all-reduce
        coef = grad_seq.to(lse.dtype)[seq_id]  # dL/dlogp_t of each valid token
        grad_h, grad_w, grad_b = ctx.backend.backward_grads(
            hidden.reshape(-1, hidden.shape[-1]), weight, bias, flat_idx, target, lse, coef,
            ctx.scratch_bytes, needs,
        )
        if ctx.group is not None:
            import torch.distributed as dist

            dist.all_reduce(grad_h, op=dist.ReduceOp.SUM, group=ctx.group)
        if grad_h is not None:
            grad_h = grad_h.view_as(hidden)
        return grad_h, grad_w, grad_b, None, None, None, None
