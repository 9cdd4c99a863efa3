"""Fused lm-head → log-softmax statistics, and the recomputing backward, in Triton.

The PyTorch this replaces, over the N valid tokens ``h = hidden.reshape(-1, H)[flat_idx]``::

    z   = h @ W.T + b                       # (N, V): never materialised here
    lse = z.logsumexp(-1);  tgt = z.gather(-1, y[:, None])[:, 0]
    # backward, given coef = dL/dlogp per token:
    dz  = coef[:, None] * (one_hot(y, V) - softmax(z))
    grad_h = dz @ W;  grad_W = dz.T @ h;  grad_b = dz.sum(0)

Memory. The forward keeps no logits at all, not even a tile in global memory: each program
owns ``BLOCK_N`` tokens and one split of the vocabulary and reduces its logit tiles on the
fly (online log-sum-exp ``m_i``/``l_i`` and the target logit), writing three floats per
token and split; the splits are combined exactly afterwards. Splitting the vocabulary lets
a small token count still fill the GPU.

The backward's design (DESIGN.md §3). A fully fused backward (CCE's way) adds every
(token block × vocabulary tile) partial of ``grad_h`` and ``grad_W`` into global memory
across programs: ≈ N·H·V/BLOCK_V + V·H·N/BLOCK_N read-modify-writes (≈ 1e11 at the
Llama-3-8B head), atomics that are slow, inaccurate in bf16 and non-deterministic. Here the
backward walks the vocabulary in slices of ``V_s`` columns, sized so that ``dz`` for the
slice (N × V_s, input dtype) fits ``scratch_bytes``:

1. ``_dz_kernel`` recomputes the slice's logit tiles and writes ``dz`` (and, with a bias,
   per-block column sums of ``dz`` in float32, reduced without atomics);
2. ``grad_W[slice] = dz.T @ h``: one GEMM with float32 accumulation, each row of
   ``grad_W`` written once in the weight's dtype (no V×H float32 buffer);
3. ``_grad_h_kernel`` adds ``dz @ W[slice]`` into a float32 N×H accumulator, and on the
   last slice writes ``grad_hidden`` rows (scattered back through ``flat_idx``) in the
   hidden dtype. With a single slice it writes straight out, with no accumulator.

Cost: 2·N·H·V (forward) + 3 × 2·N·H·V (backward) = 8·N·H·V, the minimum without stored
logits, plus ≈ 3·N·V·2 bytes of ``dz`` traffic. Extra memory: the ``dz`` slice
(≤ ``scratch_bytes``), the float32 ``grad_h`` accumulator (N·H·4, only with several
slices), the compacted hidden rows (N·H, only when some tokens are ignored) and O(N)
statistics — nothing grows with N·V, nothing is V×H in float32. No atomics anywhere: the
same inputs give bitwise-identical results on the same device.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .config import FWD_IMPL, GRID_WAVES, PERSISTENT_WAVES, LaunchConfig, gpu_family, launch_config

try:  # host-side TMA descriptors: Triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton keeps the pointer forward
    TensorDescriptor = None

# dz slice budget: at the Llama-3-8B head with 16,384 bf16 tokens this is a slice of
# 6,144 columns (21 slices); with the 256 MiB float32 grad_h accumulator the backward's
# extra memory stays under 512 MB.
DEFAULT_SCRATCH_BYTES = 192 * 2**20
# Pair-chunked path: the logits of one chunk of whole pairs, in the input dtype. 1 GiB holds
# 4,185 bf16 tokens at the Llama-3-8B head (V = 128,256): a pair of 2 × 2,048 tokens. With
# the 2.1 GB float32 grad_W accumulator that is ≈ 3.2 GB extra, under Liger's 4.0 GB there
# (DESIGN.md §3); pass a smaller scratch_bytes for the lean recompute path.
DEFAULT_PAIR_SCRATCH_BYTES = 2**30


def default_pair_scratch(longest_pair_bytes: int, batch_bytes: int) -> int:
    """The pair-chunked budget when ``scratch_bytes`` is None: a fixed 1 GiB on GPUs."""
    return DEFAULT_PAIR_SCRATCH_BYTES


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _logit_tile(
    h_ptr, w_ptr, b_ptr, rows, mask_n, offs_v, mask_v, H,
    stride_hn, stride_hh, stride_wv, stride_wh,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """float32 tile ``z[rows, offs_v] = h[rows] @ W[offs_v].T (+ b)`` via tl.dot over H.

    ``rows`` are int64 row ids into ``h``; ``offs_v`` int32 vocabulary ids, widened to
    int64 in the address arithmetic only (``offs_v * stride_wv`` passes 2**31 once V·H does).
    """
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    offs_h = tl.arange(0, BLOCK_H)
    h_ptrs = h_ptr + rows[:, None] * stride_hn + offs_h[None, :] * stride_hh
    w_ptrs = w_ptr + offs_v[None, :].to(tl.int64) * stride_wv + offs_h[:, None] * stride_wh
    for h0 in range(0, H, BLOCK_H):
        mask_h = (h0 + offs_h) < H
        a = tl.load(h_ptrs, mask=mask_n[:, None] & mask_h[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=mask_h[:, None] & mask_v[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_H * stride_hh
        w_ptrs += BLOCK_H * stride_wh
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _online_stats(z, offs_v, mask_v, y, m_i, l_i, s_i, q_i, b_i, tgt):
    """Fold one float32 logit tile into the running softmax statistics of its rows: the
    max ``m_i``, ``l_i = Σ e``, ``s_i = Σ e·z`` (entropy) and ``q_i = Σ e²`` (WPO), all with
    ``e = exp(z - m_i)``, the target logit, and ``b_i``, the largest logit *before* the
    target's column (the target is the first argmax iff ``tgt >= m`` and ``tgt > b``, the
    tie rule of torch.argmax) — no argmax index tile, which spilled registers. Columns
    outside ``mask_v`` are padding; their ``z`` is 0 (masked loads), so ``e·z`` is 0 there."""
    zm = tl.where(mask_v[None, :], z, float("-inf"))
    # Every split holds >= 1 column, so m_new is finite from the first tile on.
    m_new = tl.maximum(m_i, tl.max(zm, axis=1))
    scale = tl.exp(m_i - m_new)
    e = tl.exp(zm - m_new[:, None])  # 0 on padding
    l_i = l_i * scale + tl.sum(e, axis=1)
    s_i = s_i * scale + tl.sum(e * z, axis=1)
    q_i = q_i * scale * scale + tl.sum(e * e, axis=1)
    b_i = tl.maximum(b_i, tl.max(tl.where(offs_v[None, :] < y[:, None], zm, float("-inf")), axis=1))
    tgt += tl.sum(tl.where(offs_v[None, :] == y[:, None], z, 0.0), axis=1)
    return m_new, l_i, s_i, q_i, b_i, tgt


@triton.jit
def _store_stats(part_ptr, stride_part, out, mask_n, m_i, l_i, tgt, s_i, q_i, b_i):
    """One split's partial statistics, field by field: (m, l, tgt, s, q, b) × splits × N."""
    tl.store(part_ptr + out, m_i, mask=mask_n)
    tl.store(part_ptr + stride_part + out, l_i, mask=mask_n)
    tl.store(part_ptr + 2 * stride_part + out, tgt, mask=mask_n)
    tl.store(part_ptr + 3 * stride_part + out, s_i, mask=mask_n)
    tl.store(part_ptr + 4 * stride_part + out, q_i, mask=mask_n)
    tl.store(part_ptr + 5 * stride_part + out, b_i, mask=mask_n)


@triton.jit
def _lse_fwd_kernel(
    # pointers
    h_ptr, w_ptr, b_ptr, idx_ptr, y_ptr, part_ptr, z_ptr,
    # sizes
    N, V, H, V_PER_SPLIT,
    # strides
    stride_hn, stride_hh, stride_wv, stride_wh, stride_zn, stride_part,
    # meta-parameters
    HAS_BIAS: tl.constexpr, STORE_Z: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Per (token block, vocabulary split): the online softmax statistics of
    :func:`_online_stats` (log-sum-exp, target logit, the metrics' sums); with ``STORE_Z`` (the pair-chunked path) each logit tile is also written to ``z``, in
    z's dtype, at row ``n`` (the token's place in the chunk)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    # int64 rows: row * stride_hn passes 2**31 once N·H does.
    rows = tl.load(idx_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    y = tl.load(y_ptr + offs_n, mask=mask_n, other=-1).to(tl.int32)

    m_i = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
    q_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
    b_i = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    tgt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_start = pid_s * V_PER_SPLIT
    v_end = tl.minimum(v_start + V_PER_SPLIT, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_end
        z = _logit_tile(
            h_ptr, w_ptr, b_ptr, rows, mask_n, offs_v, mask_v, H,
            stride_hn, stride_hh, stride_wv, stride_wh,
            HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION,
        )
        if STORE_Z:  # before the reduction: its temporaries and the stored copy never coexist
            z_ptrs = z_ptr + offs_n[:, None].to(tl.int64) * stride_zn + offs_v[None, :]
            tl.store(z_ptrs, z.to(z_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_v[None, :])
        m_i, l_i, s_i, q_i, b_i, tgt = _online_stats(z, offs_v, mask_v, y, m_i, l_i, s_i, q_i, b_i, tgt)

    _store_stats(part_ptr, stride_part, pid_s * N + offs_n, mask_n, m_i, l_i, tgt, s_i, q_i, b_i)


@triton.jit
def _lse_fwd_tma_kernel(
    # tensor descriptors (TMA) and pointers
    h_desc, w_desc, b_ptr, y_ptr, part_ptr,
    # sizes
    N, V, H, V_PER_SPLIT, ROW_BLOCKS, ITEMS, stride_part,
    # meta-parameters
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The forward as a persistent kernel over TMA tensor descriptors (sm_90 and newer).

    Same work items as ``_lse_fwd_kernel`` — (token block, vocabulary split), token block
    fastest so that programs running side by side sweep the same weight tiles out of L2 —
    but ``NUM_PROGRAMS`` programs (one per SM) loop over them, and tiles arrive through
    the copy engine from a compacted, contiguous ``hidden`` (N × H). DESIGN.md §3 measured
    this structure at 1.01× cuBLAS on the lm-head GEMM where the pointer loop reached
    0.81–0.85×. TMA fills out-of-bounds rows and columns with zeros.
    """
    pid = tl.program_id(0)
    for item in range(pid, ITEMS, NUM_PROGRAMS):
        pid_n = item % ROW_BLOCKS
        pid_s = item // ROW_BLOCKS
        n0 = pid_n * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        y = tl.load(y_ptr + offs_n, mask=mask_n, other=-1).to(tl.int32)
        m_i = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
        s_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
        q_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
        b_i = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        tgt = tl.zeros((BLOCK_N,), dtype=tl.float32)
        v_start = pid_s * V_PER_SPLIT
        v_end = tl.minimum(v_start + V_PER_SPLIT, V)
        for v0 in range(v_start, v_end, BLOCK_V):
            acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
            for h0 in range(0, H, BLOCK_H):
                a = h_desc.load([n0, h0])
                b = w_desc.load([v0, h0])
                acc = tl.dot(a, b.T, acc, input_precision=DOT_PRECISION)
            offs_v = v0 + tl.arange(0, BLOCK_V)
            mask_v = offs_v < v_end
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
            m_i, l_i, s_i, q_i, b_i, tgt = _online_stats(acc, offs_v, mask_v, y, m_i, l_i, s_i, q_i, b_i, tgt)
        _store_stats(part_ptr, stride_part, pid_s * N + offs_n, mask_n, m_i, l_i, tgt, s_i, q_i, b_i)


@triton.jit
def _dz_kernel(
    # pointers
    h_ptr, w_ptr, b_ptr, idx_ptr, y_ptr, lse_ptr, coef_ptr, dz_ptr, db_ptr, tile_max_ptr,
    # sizes
    N, V, H, v_lo, V_S,
    # strides
    stride_hn, stride_hh, stride_wv, stride_wh, stride_dzn, stride_dbn, stride_tmn,
    # meta-parameters
    HAS_BIAS: tl.constexpr, NEED_DB: tl.constexpr, FILTER: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dz[n, v - v_lo] = coef_n (1[v = y_n] - exp(z_nv - lse_n)) for v in [v_lo, v_lo + V_S);
    ``HAS_BIAS``: the logits carry a bias; ``NEED_DB``: also write its gradient's partials
    (a frozen bias is still part of the logits)."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = tl.load(idx_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    offs_s = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # column within the slice
    offs_v = v_lo + offs_s
    mask_v = (offs_s < V_S) & (offs_v < V)
    z = _logit_tile(
        h_ptr, w_ptr, b_ptr, rows, mask_n, offs_v, mask_v, H,
        stride_hn, stride_hh, stride_wv, stride_wh,
        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION,
    )
    y = tl.load(y_ptr + offs_n, mask=mask_n, other=-1).to(tl.int32)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    coef = tl.load(coef_ptr + offs_n, mask=mask_n, other=0.0)  # 0 on padded rows: dz = 0 there
    p = tl.exp(z - lse[:, None])
    dz = coef[:, None] * (tl.where(offs_v[None, :] == y[:, None], 1.0, 0.0) - p)
    mask = mask_n[:, None] & mask_v[None, :]
    dz_ptrs = dz_ptr + offs_n[:, None].to(tl.int64) * stride_dzn + offs_s[None, :]
    tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
    if NEED_DB:
        # Per-block column sums in float32, reduced in a fixed order on the host side.
        col = tl.sum(tl.where(mask, dz, 0.0), axis=0)
        tl.store(db_ptr + pid_n * stride_dbn + offs_s, col, mask=mask_v)
    if FILTER:
        # max |dz| of the tile: _grad_h_kernel skips tiles that cannot move grad_hidden.
        tl.store(tile_max_ptr + pid_n * stride_tmn + pid_v, tl.max(tl.max(tl.abs(tl.where(mask, dz, 0.0)), axis=1), axis=0))


@triton.jit
def _dz_tile_kernel(
    # pointers
    z_ptr, y_ptr, lse_ptr, coef_ptr, db_ptr,
    # sizes
    N, V, ROWS_PER_PROGRAM,
    # strides
    stride_zn, stride_dbn,
    # meta-parameters
    NEED_DB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """z[n, v] <- coef_n (1[v = y_n] - exp(z_nv - lse_n)), in place: the pair-chunked
    forward's stored logits become dz. Each program owns ROWS_PER_PROGRAM rows of one
    column block, so that for the bias gradient its column sums of dz (float32) are one partial per
    program, reduced in a fixed order on the host side (no atomics)."""
    pid_r = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V
    col = tl.zeros((BLOCK_V,), dtype=tl.float32)
    r_end = tl.minimum(N, (pid_r + 1) * ROWS_PER_PROGRAM)
    for r0 in range(pid_r * ROWS_PER_PROGRAM, r_end, BLOCK_N):
        offs_n = r0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < r_end
        mask = mask_n[:, None] & mask_v[None, :]
        ptrs = z_ptr + offs_n[:, None].to(tl.int64) * stride_zn + offs_v[None, :]
        z = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs_n, mask=mask_n, other=-1).to(tl.int32)
        lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
        coef = tl.load(coef_ptr + offs_n, mask=mask_n, other=0.0)
        dz = coef[:, None] * (tl.where(offs_v[None, :] == y[:, None], 1.0, 0.0) - tl.exp(z - lse[:, None]))
        tl.store(ptrs, dz.to(z_ptr.dtype.element_ty), mask=mask)
        if NEED_DB:
            col += tl.sum(tl.where(mask, dz, 0.0), axis=0)
    if NEED_DB:
        tl.store(db_ptr + pid_r * stride_dbn + offs_v, col, mask=mask_v)


@triton.jit
def _grad_h_kernel(
    # pointers
    dz_ptr, w_ptr, acc_ptr, out_ptr, idx_ptr, tile_max_ptr,
    # sizes
    N, H, v_lo, V_S, filter_eps,
    # strides
    stride_dzn, stride_wv, stride_wh, stride_accn, stride_outn, stride_tmn,
    # meta-parameters
    FIRST: tl.constexpr, LAST: tl.constexpr, FILTER: tl.constexpr, DZ_BLOCK_V: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """acc[n, :] (+)= dz[n, :] @ W[v_lo : v_lo + V_S]; on the last slice, out[idx[n]] = acc."""
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_n = offs_n < N
    mask_h = offs_h < H
    offs_k = tl.arange(0, BLOCK_K)
    dz_ptrs = dz_ptr + offs_n[:, None].to(tl.int64) * stride_dzn + offs_k[None, :]
    w_ptrs = w_ptr + (v_lo + offs_k[:, None]).to(tl.int64) * stride_wv + offs_h[None, :] * stride_wh
    acc = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, V_S, BLOCK_K):
        keep = True
        if FILTER:  # the dz tile holding these K columns (same rows: BLOCK_N = dz's block)
            keep = tl.load(tile_max_ptr + pid_n * stride_tmn + k0 // DZ_BLOCK_V) > filter_eps
        if keep:
            mask_k = (k0 + offs_k) < V_S
            a = tl.load(dz_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=mask_k[:, None] & mask_h[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        dz_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wv
    mask = mask_n[:, None] & mask_h[None, :]
    acc_ptrs = acc_ptr + offs_n[:, None].to(tl.int64) * stride_accn + offs_h[None, :]
    if not FIRST:
        acc += tl.load(acc_ptrs, mask=mask, other=0.0)
    if LAST:
        rows = tl.load(idx_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
        out_ptrs = out_ptr + rows[:, None] * stride_outn + offs_h[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(acc_ptrs, acc, mask=mask)


# ----------------------------------------------------------------------------- launchers

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs follow torch's matmul precision: exact ("ieee") unless TF32 is allowed."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _check(h2d, weight):
    if h2d.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f'backend="triton" supports {SUPPORTED_DTYPES} inputs, got {h2d.dtype}: use backend="torch" for it'
        )
    if h2d.dtype == torch.bfloat16 and _interpreting():
        # Symptom: Triton's CPU interpreter (3.9) returns garbage from tl.dot on bf16 operands
        # (a loss of 9.06e21 where the reference gives 3.885); fp32 and fp16 are exact there.
        raise TypeError(
            'backend="triton" under TRITON_INTERPRET=1 cannot compute bfloat16 (the interpreter\'s bf16 tl.dot '
            'is wrong): use float16 or float32 in the interpreter, backend="torch" on the CPU, or a GPU'
        )
    if not (h2d.is_cuda or _interpreting()):
        raise RuntimeError('backend="triton" needs CUDA tensors (or TRITON_INTERPRET=1); use backend="torch"')


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter: small, but enough for a persistent loop of several items


def _vocab_splits(N: int, V: int, cfg: LaunchConfig, waves: int, device) -> tuple[int, int]:
    """(V_PER_SPLIT, splits): about ``waves`` × SMs (token block × split) work items, so a
    small token count still fills the GPU; each split holds whole vocabulary tiles."""
    row_blocks = triton.cdiv(N, cfg.block_m)
    max_splits = triton.cdiv(V, cfg.block_n)
    splits = min(max_splits, max(1, triton.cdiv(waves * _sm_count(device), row_blocks)))
    v_per_split = triton.cdiv(triton.cdiv(V, splits), cfg.block_n) * cfg.block_n
    return v_per_split, triton.cdiv(V, v_per_split)


def _use_tma(h2d, weight, device) -> bool:
    """The TMA forward needs 16-bit inputs, descriptors (Triton >= 3.4 on sm_90+, or the
    interpreter), a row-major weight and 16-byte-aligned rows; ALPHAPO_FWD_IMPL=tma|pointer
    overrides the family default."""
    choice = os.environ.get("ALPHAPO_FWD_IMPL") or FWD_IMPL.get(gpu_family(device), "pointer")
    if choice not in ("tma", "pointer"):
        raise ValueError(f"ALPHAPO_FWD_IMPL must be 'tma' or 'pointer', got {choice!r}")
    # float32 products run on the FMA units, where TMA buys nothing (and the tile spills).
    if choice == "pointer" or TensorDescriptor is None or h2d.dtype == torch.float32:
        return False
    aligned = (weight.shape[1] * weight.element_size()) % 16 == 0
    return aligned and weight.stride(1) == 1 and weight.stride(0) == weight.shape[1]


def _partials(part, y, want_sq: bool):
    """The splits' partial statistics (6, splits, N) combined exactly: O(splits · N)."""
    m, l, tgt, s_, q, before = part
    m_max = m.max(dim=0).values
    w = torch.exp(m - m_max)
    L = (l * w).sum(0)
    lse = m_max + torch.log(L)
    zbar = (s_ * w).sum(0) / L
    z_y = tgt.sum(0)
    # first argmax = y: no logit above z_y anywhere, none equal to it before y's column
    hit = ((z_y >= m_max) & (z_y > before.max(dim=0).values) & (y >= 0)).float()
    lsq = torch.log((q * w * w).sum(0)) - 2.0 * torch.log(L) if want_sq else None
    return lse, z_y, zbar, m_max, hit, lsq  # the fields of alphapo._tokens.TokenStats


def forward_stats(h2d, weight, bias, flat_idx, target, scratch_bytes, acc_dtype, want_sq: bool = False):
    """Per valid token, float32: the fields of :class:`alphapo._tokens.TokenStats`, ``(lse,
    tgt, zbar, zmax, hit, lsq)`` (``tgt`` 0 for target -1; ``lsq`` None unless ``want_sq``)."""
    _check(h2d, weight)
    N, (V, H) = flat_idx.numel(), weight.shape
    device = h2d.device
    if N == 0:
        empty = torch.empty(0, dtype=torch.float32, device=device)
        return empty, empty, empty, empty, empty, (empty if want_sq else None)
    precision = _dot_precision(h2d.dtype)
    b_arg = bias if bias is not None else weight  # never read when HAS_BIAS is False
    if _use_tma(h2d, weight, device):
        cfg = launch_config(device, h2d.dtype, "fwd_tma")
        v_per_split, splits = _vocab_splits(N, V, cfg, PERSISTENT_WAVES, device)
        part = torch.empty((6, splits, N), dtype=torch.float32, device=device)
        h_valid = _compact_rows(h2d, flat_idx)
        row_blocks = triton.cdiv(N, cfg.block_m)
        items = row_blocks * splits
        programs = min(items, _sm_count(device))
        _lse_fwd_tma_kernel[(programs,)](
            TensorDescriptor.from_tensor(h_valid, [cfg.block_m, cfg.block_k]),
            TensorDescriptor.from_tensor(weight, [cfg.block_n, cfg.block_k]),
            b_arg, target, part,
            N, V, H, v_per_split, row_blocks, items, part.stride(0),
            HAS_BIAS=bias is not None, BLOCK_N=cfg.block_m, BLOCK_V=cfg.block_n, BLOCK_H=cfg.block_k,
            NUM_PROGRAMS=programs, DOT_PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return _partials(part, target, want_sq)
    cfg = launch_config(device, h2d.dtype, "fwd")
    v_per_split, splits = _vocab_splits(N, V, cfg, GRID_WAVES, device)
    part = torch.empty((6, splits, N), dtype=torch.float32, device=device)
    _lse_fwd_kernel[(triton.cdiv(N, cfg.block_m), splits)](
        h2d, weight, b_arg, flat_idx, target, part, part,
        N, V, H, v_per_split,
        h2d.stride(0), h2d.stride(1), weight.stride(0), weight.stride(1), 0, part.stride(0),
        HAS_BIAS=bias is not None, STORE_Z=False, BLOCK_N=cfg.block_m, BLOCK_V=cfg.block_n, BLOCK_H=cfg.block_k,
        DOT_PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return _partials(part, target, want_sq)


# ----------------------------------------------------------------------------- pair-chunked path


def chunk_logits(h, weight, bias, y, acc_dtype, want_sq: bool = False):
    """The pair-chunked path's forward for one chunk (see :mod:`alphapo._pairchunk`).

    ``h`` (n, H): the chunk's valid hidden rows, ``y`` (n,) their targets. Returns the
    logits ``z`` (n, V) in the input dtype, stored by the forward kernel as it reduces
    each tile, their statistics (the fields of :class:`alphapo._tokens.TokenStats`, as
    :func:`forward_stats`), and no backend state.
    """
    _check(h, weight)
    n, (V, H) = h.shape[0], weight.shape
    device = h.device
    z = torch.empty((n, V), dtype=h.dtype, device=device)
    cfg = launch_config(device, h.dtype, "fwd_store")
    v_per_split, splits = _vocab_splits(n, V, cfg, GRID_WAVES, device)
    part = torch.empty((6, splits, n), dtype=torch.float32, device=device)
    rows = torch.arange(n, device=device)  # h is the compacted chunk: row n is token n
    _lse_fwd_kernel[(triton.cdiv(n, cfg.block_m), splits)](
        h, weight, bias if bias is not None else weight, rows, y, part, z,
        n, V, H, v_per_split,
        h.stride(0), h.stride(1), weight.stride(0), weight.stride(1), z.stride(0), part.stride(0),
        HAS_BIAS=bias is not None, STORE_Z=True, BLOCK_N=cfg.block_m, BLOCK_V=cfg.block_n, BLOCK_H=cfg.block_k,
        DOT_PRECISION=_dot_precision(h.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return z, _partials(part, y, want_sq), None


def logits_to_dz_(z, lse, coef, y, need_b: bool, state=None):
    """``z`` <- ``coef (onehot(y) - exp(z - lse))`` in place; the bias gradient of the
    chunk (float32, (V,)) when ``need_b``."""
    n, V = z.shape
    if n == 0:
        return torch.zeros(V, dtype=torch.float32, device=z.device) if need_b else None
    cfg = launch_config(z.device, z.dtype, "dz_tile")
    rows_per_program = cfg.block_k  # block_k: rows a program sweeps (the tile has no reduction axis)
    row_groups = triton.cdiv(n, rows_per_program)
    db = torch.empty((row_groups, V), dtype=torch.float32, device=z.device) if need_b else None
    _dz_tile_kernel[(row_groups, triton.cdiv(V, cfg.block_n))](
        z, y, lse, coef.to(torch.float32).contiguous(), db if need_b else lse,
        n, V, rows_per_program,
        z.stride(0), db.stride(0) if need_b else 0,
        NEED_DB=need_b, BLOCK_N=cfg.block_m, BLOCK_V=cfg.block_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return db.sum(0) if need_b else None


def _compact_rows(h2d, flat_idx):
    """The valid rows as one contiguous (N, H) tensor: a view when every row is valid."""
    if flat_idx.numel() == h2d.shape[0] and h2d.is_contiguous():
        return h2d
    return h2d.index_select(0, flat_idx)


def slice_columns(N: int, V: int, itemsize: int, scratch_bytes: int, block: int) -> int:
    """Vocabulary columns per backward slice: the dz slice (N × V_s) fits scratch_bytes."""
    cols = max(block, (int(scratch_bytes) // max(1, N * itemsize)) // block * block)
    return min(cols, triton.cdiv(V, block) * block)


def backward_grads(h2d, weight, bias, flat_idx, target, lse, coef, scratch_bytes, needs, filter_eps=None):
    """Gradients of ``Σ_t coef_t (z_t[y_t] - lse_t)`` w.r.t. h2d, weight, bias (see module doc).

    ``filter_eps``: gradient filtering (off by default). A ``dz`` tile whose largest
    ``|dz|`` is at most ``filter_eps`` adds nothing to ``grad_hidden``: its GEMM work is
    skipped. ``grad_weight`` (one cuBLAS GEMM per slice) is always exact.
    """
    need_h, need_w, need_b = needs
    N, (V, H) = flat_idx.numel(), weight.shape
    device, dtype = h2d.device, h2d.dtype
    # Row-major whatever hidden's strides: _grad_h_kernel writes rows with unit column stride.
    grad_h = torch.zeros(h2d.shape, dtype=dtype, device=device) if need_h else None
    # Contiguous, whatever weight's strides: each slice's GEMM writes rows [v_lo, v_hi).
    grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=device) if need_w else None
    grad_b = torch.empty(bias.shape, dtype=bias.dtype, device=device) if need_b else None
    if N == 0:
        return grad_h, grad_w.zero_() if need_w else None, grad_b.zero_() if need_b else None
    cfg = launch_config(device, dtype, "dz")
    hcfg = launch_config(device, dtype, "grad_h")
    coef = coef.to(torch.float32).contiguous()
    V_s = slice_columns(N, V, h2d.element_size(), scratch_bytes, cfg.block_n)
    n_slices = triton.cdiv(V, V_s)
    dz = torch.empty((N, V_s), dtype=dtype, device=device)
    row_blocks = triton.cdiv(N, cfg.block_m)
    db = torch.empty((row_blocks, V_s), dtype=torch.float32, device=device) if need_b else None
    # Compacted hidden rows for the grad_W GEMM: a view when every token is valid.
    h_valid = _compact_rows(h2d, flat_idx) if need_w else None
    acc = torch.empty((N, H), dtype=torch.float32, device=device) if need_h and n_slices > 1 else None
    precision = _dot_precision(dtype)
    filtering = filter_eps is not None and need_h
    if filtering:
        if hcfg.block_m != cfg.block_m or cfg.block_n % hcfg.block_k:
            raise RuntimeError(f"gradient filtering needs matching dz and grad_h tiles, got {cfg} and {hcfg}")
        tile_max = torch.empty((row_blocks, triton.cdiv(V_s, cfg.block_n)), dtype=torch.float32, device=device)
    for s in range(n_slices):
        v_lo = s * V_s
        v_hi = min(V, v_lo + V_s)
        width = v_hi - v_lo
        _dz_kernel[(row_blocks, triton.cdiv(width, cfg.block_n))](
            h2d, weight, bias if bias is not None else weight, flat_idx, target, lse, coef, dz,
            db if need_b else dz, tile_max if filtering else dz,
            N, V, H, v_lo, width,
            h2d.stride(0), h2d.stride(1), weight.stride(0), weight.stride(1), dz.stride(0),
            db.stride(0) if need_b else 0, tile_max.stride(0) if filtering else 0,
            HAS_BIAS=bias is not None, NEED_DB=need_b, FILTER=filtering, BLOCK_N=cfg.block_m, BLOCK_V=cfg.block_n,
            BLOCK_H=cfg.block_k,
            DOT_PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        dz_s = dz[:, :width]
        if need_b:
            grad_b[v_lo:v_hi] = db[:, :width].sum(0).to(grad_b.dtype)
        if need_w:
            torch.matmul(dz_s.t(), h_valid, out=grad_w[v_lo:v_hi])
        if need_h:
            _grad_h_kernel[(triton.cdiv(N, hcfg.block_m), triton.cdiv(H, hcfg.block_n))](
                dz_s, weight, acc if acc is not None else dz, grad_h, flat_idx, tile_max if filtering else dz,
                N, H, v_lo, width, float(filter_eps) if filtering else 0.0,
                dz.stride(0), weight.stride(0), weight.stride(1), acc.stride(0) if acc is not None else 0,
                grad_h.stride(0), tile_max.stride(0) if filtering else 0,
                FIRST=s == 0, LAST=s == n_slices - 1, FILTER=filtering, DZ_BLOCK_V=cfg.block_n,
                BLOCK_N=hcfg.block_m, BLOCK_H=hcfg.block_n, BLOCK_K=hcfg.block_k,
                DOT_PRECISION=precision, num_warps=hcfg.num_warps, num_stages=hcfg.num_stages,
            )
    return grad_h, grad_w, grad_b
