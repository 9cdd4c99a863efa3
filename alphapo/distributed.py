"""Vocabulary-parallel lm-head: helpers to shard it, and the rules that keep ranks in step.

When the lm-head ``W`` (V, H) (and its bias ``b``) is too large for one device, or its
gradient should be split, each rank ``r`` of a process group keeps a contiguous slice of
the vocabulary rows, ``W[o_r : o_r + V_r]``, in group-rank order, and passes that slice to
the loss with ``process_group=group``. Every rank passes the same (replicated) ``hidden``
and ``target``; target ids stay global. The loss then computes, per valid token::

    lse_r = logsumexp(h @ W_r.T + b_r)                    # this rank's partial
    m     = all_reduce(lse_r, MAX)
    lse   = m + log(all_reduce(exp(lse_r - m), SUM))      # = logsumexp over all V rows
    z[y]  = all_reduce(z_r[y - o_r] if o_r <= y < o_r + V_r else 0, SUM)   # owner's logit

and for the gradients (in the forward on the pair-chunked path, a chunk of pairs at a
time; in the backward on the recompute path), with
``dz_r = c * (onehot(y - o_r) - exp(h @ W_r.T + b_r - lse))``::

    grad_h   = all_reduce(dz_r @ W_r, SUM)       # the same full gradient on every rank
    grad_W_r = dz_r.T @ h,  grad_b_r = dz_r.sum(0)  # this rank's slice only

so every rank returns the same loss, metrics and ``grad_hidden`` and keeps the gradient
of its own slice (see :mod:`alphapo._autograd`). It works with every backend ("torch"
on CPU with gloo, "triton" on CUDA with NCCL) and costs O(tokens) communication: no
logits and no weight rows cross ranks.

Typical use under ``torchrun --nproc-per-node R train.py``::

    import torch.distributed as dist
    from alphapo import AlphaPOLoss
    from alphapo.distributed import shard_vocab

    dist.init_process_group("nccl")                     # "gloo" on CPU
    group = dist.group.WORLD                            # or dist.new_group(ranks) per model replica
    w, b = shard_vocab(lm_head.weight, lm_head.bias, group)   # this rank's rows
    loss_fn = AlphaPOLoss(alpha=0.25, process_group=group)
    loss, aux = loss_fn(w, hidden, target, b)           # same hidden / target on every rank
    loss.backward()                                     # every rank: grad_hidden in full, grad of its rows

Rules (a broken one hangs the group in a collective until its timeout):

* every rank of ``group`` makes the same loss calls in the same order, with the same
  ``hidden``, ``target`` and options (the loss issues collectives in forward and backward);
* every rank wants a gradient if any rank does: ``grad_h`` is all-reduced at the end of
  the forward on the pair-chunked path and in the backward on the recompute path (then
  every rank must run the backward). A rank whose ``hidden`` does not require grad still
  joins it (it computes and discards its part), but a rank on which *nothing* requires
  grad (no weight, bias or hidden gradient, or a forward under ``torch.no_grad()``) has
  nothing to join, and would take another path than its peers (``path=`` forces one);
* slices are non-empty and ordered by group rank; their sizes may differ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def split_sizes(vocab_size: int, world_size: int) -> list[int]:
    """Rows per rank of the default split: as ``torch.tensor_split``, the first
    ``vocab_size % world_size`` ranks hold one row more than the others.

    >>> split_sizes(11, 2)
    [6, 5]
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if vocab_size < world_size:
        raise ValueError(
            f"cannot split a vocabulary of {vocab_size} rows over {world_size} ranks: every rank needs at least one row"
        )
    base, extra = divmod(vocab_size, world_size)
    return [base + 1 if r < extra else base for r in range(world_size)]


def _check_sizes(sizes: Sequence[int], vocab_size: int, world_size: int) -> list[int]:
    sizes = [int(s) for s in sizes]
    if len(sizes) != world_size:
        raise ValueError(f"sizes must give one row count per rank ({world_size}), got {len(sizes)}: {sizes}")
    if any(s < 1 for s in sizes):
        raise ValueError(f"every rank needs at least one vocabulary row, got sizes {sizes}")
    if sum(sizes) != vocab_size:
        raise ValueError(f"sizes {sizes} sum to {sum(sizes)}, not the vocabulary size {vocab_size}")
    return sizes


def vocab_range(vocab_size: int, group=None, sizes: Sequence[int] | None = None) -> tuple[int, int]:
    """``(start, stop)``: the rows of a ``vocab_size``-row lm-head this rank of ``group``
    holds (``group=None`` is the default group). ``sizes`` (rows per rank, in group-rank
    order) overrides the default :func:`split_sizes`. No communication.
    """
    import torch.distributed as dist

    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given process group")
    sizes = split_sizes(vocab_size, world_size) if sizes is None else _check_sizes(sizes, vocab_size, world_size)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def shard_vocab(weight: torch.Tensor, bias: torch.Tensor | None = None, group=None, sizes: Sequence[int] | None = None):
    """This rank's vocabulary slice of the full lm-head: ``(weight[start:stop], bias[start:stop])``.

    ``weight`` (V, H) and ``bias`` (V,) or None are the full, replicated lm-head;
    ``group=None`` is the default group; ``sizes`` as in :func:`vocab_range`. Returns
    views: slicing a parameter that requires grad keeps the autograd link, so after the
    backward its ``.grad`` holds this rank's rows and zeros elsewhere. To keep only the
    slice in memory (the point of sharding a large head), make it the parameter::

        w, b = shard_vocab(head.weight, head.bias, group)
        w = torch.nn.Parameter(w.detach().clone())  # then drop the full weight
    """
    start, stop = vocab_range(weight.shape[0], group, sizes)
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias has {bias.shape[0]} rows, weight has {weight.shape[0]}")
    return weight[start:stop], (bias[start:stop] if bias is not None else None)


@torch.no_grad()
def gather_vocab(shard: torch.Tensor, group=None) -> torch.Tensor:
    """The full (V, ...) tensor on every rank from each rank's vocabulary slice (V_r, ...).

    For checkpoints, evaluation and tests (a sharded weight, or the gradient of one);
    not differentiable. Slices may differ in size: each is padded to the largest for one
    ``all_gather`` (gloo needs equal sizes), then trimmed.
    """
    import torch.distributed as dist

    world_size = dist.get_world_size(group)
    shard = shard.detach().contiguous()
    count = torch.tensor([shard.shape[0]], dtype=torch.int64, device=shard.device)
    counts = [torch.empty_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c.item()) for c in counts]
    padded = shard.new_zeros((max(sizes), *shard.shape[1:]))
    padded[: shard.shape[0]] = shard
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])
