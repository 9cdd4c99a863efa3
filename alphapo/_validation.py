"""Input checks shared by every backend: clear errors instead of NaNs or silent wrong answers."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# What the messages call (weight, hidden, bias): the policy's head and states by default;
# the reference model's are checked with REF_NAMES, so that a NaN in ref_hidden is not
# reported as one in the policy's hidden.
NAMES = ("lin_weight", "hidden", "bias")
REF_NAMES = ("ref_weight", "ref_hidden", "ref_bias")


def check_inputs(weight, hidden, target, bias=None, ref_chosen_logps=None, ref_rejected_logps=None, paired=True,
                 names=NAMES):
    """Check shapes, dtypes and devices (no host sync). Returns ``(B, T, H, V)``.

    ``paired=False`` accepts any non-zero number of rows (plain sequence batches);
    ``names``: what the messages call ``(weight, hidden, bias)``.
    """
    w_, h_, b_ = names
    for name, t in ((w_, weight), (h_, hidden), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != 3:
        raise ValueError(f"{h_} must have shape (2B, T, H), got {tuple(hidden.shape)}")
    rows, T, H = hidden.shape
    if paired and (rows == 0 or rows % 2):
        raise ValueError(
            f"{h_} must hold an even, non-zero number of rows (B chosen then B rejected), got {rows}"
        )
    if rows == 0:
        raise ValueError(f"{h_} must hold at least one row, got 0")
    if target.dim() != 2 or tuple(target.shape) != (rows, T):
        raise ValueError(f"target must have shape (2B, T) = {(rows, T)} to match {h_}, got {tuple(target.shape)}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor (token ids), got {target.dtype}")
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"{w_} must have shape (V, H) with H = {H} ({h_}'s last dim), got {tuple(weight.shape)}")
    V = weight.shape[0]
    if V == 0:
        raise ValueError(f"{w_} has an empty vocabulary (V = 0)")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{h_} must be a floating tensor in {FLOAT_DTYPES}, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{w_} dtype {weight.dtype} must match {h_} dtype {hidden.dtype}")
    devices = {h_: hidden.device, w_: weight.device, "target": target.device}
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (V,):
            shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"{b_} must be None or a tensor of shape (V,) = ({V},), got {shape}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{b_} dtype {bias.dtype} must match {h_} dtype {hidden.dtype}")
        devices[b_] = bias.device
    B = rows // 2
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("ref_chosen_logps and ref_rejected_logps must be given together")
    for name, ref in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if ref is None:
            continue
        if not isinstance(ref, torch.Tensor) or tuple(ref.shape) != (B,):
            shape = tuple(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__
            raise ValueError(f"{name} must be a tensor of shape (B,) = ({B},), got {shape}")
        if not ref.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor, got {ref.dtype}")
        devices[name] = ref.device
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all inputs must be on one device, got {where}")
    return B, T, H, V


class Scan(NamedTuple):
    """What the one host sync of a loss call learns, and the sums it reads them from.

    ``n_tokens`` (2B,) int64 on the device and ``n_host`` the same counts as a list;
    ``w_sum`` (H,) = Σ_v W_v, ``b_sum`` = Σ_v b_v (None without a bias) and ``h_sum``
    (2B, H) = Σ over valid t of h_t, all float64: the ``logits/*`` metric is
    ``h_sum · w_sum + n · b_sum`` and a non-finite input shows up in them.
    """

    n_tokens: torch.Tensor
    n_host: list
    w_sum: torch.Tensor
    h_sum: torch.Tensor
    b_sum: torch.Tensor | None


# Blocks of the sums below. On a CPU about 1 MiB of float32 (float64) at a time, in cache, so a
# sum costs one read of its input (a float64 copy of the whole weight would be 2x its size);
# on a GPU few, large blocks: each block is a few kernel launches, and 1 MiB blocks of the
# Llama-3-8B head would be ~2,000 of them (tens of ms of launch time for a 73 ms loss).
_SUM_BLOCK_BYTES = 2**20
_SUM_BLOCK_BYTES_GPU = 256 * 2**20


def _block_bytes(t: torch.Tensor) -> int:
    return _SUM_BLOCK_BYTES if t.device.type == "cpu" else _SUM_BLOCK_BYTES_GPU


def _sum_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _weight_sum(weight: torch.Tensor) -> torch.Tensor:
    """Σ_v W_v, (H,) float64: float32 sums of blocks of rows, added in float64. On CUDA one
    GEMV ``1ᵀ W`` with float32 output (torch >= 2.8), no copy of W."""
    acc = _sum_dtype(weight)
    if weight.is_cuda and acc == torch.float32 and weight.dtype != torch.float32:
        ones = torch.ones((1, weight.shape[0]), dtype=weight.dtype, device=weight.device)
        try:
            return torch.mm(ones, weight, out_dtype=torch.float32).view(-1).double()
        except (TypeError, RuntimeError):  # torch < 2.8: the blocked sum below
            pass
    rows = max(1, _block_bytes(weight) // (acc.itemsize * weight.shape[1]))
    total = torch.zeros(weight.shape[1], dtype=torch.float64, device=weight.device)
    for v0 in range(0, weight.shape[0], rows):
        total += weight[v0 : v0 + rows].sum(0, dtype=acc)
    return total


def _valid_hidden_sum(hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Σ over valid t of hidden[i, t], (2B, H) float64; ignored positions are never read
    into the sum (a NaN there is not the loss's business), blocks of positions at a time."""
    rows, T, H = hidden.shape
    acc = _sum_dtype(hidden)
    span = max(1, _block_bytes(hidden) // (acc.itemsize * H * rows))
    total = torch.zeros(rows, H, dtype=torch.float64, device=hidden.device)
    zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
    for t0 in range(0, T, span):
        keep = valid[:, t0 : t0 + span, None]
        total += torch.where(keep, hidden[:, t0 : t0 + span], zero).sum(1, dtype=acc)
    return total


def _implausible_average(vocab_size: int) -> float:
    """An averaged log-prob below this is not one (it is a summed one): a model that gives
    its targets e^{-(2 log V + 20)} on average is far worse than uniform (e^{-log V})."""
    return -(2.0 * math.log(vocab_size) + 20.0)


@torch.no_grad()  # the sums are metrics and checks: no graph (and no grad_fn on the logits/* metric)
def scan_inputs(weight, hidden, target, bias, vocab_size: int, ignore_index: int, refs=(), check_finite=True,
                group=None, averaged: bool | None = None, names=NAMES) -> Scan:
    """Check target values (and, with ``check_finite``, that every input the loss reads is
    finite) in one host sync: a single small copy, which also brings the per-row token
    counts to the host. Under vocabulary parallelism (``group``) the flags are all-reduced,
    so every rank raises together instead of leaving the others in a collective.

    Non-finite values are found in sums the metrics need anyway (``Σ_v W_v``, ``Σ_v b_v``,
    the valid rows' ``Σ_t h_t``, the reference log-probs): a NaN or ±inf anywhere in them
    makes its sum non-finite, so the check costs no extra pass. Ignored positions of
    ``hidden`` are not read. The reference log-probs must be log-probs (<= 0) and, when
    ``averaged``, plausible as averages (above :func:`_implausible_average`): a summed
    reference passed to a length-averaged loss is refused rather than trained on.
    ``names``: what the messages call ``(weight, hidden, bias)`` (:data:`REF_NAMES` for the
    reference model's).
    """
    valid = target != ignore_index
    out_of_range = valid & ((target < 0) | (target >= vocab_size))
    n_tokens = valid.sum(dim=1)
    w_sum = _weight_sum(weight)
    b_sum = bias.sum(dtype=torch.float64) if bias is not None else None
    h_sum = _valid_hidden_sum(hidden, valid)
    flags = [out_of_range.any(), (n_tokens == 0).any()]
    finite_names, ref_names = [], []
    if check_finite:
        checks = [(names[1], h_sum), (names[0], w_sum), (names[2], b_sum)]
        checks += [(name, ref) for name, ref in refs if ref is not None]
        for name, value in checks:
            if value is not None:
                finite_names.append(name)
                flags.append(~torch.isfinite(value).all())
        # then the plausibility of the reference log-probs (their flags after the finite ones)
        floor = _implausible_average(vocab_size) if averaged else -math.inf
        for name, ref in refs:
            if ref is not None:
                ref_names.append(name)
                flags.append(((ref > 1e-4) | (ref < floor)).any())
    flags = torch.stack(flags).long()
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    host = torch.cat([flags, n_tokens.long()]).tolist()  # the one host sync
    flags, n_host = host[: len(flags)], host[len(flags):]
    if flags[0]:
        bad = target[out_of_range][:5].tolist()
        raise ValueError(
            f"target holds ids outside [0, V) = [0, {vocab_size}) that are not ignore_index "
            f"({ignore_index}): first offenders {bad}"
        )
    if flags[1]:
        empty = [i for i, n in enumerate(n_host) if n == 0][:8]
        raise ValueError(
            f"target rows {empty} have no valid tokens (every target is ignore_index={ignore_index}): "
            "their log-prob is undefined (a mean over no tokens: some peers return NaN here, others count "
            "it as 0); drop those pairs or "
            "unmask at least one completion token"
        )
    n_finite = len(finite_names)
    bad = [name for name, flag in zip(finite_names, flags[2 : 2 + n_finite]) if flag]
    implausible = [name for name, flag in zip(ref_names, flags[2 + n_finite :]) if flag]
    if bad:
        where = {names[1]: " at a valid (non-ignored) position"}
        raise ValueError(
            "non-finite values (NaN or ±inf) in " + ", ".join(f"{name}{where.get(name, '')}" for name in bad)
            + ": the loss would be NaN. Check the model's forward (or the reference log-probs); "
            "pass check_finite=False to skip this check if you test for it elsewhere"
        )
    if implausible:
        values = [r for name, r in refs if name in implausible]
        lo, hi = min(float(v.min()) for v in values), max(float(v.max()) for v in values)
        if hi > 1e-4:
            why = f"a log-prob is <= 0, but the largest value is {hi:.4g}"
        else:
            why = (f"average_log_prob=True wants length-averaged log-probs, and {lo:.4g} is below any plausible "
                   f"average ({_implausible_average(vocab_size):.3g} for V = {vocab_size}): these look summed; "
                   "average them (or pass average_log_prob=False, or ref_hidden/ref_weight to let the loss "
                   "compute them the policy's way)")
        raise ValueError(f"{', '.join(implausible)}: not reference log-probs of this loss ({why}); "
                         "check_finite=False skips this check")
    return Scan(n_tokens, n_host, w_sum, h_sum, b_sum)
