"""The implementations under test ("providers"), each computing the same AlphaPO loss.

Every provider builds a function ``loss = fn(weight, hidden, target)`` (a scalar,
differentiable w.r.t. ``weight`` (V, H) and ``hidden`` (2B, T, H)) for one loss
configuration: β = 2.5, γ = 1.375 (SimPO's Llama-3-8B recipe), length-averaged
log-probs, no reference model, and α = 0.25 (the paper's) — or α = 0 where the provider
has no α (Liger's SimPO loss), next to our own α = 0 row::

    s_i  = mean over valid t of log_softmax(W h_it)[y_it]          (chosen rows first)
    f(s) = (1 - exp(-α s)) / α        (s at α = 0)
    loss = mean_j -logsigmoid(β (f(s_j) - f(s_{B+j})) - γ)

A provider that is not installed or cannot run on the device raises :class:`Unavailable`
from ``build``; the harness turns that into a record with ``status="skipped"``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .cases import IGNORE_INDEX

ALPHA = 0.25
BETA = 2.5
GAMMA = 1.375

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Unavailable(RuntimeError):
    """The provider cannot run here; the message says why (becomes the record's reason)."""


@dataclass(frozen=True)
class BuildOptions:
    device: torch.device
    dtype: torch.dtype
    scratch_bytes: int | None = None  # alphapo backends' extra-memory budget (None: default)
    compile: bool = True  # False: Liger without torch.compile (tests, to skip compile time)


@dataclass(frozen=True)
class Provider:
    name: str
    alpha: float
    summary: str
    build: Callable[[BuildOptions], LossFn]


def path_of(fn) -> str | None:
    """The order of work a built loss function ran: alphapo's last path (read from its
    module after a call), or the peer's fixed method."""
    module = getattr(fn, "loss_module", None)
    if module is not None:
        return module.last_path
    return getattr(fn, "method", None)


def _with_method(fn, method: str):
    fn.method = method
    return fn


# ---------------------------------------------------------------------------------------
# reference: TRL's math on materialised logits
# ---------------------------------------------------------------------------------------


def trl_rewards(logps: torch.Tensor, alpha: float) -> torch.Tensor:
    """TRL's CPO/AlphaPO reward: ``(1 - p^(-α)) / α`` with ``p = exp(s)``; ``s`` at α = 0."""
    if alpha == 0.0:
        return logps
    return (1 - torch.exp(logps).pow(-alpha)) / alpha


def trl_pair_loss(logps: torch.Tensor, alpha: float = ALPHA, beta: float = BETA, gamma: float = GAMMA) -> torch.Tensor:
    """``mean_j -logsigmoid(β (r_w - r_l - γ/β))`` as TRL's ``cpo_loss`` (loss_type "simpo")."""
    B = logps.shape[0] // 2
    rewards = trl_rewards(logps, alpha)
    logits = rewards[:B] - rewards[B:] - gamma / beta
    return (-F.logsigmoid(beta * logits)).mean()


def trl_sequence_logps(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX):
    """TRL's ``get_batch_logps`` (average_log_prob=True) on already-shifted targets."""
    loss_mask = target != ignore_index
    labels = torch.where(loss_mask, target, 0)
    per_token_logps = torch.gather(logits.log_softmax(-1), 2, labels.unsqueeze(-1)).squeeze(-1)
    return (per_token_logps * loss_mask).sum(-1) / loss_mask.sum(-1)


def reference_loss(weight, hidden, target, alpha: float = ALPHA, beta: float = BETA, gamma: float = GAMMA):
    """Materialised logits in the inputs' dtype, ``.float()``, log-softmax and gather (TRL).

    float64 inputs stay float64 (the accuracy reference of the CPU runs).
    """
    logits = hidden @ weight.t()
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return trl_pair_loss(trl_sequence_logps(logits, target), alpha, beta, gamma)


def _build_reference(opts: BuildOptions) -> LossFn:
    return _with_method(lambda w, h, t: reference_loss(w, h, t), "materialised")


def _raise_compile_limits():
    """One process measures many shapes: let dynamo recompile instead of falling back to eager."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))


def _build_reference_compile(opts: BuildOptions) -> LossFn:
    _raise_compile_limits()
    compiled = torch.compile(reference_loss)
    return _with_method(lambda w, h, t: compiled(w, h, t), "materialised")


# ---------------------------------------------------------------------------------------
# alphapo
# ---------------------------------------------------------------------------------------


def _build_alphapo(backend: str, alpha: float, opts: BuildOptions, path: str = "auto") -> LossFn:
    from alphapo import AlphaPOLoss

    if backend == "triton":
        # TRITON_INTERPRET=1 runs the kernels on CPU (slowly): for tests, never for timings.
        if opts.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise Unavailable("needs CUDA: the Triton backend runs on GPU tensors")
        try:
            import alphapo.kernels.fused  # noqa: F401
        except Exception as exc:  # the kernels are optional: report why they do not import
            raise Unavailable(f"alphapo.kernels does not import: {type(exc).__name__}: {exc}") from exc
    loss_fn = AlphaPOLoss(alpha=alpha, beta=BETA, gamma=GAMMA, backend=backend, scratch_bytes=opts.scratch_bytes,
                          path=path)

    def fn(weight, hidden, target):
        return loss_fn(weight, hidden, target)[0]

    fn.loss_module = loss_fn
    return fn


# ---------------------------------------------------------------------------------------
# Liger-Kernel: LigerFusedLinearSimPOLoss (no α: compared at α = 0)
# ---------------------------------------------------------------------------------------


def _build_liger(opts: BuildOptions) -> LossFn:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearSimPOLoss
    except Exception as exc:
        raise Unavailable(f"liger-kernel not importable ({type(exc).__name__}: {exc}); pip install liger-kernel") from exc
    if opts.compile:
        _raise_compile_limits()
    # Liger's `alpha` is the weight of its NLL term, not AlphaPO's α: switch the term off.
    loss_fn = LigerFusedLinearSimPOLoss(
        ignore_index=IGNORE_INDEX, beta=BETA, gamma=GAMMA, alpha=0.0, compute_nll_loss=False, compiled=opts.compile
    )

    def fn(weight, hidden, target):
        return loss_fn(weight, hidden, target)[0]

    return _with_method(fn, "chunked (torch.compile)" if opts.compile else "chunked")


# ---------------------------------------------------------------------------------------
# Cut Cross-Entropy: per-token log-probs, then the epilogue in torch
# ---------------------------------------------------------------------------------------


def _build_cce(filter_eps, opts: BuildOptions) -> LossFn:
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as exc:
        raise Unavailable(
            f"cut-cross-entropy not importable ({type(exc).__name__}: {exc}); pip install cut-cross-entropy"
        ) from exc
    if opts.device.type != "cuda":
        raise Unavailable("needs CUDA: cut-cross-entropy's CCE kernels run on GPU tensors")
    kwargs = {} if filter_eps == "default" else {"filter_eps": filter_eps}
    from alphapo.epilogue import AlphaPOConfig, preference_loss

    cfg = AlphaPOConfig(alpha=ALPHA, beta=BETA, gamma=GAMMA)

    def fn(weight, hidden, target):
        nll = linear_cross_entropy(hidden, weight, target, ignore_index=IGNORE_INDEX, reduction="none", **kwargs)
        mask = (target != IGNORE_INDEX).to(nll.dtype)
        # CCE 25.1.1's backward calls grad_out.view(-1), which fails on the stride-0
        # gradient that a plain .sum(-1) hands back: multiplying by the float mask first
        # makes that gradient a real tensor (DESIGN.md §5).
        seq_sum = -(nll * mask).sum(-1)
        loss = preference_loss(seq_sum, mask.sum(-1), cfg)[0]
        return loss.float()

    return _with_method(fn, "recompute")


# ---------------------------------------------------------------------------------------
# TRL's fused LM head (DPOTrainer since 1.x): per-token log-probs without logits, then the epilogue
# ---------------------------------------------------------------------------------------

# DPOTrainer's vocabulary tile for the fused head (its tokens come TOKEN_CHUNK_SIZE at a time).
TRL_VOCAB_CHUNK = 32768


def _build_trl_fused(opts: BuildOptions) -> LossFn:
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    except Exception as exc:
        raise Unavailable(f"trl.kernels not importable ({type(exc).__name__}: {exc}); pip install 'trl>=1.0'") from exc
    from alphapo.epilogue import AlphaPOConfig, preference_loss

    cfg = AlphaPOConfig(alpha=ALPHA, beta=BETA, gamma=GAMMA)

    def fn(weight, hidden, target):
        # Valid tokens only, as DPOTrainer feeds the head its completion tokens.
        valid = target != IGNORE_INDEX
        flat = valid.reshape(-1).nonzero().squeeze(1)
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat)
        y = target.reshape(-1).index_select(0, flat)
        logps = ChunkedLogProbFunction.apply(h, weight, None, y, 1.0, TRL_VOCAB_CHUNK, None, 1.0, ())[0]
        seq_sum = logps.new_zeros(valid.numel()).index_put((flat,), logps).view(valid.shape).sum(-1)
        return preference_loss(seq_sum, valid.sum(-1), cfg)[0].float()

    return _with_method(fn, "recompute")


PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider("alphapo-triton", ALPHA, "AlphaPOLoss(backend='triton'): fused Triton kernels, valid tokens only",
                 functools.partial(_build_alphapo, "triton", ALPHA)),
        Provider("alphapo-triton-a0", 0.0, "the same at α = 0 (SimPO), beside Liger",
                 functools.partial(_build_alphapo, "triton", 0.0)),
        Provider("alphapo-torch", ALPHA, "AlphaPOLoss(backend='torch'): chunked PyTorch, valid tokens only",
                 functools.partial(_build_alphapo, "torch", ALPHA)),
        Provider("alphapo-torch-a0", 0.0, "the same at α = 0 (SimPO), beside Liger",
                 functools.partial(_build_alphapo, "torch", 0.0)),
        Provider("alphapo-triton-recompute", ALPHA, "AlphaPOLoss(backend='triton', path='recompute'): 8·N·H·V, "
                 "no logits kept (the lean mode)", functools.partial(_build_alphapo, "triton", ALPHA, path="recompute")),
        Provider("alphapo-torch-recompute", ALPHA, "AlphaPOLoss(backend='torch', path='recompute')",
                 functools.partial(_build_alphapo, "torch", ALPHA, path="recompute")),
        Provider("reference", ALPHA, "materialised logits, .float() log-softmax + gather (TRL's math)",
                 _build_reference),
        Provider("reference-compile", ALPHA, "the reference under torch.compile", _build_reference_compile),
        Provider("liger", 0.0, "LigerFusedLinearSimPOLoss (no α: runs at α = 0)", _build_liger),
        Provider("trl-fused", ALPHA, "trl.kernels.ChunkedLogProbFunction (DPOTrainer's fused head) over the valid "
                 "tokens + torch epilogue", _build_trl_fused),
        Provider("cce", ALPHA, "cut_cross_entropy.linear_cross_entropy(reduction='none') + torch epilogue, "
                 "default gradient filter", functools.partial(_build_cce, "default")),
        Provider("cce-exact", ALPHA, "the same with filter_eps=None (no gradient filtering)",
                 functools.partial(_build_cce, None)),
    )
}

# Providers that a sweep point measures (the others add nothing to the memory curve).
SWEEP_PROVIDERS = ("alphapo-triton", "alphapo-torch", "reference", "reference-compile", "liger", "cce", "trl-fused")


def default_providers(device: torch.device) -> list[str]:
    """Every provider; on CUDA the torch α = 0 row is left out (the Triton one stands beside Liger)."""
    names = list(PROVIDERS)
    if device.type == "cuda":
        names.remove("alphapo-torch-a0")
    return names


def build(name: str, opts: BuildOptions) -> LossFn:
    """The provider's loss function, or :class:`Unavailable` with the reason."""
    if name not in PROVIDERS:
        raise ValueError(f"unknown provider {name!r}; known: {list(PROVIDERS)}")
    return PROVIDERS[name].build(opts)
