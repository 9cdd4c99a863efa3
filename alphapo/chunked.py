"""The chunked PyTorch backend: per-sequence log-probs with at most one chunk of logits alive.

The same structure the Triton backend has, in plain torch, so the package works on CPU
(and anywhere torch runs)::

    forward:  for each chunk of valid tokens c:  z = h_c W^T + b  (float32)
                  lse_c = logsumexp(z);  logp_c = z[y] - lse_c
              S = per-sequence sum of logp                       # (2B,)
    backward: c_t = dL/dS[seq(t)]
              for each chunk:  recompute z;  dz = c (onehot(y) - exp(z - lse))
                  grad_h[c] = dz W;  grad_W += dz^T h_c;  grad_b += sum(dz)

A chunk holds ``scratch_bytes // (V * 4)`` tokens (at least one), so the live logits never
exceed ``scratch_bytes`` (plus the dtype copy of one chunk for half-precision inputs).
``grad_W`` accumulates in float32 (a V×H buffer for half-precision weights; the Triton
backend avoids it).
"""

from __future__ import annotations

import torch

from ._tokens import TokenPlan, accumulation_dtype, sequence_sum

DEFAULT_SCRATCH_BYTES = 64 * 2**20


def _chunk_rows(vocab_size: int, scratch_bytes: int) -> int:
    return max(1, int(scratch_bytes) // (vocab_size * 4))


def _logits(h, weight, bias, acc_dtype):
    z = h @ weight.t()
    if bias is not None:
        z = z + bias
    return z.to(acc_dtype)


class ChunkedSequenceLogProbs(torch.autograd.Function):
    """``(hidden, weight, bias) -> S``: summed log-probs per sequence, shape (2B,)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: TokenPlan, scratch_bytes: int):
        H = hidden.shape[-1]
        V = weight.shape[0]
        acc = accumulation_dtype(hidden.dtype)
        h2d = hidden.reshape(-1, H)
        N = plan.flat_idx.numel()
        step = _chunk_rows(V, scratch_bytes)
        token_logps = torch.empty(N, dtype=acc, device=hidden.device)
        lse = torch.empty(N, dtype=acc, device=hidden.device)
        for start in range(0, N, step):
            sl = slice(start, start + step)
            z = _logits(h2d[plan.flat_idx[sl]], weight, bias, acc)
            lse[sl] = torch.logsumexp(z, dim=-1)
            token_logps[sl] = z.gather(1, plan.target[sl, None]).squeeze(1) - lse[sl]
            del z
        ctx.save_for_backward(hidden, weight, bias, plan.flat_idx, plan.target, plan.seq_id, lse)
        ctx.step = step
        return sequence_sum(token_logps, plan)

    @staticmethod
    def backward(ctx, grad_seq):
        hidden, weight, bias, flat_idx, target, seq_id, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        H = hidden.shape[-1]
        acc = lse.dtype
        h2d = hidden.reshape(-1, H)
        coef = grad_seq.to(acc)[seq_id]  # dL/dlogp for each valid token
        grad_h = torch.zeros_like(h2d) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        for start in range(0, flat_idx.numel(), ctx.step):
            sl = slice(start, start + ctx.step)
            h = h2d[flat_idx[sl]]
            c = coef[sl, None]
            # dz = c * (onehot(y) - softmax(z)), built in place in the recomputed logits.
            dz = _logits(h, weight, bias, acc).sub_(lse[sl, None]).exp_().mul_(-c)
            dz.scatter_add_(1, target[sl, None], c)
            if need_h:
                grad_h[flat_idx[sl]] = (dz.to(weight.dtype) @ weight).to(grad_h.dtype)
            if need_w:
                grad_w.addmm_(dz.t(), h.to(acc))
            if need_b:
                grad_b += dz.sum(0)
            del dz
        return (
            grad_h.view_as(hidden) if need_h else None,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
            None,
            None,
        )
