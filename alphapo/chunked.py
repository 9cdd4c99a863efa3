"""The chunked PyTorch backend: token statistics and gradients with one chunk of logits alive.

The same steps the Triton backend provides, in plain torch, so the package works on CPU
(and anywhere torch runs). Two orders of work use them (see :mod:`alphapo._pairchunk`):

**Pair-chunked** (6·N·H·V, the loss with gradients): for a chunk of whole pairs, with
``h`` its valid hidden rows::

    z = chunk_logits(h, W, b, y)      # (n, V) in the input dtype, kept; lse, tgt per token
    ... the chunk's pair epilogue gives coef = dL/dlogp per token ...
    logits_to_dz_(z, lse, coef, y)    # z becomes dz = coef (onehot(y) - softmax(z)), in place

after which the caller runs the two gradient GEMMs on ``dz``.

**Recompute** (8·N·H·V, ``sequence_logprobs`` and the fallback)::

    forward_stats:   for each chunk c:  z = h_c W^T + b;  lse_c = logsumexp(z);  tgt_c = z[y]
    backward_grads:  for each chunk:  recompute z;  dz = coef (onehot(y) - exp(z - lse))
                         grad_h[c] = dz W;  grad_W += dz^T h_c;  grad_b += sum(dz)

Logits come out of the GEMM in the input dtype, as ``nn.Linear`` (and the reference)
computes them; every reduction over them runs in float32 (float64 for float64 inputs),
in blocks of rows small enough to stay in cache, so no float32 copy of a chunk exists.
A recompute chunk holds ``scratch_bytes // (V * itemsize)`` tokens (at least one). A target
of -1 matches no vocabulary row: that is how a vocabulary-parallel rank marks tokens whose
target another rank owns.
"""

from __future__ import annotations

import torch

from ._tokens import TokenStats

# Budgets of one chunk of logits (``scratch_bytes=None``). Measured on the 2-core CPU (one
# thread, H = 512, V = 16,384): the three GEMMs reach their full rate from about 256 rows
# (fp32 70-95, bf16 180-210 GFLOP/s; 64 rows lose 20-40%), and peak memory is the chunk.
# Recompute path: 64 MiB (1,024 fp32 rows at V = 16,384, 110 at V = 151,936). Pair-chunked
# path: the longest pair's logits, kept within [64, 128] MiB — so that a pair of
# 2 × 1,024 tokens still fits at V = 16,384 in float32 (and the whole loss stays
# 6·N·H·V), while a short-pair batch holds no more than it needs — and, once the batch's
# valid-token logits exceed 128 MiB, within 40% of them (not below 64 MiB): the chunk then
# stays well under half of what a method that materialises the logits holds, e.g. two
# pairs of 2 × 512 tokens at (H, V) = (4096, 32,000) take the recompute path (a 125 MiB
# pair against 250 MiB of logits) where one pair's chunk would hold half of them. A pair
# beyond the budget takes the recompute path.
DEFAULT_SCRATCH_BYTES = 64 * 2**20
PAIR_SCRATCH_RANGE = (64 * 2**20, 128 * 2**20)
PAIR_SCRATCH_SHARE = 0.4


def default_pair_scratch(longest_pair_bytes: int, batch_bytes: int) -> int:
    """The pair-chunked budget when ``scratch_bytes`` is None, from the logits of the
    longest pair and of the whole batch (valid tokens): see PAIR_SCRATCH_RANGE."""
    lo, hi = PAIR_SCRATCH_RANGE
    cap = hi if batch_bytes <= hi else min(max(int(PAIR_SCRATCH_SHARE * batch_bytes), lo), hi)
    return min(max(int(longest_pair_bytes), lo), cap)


# Rows per block of the float32 reductions: ~2 MiB of float32 temporaries, one L2.
_BLOCK_BYTES = 2 * 2**20
# Vocabulary rows per grad_W product when it is added into a float32 accumulator.
_GRAD_W_ROWS = 8192


def _chunk_rows(vocab_size: int, scratch_bytes: int, itemsize: int) -> int:
    """Tokens per recompute chunk: one chunk of logits fits scratch_bytes."""
    return max(1, int(scratch_bytes) // (vocab_size * itemsize))


def _blocks(n: int, V: int):
    """Row slices of an (n, V) tile with at most _BLOCK_BYTES of float32 each, and at most
    half its rows, so that a float32 block of a 16-bit tile is no larger than the tile."""
    step = max(1, min(_BLOCK_BYTES // (4 * V), n // 2))
    return (slice(i, min(n, i + step)) for i in range(0, n, step))


def _logits(h, weight, bias):
    """``h W^T + b`` in the input dtype (float32 accumulation inside the GEMM)."""
    z = h @ weight.t()
    if bias is not None:
        z += bias
    return z


def _rowdot(a, b):
    """Σ_v a_v b_v per row, with no product tensor (on this CPU 2.4× faster than
    ``(a * b).sum(-1)`` and 6× faster than a batched GEMV)."""
    return torch.linalg.vecdot(a, b)


def _first_argmax_hits(z, m, tgt, y):
    """1 where the target is the row's first maximum (torch.argmax's tie rule; ties are
    common in 16-bit logits). Only rows whose target reaches the max need the search."""
    hit = (tgt >= m) & (y >= 0)
    rows = hit.nonzero().squeeze(1) if z.device.type == "cpu" else None
    if rows is None:  # elsewhere: no data-dependent shapes (no sync), one more pass
        return hit & ((z == m[:, None]).int().argmax(-1) == y)
    if rows.numel():
        first = (z[rows] == m[rows, None]).int().argmax(-1)
        hit[rows] = first == y[rows]
    return hit


def _stats(z, y, acc_dtype, want_sq: bool, keep_e: bool):
    """Per row of z: :class:`~alphapo._tokens.TokenStats`, block by block; with ``keep_e``
    each block of ``z`` is overwritten by ``e = exp(z - m)`` (the pair-chunked path keeps
    it: ``softmax = e / Σ e``). One exponential per logit; ``Σ p z`` and ``Σ p²`` are
    row-wise dot products, so no product tensor exists."""
    n = z.shape[0]
    tgt = z.gather(1, y.clamp(min=0)[:, None]).squeeze(1).to(acc_dtype)
    tgt = torch.where(y >= 0, tgt, 0.0)
    out = {k: torch.empty(n, dtype=acc_dtype, device=z.device) for k in ("lse", "zbar", "zmax")}
    out["hit"] = torch.empty(n, dtype=torch.bool, device=z.device)
    out["lsq"] = torch.empty(n, dtype=acc_dtype, device=z.device) if want_sq else None
    scratch = None
    for sl in _blocks(n, z.shape[1]):
        block = z[sl]
        zf = block.to(acc_dtype)  # the block itself for float32 (float64) inputs
        m = zf.amax(dim=-1)
        out["hit"][sl] = _first_argmax_hits(zf, m, tgt[sl], y[sl])
        if zf is block and keep_e:
            # z - m into one reused buffer, exp(z - m) straight back into the tile: no copy
            if scratch is None:
                scratch = torch.empty_like(block)
            e, zf = block, torch.sub(block, m[:, None], out=scratch[: block.shape[0]])
            torch.exp(zf, out=e)
        else:
            zf = zf.sub_(m[:, None])
            e = zf.exp()
        l = e.sum(-1)
        out["lse"][sl], out["zmax"][sl] = m + torch.log(l), m
        out["zbar"][sl] = m + _rowdot(e, zf) / l
        if want_sq:
            out["lsq"][sl] = torch.log(_rowdot(e, e)) - 2.0 * torch.log(l)
        if keep_e and e is not block:
            block.copy_(e)
    return TokenStats(out["lse"], tgt, out["zbar"], out["zmax"], out["hit"].to(acc_dtype), out["lsq"])


# ----------------------------------------------------------------------------- pair-chunked


def chunk_logits(h, weight, bias, y, acc_dtype, want_sq: bool = False):
    """The chunk's logits, reduced and kept: ``(e, stats, m)``.

    ``e = exp(z - m)`` (n, V), with ``m`` the row max, overwrites ``z = h W^T + b`` in the
    input dtype: the one exponential of the chunk. ``stats`` (:class:`TokenStats`) holds
    ``lse = m + log Σ e``; ``softmax = e · exp(m - lse)`` in :func:`logits_to_dz_` later
    — with the lse of the whole vocabulary there, under vocabulary parallelism.
    """
    z = _logits(h, weight, bias)
    stats = _stats(z, y, acc_dtype, want_sq, keep_e=True)
    return z, stats, stats.zmax


def logits_to_dz_(e, lse, coef, y, need_b: bool, m=None):
    """Turn :func:`chunk_logits`' ``e`` into ``dz = coef (onehot(y) - e · exp(m - lse))`` in place.

    Returns ``dz.sum(0)`` (the chunk's bias gradient) when ``need_b``. A 16-bit tile is
    scaled in its own dtype (float32 arithmetic, one rounding per entry), except the target
    entries, ``coef (1 - p_y)``, formed in float32 first: with ``p_y`` near 1 the difference
    would otherwise lose its digits to a rounded ``coef · p_y``.
    """
    acc = lse.dtype
    scale = -coef.to(acc) * torch.exp(m - lse)
    if e.dtype == acc or need_b:
        return _to_dz_(e, acc, coef, y, need_b, lambda block, sl: block.mul_(scale[sl, None]))
    rows = torch.arange(e.shape[0], device=e.device)
    hit = y >= 0
    for sl in _blocks(e.shape[0], e.shape[1]):
        block = e[sl]
        r, yy = rows[sl][hit[sl]] - sl.start, y[sl][hit[sl]]
        at_target = block[r, yy].to(acc) * scale[sl][r] + coef[sl][r].to(acc)
        block.mul_(scale[sl, None])
        block[r, yy] = at_target.to(block.dtype)
    return None


def _to_dz_(tile, acc, coef, y, need_b, minus_coef_p):
    """``tile`` into ``dz = coef · onehot(y) - coef · p`` in place, block by block in ``acc``
    (float32/64), rounded once into the tile's dtype; ``minus_coef_p(block, rows)`` turns a
    float block of the tile into ``-coef · p`` in place. Returns ``dz.sum(0)`` if ``need_b``."""
    grad_b = torch.zeros(tile.shape[1], dtype=acc, device=tile.device) if need_b else None
    rows = torch.arange(tile.shape[0], device=tile.device)
    hit = y >= 0  # no target column where another rank owns the target
    for sl in _blocks(tile.shape[0], tile.shape[1]):
        block = tile[sl]
        dz = minus_coef_p(block.to(acc), sl)
        r, yy = rows[sl][hit[sl]] - sl.start, y[sl][hit[sl]]
        dz[r, yy] += coef[sl][r].to(acc)
        if need_b:
            grad_b += dz.sum(0)
        if dz is not block:
            block.copy_(dz)
    return grad_b


def chunk_gradients_(dz, h, weight, idx, db, grad_h, grad_w, grad_b, single: bool):
    """One chunk's share of the gradients: ``grad_h[idx] = dz W`` (rows written once),
    ``grad_W (+)= dz^T h`` and ``grad_b += db``; None skips a gradient. Returns grad_W:
    with a ``single`` chunk, that chunk's product itself (no accumulator)."""
    if grad_h is not None:
        grad_h.index_copy_(0, idx, dz @ weight)
    if single and grad_w is None and h is not None:
        grad_w = dz.t() @ h
    elif grad_w is not None:
        add_grad_weight_(grad_w, dz, h)
    if grad_b is not None:
        grad_b += db
    return grad_w


def add_grad_weight_(acc: torch.Tensor, dz: torch.Tensor, h: torch.Tensor) -> None:
    """``acc += dz^T h`` for a float32 (float64) accumulator and input-dtype ``dz``, ``h``.

    On CUDA the product accumulates in float32 without being rounded first
    (``out_dtype``, torch >= 2.8). Elsewhere a 16-bit GEMM rounds its output: each product
    is rounded once to the input dtype before it is added, in slices of the vocabulary so
    the temporary stays small (measured error: see tests/test_pairchunk.py). float32 and
    float64 inputs accumulate in place.
    """
    if dz.dtype == acc.dtype:
        acc.addmm_(dz.t(), h)
        return
    if acc.device.type == "cuda":
        try:
            torch.addmm(acc, dz.t(), h, out_dtype=acc.dtype, out=acc)
            return
        except (TypeError, RuntimeError):  # torch < 2.8: no out_dtype
            pass
    for v0 in range(0, acc.shape[0], _GRAD_W_ROWS):
        acc[v0 : v0 + _GRAD_W_ROWS] += dz[:, v0 : v0 + _GRAD_W_ROWS].t() @ h


# ----------------------------------------------------------------------------- recompute


def _recomputed_to_dz_(z, lse, coef, y, need_b: bool):
    """Recomputed logits ``z`` into ``dz = coef (onehot(y) - exp(z - lse))`` in place."""
    c = coef.to(lse.dtype)
    return _to_dz_(z, lse.dtype, coef, y, need_b,
                   lambda block, sl: block.sub_(lse[sl, None]).exp_().mul_(-c[sl, None]))


def forward_stats(h2d, weight, bias, flat_idx, target, scratch_bytes, acc_dtype, want_sq: bool = False):
    """Per valid token: :class:`~alphapo._tokens.TokenStats` (``lse``, ``tgt = z[target]``,
    0 for target -1, and the metrics' statistics)."""
    N = flat_idx.numel()
    step = _chunk_rows(weight.shape[0], scratch_bytes, weight.element_size())
    parts = []
    for start in range(0, N, step):
        sl = slice(start, start + step)
        z = _logits(h2d[flat_idx[sl]], weight, bias)
        parts.append(_stats(z, target[sl], acc_dtype, want_sq, keep_e=False))
        del z
    if not parts:
        empty = torch.empty(0, dtype=acc_dtype, device=h2d.device)
        return TokenStats(empty, empty, empty, empty, empty, empty if want_sq else None)
    return TokenStats(*(None if f[0] is None else torch.cat(f) for f in zip(*parts)))


def backward_grads(h2d, weight, bias, flat_idx, target, lse, coef, scratch_bytes, needs):
    """Gradients of ``Σ_t coef_t · (z_t[y_t] - lse_t)`` w.r.t. h2d, weight and bias.

    ``needs`` = (hidden, weight, bias) flags. grad_h comes back full-size (zeros on
    ignored rows) in hidden's dtype, grad_W and grad_b in the parameters' dtypes; with
    one chunk grad_W is that chunk's product, otherwise a float32 accumulator.
    """
    need_h, need_w, need_b = needs
    acc = lse.dtype
    N = flat_idx.numel()
    step = _chunk_rows(weight.shape[0], scratch_bytes, weight.element_size())
    single = N <= step
    grad_h = torch.zeros_like(h2d) if need_h else None
    grad_w = None
    if need_w and not single:
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
    for start in range(0, N, step):
        sl = slice(start, start + step)
        h = h2d[flat_idx[sl]]
        dz = _logits(h, weight, bias)
        db = _recomputed_to_dz_(dz, lse[sl], coef[sl], target[sl], need_b)
        grad_w = chunk_gradients_(dz, h if need_w else None, weight, flat_idx[sl], db, grad_h, grad_w, grad_b, single)
        del dz
    if N == 0 and need_w:
        grad_w = torch.zeros_like(weight)
    return (
        grad_h,
        grad_w.to(weight.dtype) if need_w else None,
        grad_b.to(bias.dtype) if need_b else None,
    )
