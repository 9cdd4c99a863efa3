"""The chunked PyTorch backend: token statistics and gradients with one chunk of logits alive.

The same two steps the Triton backend provides, in plain torch, so the package works on
CPU (and anywhere torch runs). Over the N valid tokens (rows ``flat_idx`` of ``h2d``)::

    forward_stats:   for each chunk c:  z = h_c W^T + b  (float32)
                         lse_c = logsumexp(z);  tgt_c = z[y]   (0 where y = -1)
    backward_grads:  for each chunk:  recompute z;  dz = coef (onehot(y) - exp(z - lse))
                         grad_h[c] = dz W;  grad_W += dz^T h_c;  grad_b += sum(dz)

A chunk holds ``scratch_bytes // (V * itemsize)`` tokens (at least one; itemsize of the
float32 or float64 accumulation), so the live logits never exceed ``scratch_bytes`` (plus
the input-dtype product of one chunk for half-precision inputs).
``grad_W`` accumulates in float32 (a V×H buffer for half-precision weights; the Triton
backend avoids it). A target of -1 matches no vocabulary row: that is how a
vocabulary-parallel rank marks tokens whose target another rank owns.
"""

from __future__ import annotations

import torch

DEFAULT_SCRATCH_BYTES = 64 * 2**20


def _chunk_rows(vocab_size: int, scratch_bytes: int, acc_dtype: torch.dtype) -> int:
    """Tokens per chunk: one chunk of logits in the accumulation dtype fits scratch_bytes."""
    itemsize = torch.empty((), dtype=acc_dtype).element_size()
    return max(1, int(scratch_bytes) // (vocab_size * itemsize))


def _logits(h, weight, bias, acc_dtype):
    z = h @ weight.t()
    if bias is not None:
        z = z + bias
    return z.to(acc_dtype)


def forward_stats(h2d, weight, bias, flat_idx, target, scratch_bytes, acc_dtype):
    """Per valid token: ``lse = logsumexp(z)`` and ``tgt = z[target]`` (0 for target -1)."""
    N = flat_idx.numel()
    step = _chunk_rows(weight.shape[0], scratch_bytes, acc_dtype)
    lse = torch.empty(N, dtype=acc_dtype, device=h2d.device)
    tgt = torch.empty(N, dtype=acc_dtype, device=h2d.device)
    for start in range(0, N, step):
        sl = slice(start, start + step)
        z = _logits(h2d[flat_idx[sl]], weight, bias, acc_dtype)
        lse[sl] = torch.logsumexp(z, dim=-1)
        y = target[sl]
        tgt[sl] = torch.where(y >= 0, z.gather(1, y.clamp(min=0)[:, None]).squeeze(1), 0.0)
        del z
    return lse, tgt


def backward_grads(h2d, weight, bias, flat_idx, target, lse, coef, scratch_bytes, needs):
    """Gradients of ``Σ_t coef_t · (z_t[y_t] - lse_t)`` w.r.t. h2d, weight and bias.

    ``needs`` = (hidden, weight, bias) flags. grad_h comes back full-size (zeros on
    ignored rows) in hidden's dtype, grad_W and grad_b in the parameters' dtypes.
    """
    need_h, need_w, need_b = needs
    acc = lse.dtype
    step = _chunk_rows(weight.shape[0], scratch_bytes, acc)
    grad_h = torch.zeros_like(h2d) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
    for start in range(0, flat_idx.numel(), step):
        sl = slice(start, start + step)
        h = h2d[flat_idx[sl]]
        c = coef[sl, None]
        y = target[sl, None]
        # dz = c * (onehot(y) - softmax(z)), built in place in the recomputed logits.
        dz = _logits(h, weight, bias, acc).sub_(lse[sl, None]).exp_().mul_(-c)
        dz.scatter_add_(1, y.clamp(min=0), torch.where(y >= 0, c, 0.0))
        if need_h:
            grad_h[flat_idx[sl]] = (dz.to(weight.dtype) @ weight).to(grad_h.dtype)
        if need_w:
            grad_w.addmm_(dz.t(), h.to(acc))
        if need_b:
            grad_b += dz.sum(0)
        del dz
    return (
        grad_h,
        grad_w.to(weight.dtype) if need_w else None,
        grad_b.to(bias.dtype) if need_b else None,
    )
