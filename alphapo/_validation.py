"""Input checks shared by every backend: clear errors instead of NaNs or silent wrong answers."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_inputs(weight, hidden, target, bias=None, ref_chosen_logps=None, ref_rejected_logps=None, paired=True):
    """Check shapes, dtypes and devices (no host sync). Returns ``(B, T, H, V)``.

    ``paired=False`` accepts any non-zero number of rows (plain sequence batches).
    """
    for name, t in (("lin_weight", weight), ("hidden", hidden), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape (2B, T, H), got {tuple(hidden.shape)}")
    rows, T, H = hidden.shape
    if paired and (rows == 0 or rows % 2):
        raise ValueError(
            f"hidden must hold an even, non-zero number of rows (B chosen then B rejected), got {rows}"
        )
    if rows == 0:
        raise ValueError("hidden must hold at least one row, got 0")
    if target.dim() != 2 or tuple(target.shape) != (rows, T):
        raise ValueError(f"target must have shape (2B, T) = {(rows, T)} to match hidden, got {tuple(target.shape)}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor (token ids), got {target.dtype}")
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"lin_weight must have shape (V, H) with H = {H} (hidden's last dim), got {tuple(weight.shape)}")
    V = weight.shape[0]
    if V == 0:
        raise ValueError("lin_weight has an empty vocabulary (V = 0)")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be a floating tensor in {FLOAT_DTYPES}, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"lin_weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    devices = {"hidden": hidden.device, "lin_weight": weight.device, "target": target.device}
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (V,):
            shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must be None or a tensor of shape (V,) = ({V},), got {shape}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")
        devices["bias"] = bias.device
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


def check_targets(target: torch.Tensor, vocab_size: int, ignore_index: int) -> torch.Tensor:
    """Check target values and return the valid-token count per row, shape (2B,).

    One host sync (a single small copy) covers both checks; on CPU it costs nothing.
    """
    valid = target != ignore_index
    out_of_range = valid & ((target < 0) | (target >= vocab_size))
    n_tokens = valid.sum(dim=1)
    flags = torch.stack([out_of_range.any().long(), (n_tokens == 0).any().long()]).tolist()
    if flags[0]:
        bad = target[out_of_range][:5].tolist()
        raise ValueError(
            f"target holds ids outside [0, V) = [0, {vocab_size}) that are not ignore_index "
            f"({ignore_index}): first offenders {bad}"
        )
    if flags[1]:
        empty = (n_tokens == 0).nonzero().flatten()[:8].tolist()
        raise ValueError(
            f"target rows {empty} have no valid tokens (every target is ignore_index={ignore_index}): "
            "their log-prob is undefined (TRL and Liger return NaN here); drop those pairs or "
            "unmask at least one completion token"
        )
    return n_tokens
