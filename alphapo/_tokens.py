"""Valid-token compaction, shared by the fused backends.

Prompt and padding positions (``target == ignore_index``) never need a logit: the fused
backends run their GEMMs over the N valid tokens alone, addressed through ``flat_idx``
into ``hidden.reshape(-1, H)``, in row order, so the tokens of row ``i`` are the
contiguous range ``offsets[i] : offsets[i + 1]``. Per-sequence sums go back through a dense
``(2B·T,)`` buffer in which every position is written at most once, so they are
deterministic on every device (``index_add_`` uses atomics on CUDA).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class TokenPlan(NamedTuple):
    flat_idx: torch.Tensor  # (N,) int64: row of hidden.reshape(-1, H) for each valid token
    target: torch.Tensor  # (N,) int64: its target id
    seq_id: torch.Tensor  # (N,) int64: its sequence (row of target)
    n_tokens: torch.Tensor  # (2B,) int64: valid tokens per sequence
    n_host: list  # the same counts on the host
    rows: int  # 2B
    T: int
    weights: torch.Tensor | None = None  # (N, 2): [1, LD-DPO weight] per token with ld_alpha, else None

    def offsets(self) -> list[int]:
        """Host-side start of each row's tokens in ``flat_idx`` (2B + 1 entries)."""
        out = [0]
        for n in self.n_host:
            out.append(out[-1] + n)
        return out


def plan_tokens(target: torch.Tensor, ignore_index: int, n_tokens: torch.Tensor, n_host: list) -> TokenPlan:
    """Compact the valid positions of ``target``, given their counts (no host sync: the
    counts are known, so ``nonzero`` need not ask the device for its output size)."""
    rows, T = target.shape
    valid = (target != ignore_index).reshape(-1)
    N = sum(n_host)
    if hasattr(valid, "nonzero_static"):
        flat_idx = valid.nonzero_static(size=N).squeeze(1)
    else:  # pragma: no cover - torch < 2.1
        flat_idx = valid.nonzero().squeeze(1)
    return TokenPlan(
        flat_idx=flat_idx,
        target=target.reshape(-1)[flat_idx].long(),
        seq_id=torch.div(flat_idx, T, rounding_mode="floor"),
        n_tokens=n_tokens,
        n_host=list(n_host),
        rows=rows,
        T=T,
    )


def with_ld_weights(plan: TokenPlan, ld_alpha: float | None) -> TokenPlan:
    """LD-DPO's token weights: the first ``min(n_w, n_l)`` valid tokens of each answer of a
    pair count 1, the rest (the longer answer's tail) ``ld_alpha``. Column 0 stays 1, so
    one weighted sum gives both the raw and the LD-DPO log-prob of each sequence."""
    if ld_alpha is None:
        return plan
    B = plan.rows // 2
    n = plan.n_tokens
    shared = torch.minimum(n[:B], n[B:]).repeat(2)  # (2B,) per row: its pair's shorter length
    starts = torch.cumsum(n, 0) - n  # first token of each row in flat_idx
    position = torch.arange(plan.flat_idx.numel(), device=n.device) - starts[plan.seq_id]
    ld = torch.where(position < shared[plan.seq_id], 1.0, float(ld_alpha))
    return plan._replace(weights=torch.stack([torch.ones_like(ld), ld], dim=1))


def dense_sum(token_values: torch.Tensor, place: torch.Tensor, rows: int, T: int) -> torch.Tensor:
    """Sum per-token values into ``rows`` sequences, deterministically: each token is written
    to its own ``place`` (row · T + position) of a dense buffer, summed over T. (N, ...) -> (rows, ...)."""
    dense = token_values.new_zeros((rows * T, *token_values.shape[1:]))
    dense[place] = token_values
    return dense.view(rows, T, *token_values.shape[1:]).sum(1)


def sequence_sum(token_values: torch.Tensor, plan: TokenPlan) -> torch.Tensor:
    """Sum per-token values into the batch's sequences: (N, ...) -> (2B, ...)."""
    return dense_sum(token_values, plan.flat_idx, plan.rows, plan.T)


class TokenStats(NamedTuple):
    """What the forward learns about each valid token's softmax, all (N,) float32/64.

    ``lse = log Σ_v e^{z_v}``, ``tgt = z[y]`` (0 where y = -1: another rank's target),
    ``zbar = Σ_v p_v z_v`` (entropy = lse - zbar), ``zmax = max_v z_v``, ``hit`` = 1 where
    ``y`` is the (first) argmax, ``lsq = log Σ_v p_v²`` (WPO; None unless asked for).
    """

    lse: torch.Tensor
    tgt: torch.Tensor
    zbar: torch.Tensor
    zmax: torch.Tensor
    hit: torch.Tensor
    lsq: torch.Tensor | None = None

    def logp(self) -> torch.Tensor:
        return self.tgt - self.lse

    def entropy(self) -> torch.Tensor:
        return self.lse - self.zbar


def logp_values(stats: TokenStats, weights: torch.Tensor | None) -> torch.Tensor:
    """Per-token log-prob columns whose sequence sums the loss reads, (N, K): the log-prob,
    and with LD-DPO ``weights`` (N, 2) the raw and the weighted one."""
    logp = stats.logp()
    return logp[:, None] if weights is None else logp[:, None] * weights.to(logp.dtype)


def metric_values(stats: TokenStats, want_wpo: bool) -> torch.Tensor:
    """Per-token values whose sequence sums the metrics and WPO need, (N, 2 or 3):
    entropy, top-1 hit, and with ``want_wpo`` log p(y) - log Σ_v p_v²."""
    cols = [stats.entropy(), stats.hit.to(stats.lse.dtype)]
    if want_wpo:
        cols.append(stats.logp() - stats.lsq)
    return torch.stack(cols, dim=1)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float dtype reduces in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
