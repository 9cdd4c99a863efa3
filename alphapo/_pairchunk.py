"""The pair loss in 6·N·H·V: gradients formed in the forward, a chunk of whole pairs at a time.

Every loss here is a mean over pairs of a function of *that pair's* two sequences, plus an
NLL term whose normaliser is known before any GEMM runs. A token's coefficient
``c_t = dL/dlogp_t`` is therefore known as soon as its own pair has its two log-probs, and
a walk over the batch in chunks of whole pairs can finish each chunk in the forward::

    for each chunk of whole pairs, over their valid tokens only (rows h of hidden):
        z = h W^T (+ b)                       2·n·H·V   kept for this chunk only
        lse, z[y] -> the chunk's sequence sums S -> its pair epilogue -> c per token
        dz = c (onehot(y) - softmax(z))       in place over z
        grad_h[rows] = dz W                   2·n·H·V
        grad_W += dz^T h                      2·n·H·V   (float32 accumulator)
    backward: the saved gradients times the upstream scalar

against 8·N·H·V for the recompute order (:class:`alphapo._autograd.FusedSequenceLogProbs`),
whose backward must rebuild every logit. A backend (:mod:`alphapo.chunked`,
:mod:`alphapo.kernels.fused`) provides two steps: ``chunk_logits`` (the chunk's logit
tile, kept, with its token statistics — lse, target logit, the metrics' — and a private
state) and ``logits_to_dz_`` (the tile into ``dz`` in place); the two gradient GEMMs are
plain ``torch`` (cuBLAS on CUDA) with float32 accumulation.

Memory: one chunk of logits (``n × V`` in the input dtype, at most ``scratch_bytes``),
the ``grad_W`` accumulator (V×H float32 for 16-bit weights when there are several chunks;
for float32 weights it *is* the gradient), the chunk's hidden rows and its ``dz W``
product (O(n·H)), and the gradients themselves, held from the forward to the backward.

When it runs (``alphapo.loss._choose_path``): the loss is pair-separable (every
``loss_type`` but aot/aot_unpaired), some input needs a gradient, the reference log-probs
do not, gradient filtering is off, and each pair's valid tokens fit ``scratch_bytes`` as
one chunk of logits (:func:`chunk_pairs`). Otherwise the recompute path runs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._autograd import VocabShard, _combine_shards
from ._tokens import TokenPlan, TokenStats, accumulation_dtype, dense_sum, logp_values, metric_values
from .chunked import chunk_gradients_
from .epilogue import AlphaPOConfig, SequenceSums, pair_chunk_grad, preference_loss

PATHS = ("auto", "pair-chunked", "recompute")


def chunk_pairs(n_host: list[int], budget_tokens: int) -> list[tuple[int, int]] | None:
    """Consecutive pairs ``[(j0, j1), ...]`` whose valid tokens (chosen + rejected) fit
    ``budget_tokens`` per chunk; None when some pair alone does not fit."""
    B = len(n_host) // 2
    chunks, j0, held = [], 0, 0
    for j in range(B):
        n = n_host[j] + n_host[B + j]
        if n > budget_tokens:
            return None
        if held + n > budget_tokens:
            chunks.append((j0, j))
            j0, held = j, 0
        held += n
    chunks.append((j0, B))
    return chunks


def budget_tokens(scratch_bytes: int, vocab_size: int, itemsize: int) -> int:
    """Tokens whose logits (in the input dtype) fit ``scratch_bytes``."""
    return int(scratch_bytes) // (vocab_size * itemsize)


class PairJob(NamedTuple):
    """Everything the pair-chunked forward needs besides the differentiable inputs."""

    plan: TokenPlan
    chunks: list
    backend: object  # alphapo.chunked or alphapo.kernels.fused
    cfg: AlphaPOConfig
    ref_chosen: torch.Tensor | None
    ref_rejected: torch.Tensor | None
    nll_tokens: object  # normaliser of the NLL term (None: this batch's chosen tokens)
    shard: VocabShard | None
    grad_enabled: bool  # grad mode at the call (inside Function.forward it is always off)


def _chunk_rows(plan: TokenPlan, offsets: list[int], j0: int, j1: int):
    """Positions in ``flat_idx`` of the chunk's tokens: chosen rows j0..j1-1, then rejected."""
    B = plan.rows // 2
    a = slice(offsets[j0], offsets[j1])
    b = slice(offsets[B + j0], offsets[B + j1])
    return a, b


def _forward(hidden, weight, bias, job: PairJob, needs):
    """Sequence sums (2B, K), metric sums (2B, M) and the gradients of the whole loss
    (None where not needed)."""
    need_h, need_w, need_b = needs
    plan, backend = job.plan, job.backend
    B, T, H = plan.rows // 2, plan.T, hidden.shape[-1]
    acc = accumulation_dtype(hidden.dtype)
    device = hidden.device
    h2d = hidden.reshape(-1, H)
    target = plan.target
    if job.shard is not None:  # this rank's column of each target, or -1 where another owns it
        local = target - job.shard.offset
        target = torch.where((local >= 0) & (local < weight.shape[0]), local, -1)
    offsets = plan.offsets()
    nll_tokens = job.nll_tokens if job.nll_tokens is not None else float(sum(plan.n_host[:B]))
    one_chunk = len(job.chunks) == 1

    want_wpo = job.cfg.use_weighting
    K = 1 if plan.weights is None else plan.weights.shape[1]
    seq = torch.zeros(2 * B, K, dtype=acc, device=device)
    metrics = torch.zeros(2 * B, 3 if want_wpo else 2, dtype=acc, device=device)
    grad_h = torch.zeros(h2d.shape, dtype=hidden.dtype, device=device) if need_h else None
    grad_w = None
    if need_w and not one_chunk:
        grad_w = torch.zeros(weight.shape, dtype=acc, device=device)
    grad_b = torch.zeros(weight.shape[0], dtype=acc, device=device) if need_b else None

    for j0, j1 in job.chunks:
        b = j1 - j0
        ca, cb = _chunk_rows(plan, offsets, j0, j1)
        idx = torch.cat([plan.flat_idx[ca], plan.flat_idx[cb]])
        y = torch.cat([target[ca], target[cb]])
        counts = plan.n_host[j0:j1] + plan.n_host[B + j0 : B + j1]
        n_c = idx.numel()
        h = h2d.index_select(0, idx)

        z, stats, state = backend.chunk_logits(h, weight, bias, y, acc, want_wpo)
        stats = TokenStats(*stats)
        if job.shard is not None:
            stats = _combine_shards(stats, job.shard.group)

        # The chunk's 2b sequences' sums, deterministically (each position written once).
        local_seq = torch.repeat_interleave(
            torch.arange(2 * b, device=device), torch.tensor(counts, device=device), output_size=n_c
        )
        weights = None if plan.weights is None else torch.cat([plan.weights[ca], plan.weights[cb]]).to(acc)
        place = local_seq * T + idx % T  # each token's own place among the chunk's 2b rows
        s_chunk = dense_sum(logp_values(stats, weights), place, 2 * b, T)
        m_chunk = dense_sum(metric_values(stats, want_wpo), place, 2 * b, T)
        for out, part in ((seq, s_chunk), (metrics, m_chunk)):
            out[j0:j1], out[B + j0 : B + j1] = part[:b], part[b:]

        if not any(needs):
            continue
        ref_w = job.ref_chosen[j0:j1] if job.ref_chosen is not None else None
        ref_l = job.ref_rejected[j0:j1] if job.ref_rejected is not None else None
        n_chunk = torch.cat([plan.n_tokens[j0:j1], plan.n_tokens[B + j0 : B + j1]])
        sums = SequenceSums.from_columns(s_chunk, m_chunk, n_chunk, want_wpo)
        dS, dRaw = pair_chunk_grad(sums, job.cfg, ref_w, ref_l, B, nll_tokens)
        coef = dS.to(acc)[local_seq]
        if weights is not None:  # S (weighted) and S_raw both read this token
            coef = coef * weights[:, 1] + dRaw.to(acc)[local_seq]

        db = backend.logits_to_dz_(z, stats.lse, coef, y, need_b, state)  # z is dz from here on
        grad_w = chunk_gradients_(z, h if need_w else None, weight, idx, db, grad_h, grad_w, grad_b, one_chunk)
        del z, h

    if job.shard is not None and need_h:
        import torch.distributed as dist

        # Only valid rows carry gradient: reduce those, not the (2B·T, H) tensor.
        rows = grad_h.index_select(0, plan.flat_idx)
        dist.all_reduce(rows, op=dist.ReduceOp.SUM, group=job.shard.group)
        grad_h.index_copy_(0, plan.flat_idx, rows)
    if need_w:
        grad_w = grad_w.to(weight.dtype)
    if need_b:
        grad_b = grad_b.to(bias.dtype)
    return seq, metrics, grad_h, grad_w, grad_b


class PairChunkedLoss(torch.autograd.Function):
    """``(hidden, weight, bias) -> (loss, S, M)``: the whole loss, its gradients formed in
    the forward. ``S`` (2B, K), the summed log-probs per sequence (raw, and LD-DPO-weighted
    beside it), and ``M``, the metric sums, are not differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, job: PairJob):
        needs = tuple(ctx.needs_input_grad[:3]) if job.grad_enabled else (False, False, False)
        if job.shard is not None and any(needs):
            needs = (True, needs[1], needs[2])  # every rank joins the grad_h all-reduce
        with torch.no_grad():
            seq, metrics, grad_h, grad_w, grad_b = _forward(hidden, weight, bias, job, needs)
            sums = SequenceSums.from_columns(seq, metrics, job.plan.n_tokens, job.cfg.use_weighting)
            loss = preference_loss(
                sums, None, job.cfg, job.ref_chosen, job.ref_rejected, nll_tokens=job.nll_tokens
            ).loss.to(seq.dtype)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.hidden_shape = hidden.shape
        ctx.mark_non_differentiable(seq, metrics)
        return loss, seq, metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_seq, _grad_metrics):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "alphapo: double backward (create_graph=True) is not supported: the pair-chunked path forms "
                "first-order gradients in the forward and has no graph of them (nor does the recompute path)"
            )
        grads = ctx.saved_tensors
        # The upstream scalar is 1 for ``loss.backward()``: then the saved gradients go out as
        # they are, and autograd takes them as ``.grad`` without a copy (it clones them when
        # the graph is retained). Any other value scales a copy, so a second backward through
        # a retained graph still sees the unscaled ones. The comparison is the one host sync
        # of the backward.
        if grad_loss is None or bool(grad_loss == 1):
            scaled = grads
        else:
            # A 0-dim scale keeps each gradient's dtype; 16-bit products are formed in float32.
            scaled = tuple(None if g is None else g * grad_loss for g in grads)
        grad_h, grad_w, grad_b = scaled
        if grad_h is not None:
            grad_h = grad_h.view(ctx.hidden_shape)
        return grad_h, grad_w, grad_b, None
