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

# Budget of one chunk of logits. Measured on the 2-core CPU (one thread, H = 512,
# V = 16,384): the three GEMMs reach their full rate from about 256 rows (fp32 70-95,
# bf16 180-210 GFLOP/s; 64 rows lose 20-40%), i.e. 16 MiB of fp32 logits there, and a
# chunk of 2,048 tokens (128 MiB) is the whole batch in one GEMM. 256 MiB keeps chunks of
# whole pairs of 2 × 1,024 tokens on the pair-chunked path up to V = 32,768 in fp32
# (V = 65,536 in 16-bit), and >= 400 rows per GEMM up to V = 152k.
DEFAULT_SCRATCH_BYTES = 128 * 2**20
DEFAULT_PAIR_SCRATCH_BYTES = DEFAULT_SCRATCH_BYTES  # one knob for both paths here
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


def _reduce_(zf, y, want_sq: bool):
    """One float32/64 block of logits reduced to its softmax statistics; ``zf`` is used up.

    Returns ``e = exp(z - m)`` (a new block) and per row: ``m`` (the max), ``l = Σ e``,
    ``zbar = Σ p z``, ``hit`` (y is the first argmax) and ``lsq = log Σ p²`` or None.
    """
    m, arg = zf.max(dim=-1)  # the first maximal index, as argmax
    zf.sub_(m[:, None])  # z - m in place
    e = zf.exp()
    l = e.sum(-1)
    zbar = m + (e * zf).sum(-1) / l
    lsq = torch.log((e * e).sum(-1)) - 2.0 * torch.log(l) if want_sq else None
    return e, m, l, zbar, ((arg == y) & (y >= 0)), lsq


def _stats(z, y, acc_dtype, want_sq: bool, keep_e: bool):
    """Per row of z: :class:`~alphapo._tokens.TokenStats`, block by block; with ``keep_e``
    each block of ``z`` is overwritten by ``exp(z - m)`` (the pair-chunked path keeps it)."""
    n = z.shape[0]
    tgt = z.gather(1, y.clamp(min=0)[:, None]).squeeze(1).to(acc_dtype)
    tgt = torch.where(y >= 0, tgt, 0.0)
    out = {k: torch.empty(n, dtype=acc_dtype, device=z.device) for k in ("lse", "zbar", "zmax", "hit")}
    out["lsq"] = torch.empty(n, dtype=acc_dtype, device=z.device) if want_sq else None
    for sl in _blocks(n, z.shape[1]):
        block = z[sl]
        zf = block.to(acc_dtype, copy=True)  # a copy: _reduce_ uses it up
        e, m, l, zbar, hit, lsq = _reduce_(zf, y[sl], want_sq)
        out["lse"][sl], out["zbar"][sl], out["zmax"][sl], out["hit"][sl] = m + torch.log(l), zbar, m, hit
        if want_sq:
            out["lsq"][sl] = lsq
        if keep_e:
            block.copy_(e)
    return TokenStats(out["lse"], tgt, out["zbar"], out["zmax"], out["hit"], out["lsq"])


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

    Returns ``dz.sum(0)`` (the chunk's bias gradient) when ``need_b``.
    """
    scale = -coef.to(lse.dtype) * torch.exp(m - lse)
    return _to_dz_(e, lse.dtype, coef, y, need_b, lambda block, sl: block.mul_(scale[sl, None]))


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
