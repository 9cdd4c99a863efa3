"""The pair-loss epilogue: from per-sequence log-probs to the AlphaPO loss.

Every backend reduces the lm-head to per-sequence log-probs ``s`` of shape ``(2B,)``
(chosen rows first); what follows touches 2B numbers and is plain, differentiable torch
run in float64, so ``exp(-alpha * s)`` cannot overflow and autograd hands each backend
``dL/ds`` for its own backward. The PyTorch it computes::

    x_w, x_l = s[:B] - ref_w, s[B:] - ref_l          # ref_* = 0 without a reference model
    f(x)     = -expm1(-alpha * x) / alpha            # alpha == 0: f(x) = x (SimPO)
    u        = beta * (f(x_w) - f(x_l)) - gamma
    sigmoid:  -(1 - eps) * logsigmoid(u) - eps * logsigmoid(-u)   (as softplus)
    hinge:    relu(1 - u)
    ipo:      ((u - 1/2) / beta) ** 2                  # = (Δ - γ/β - 1/(2β))²
    loss      = mean(pair losses) + nll_weight * NLL(chosen tokens)

Sign convention: the paper (arXiv 2501.03884) and TRL (``trl.experimental.cpo``,
``loss_type="alphapo"``) write the reward as ``(1 - p**(-alpha)) / alpha`` with
``p = exp(s)``, which is ``f`` above. The seed summary's ``(1/alpha)[(pi/pi_ref)**alpha - 1]``
is the same family with ``alpha -> -alpha``: pass ``alpha=-a`` to get it. TRL evaluates
``exp(s).pow(-alpha)``, which underflows to 0 and gives NaN for summed log-probs; here the
exponent is formed directly.

Clamping: where the exponent ``E = -alpha * x`` passes :data:`EXP_CAP` the reward leaves
the curve along its tangent at ``E = EXP_CAP``: ``f`` stays continuous, once
differentiable and monotone, and loss and gradients stay finite in float32 for
``alpha`` in [-2, 2] down to summed log-probs of -5000 (the IPO square included). Below
the cap, ``f`` is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge", "ipo")

# e**30 ≈ 1.1e13: at x = -5000 the tangent reward is ≈ 5e16, whose IPO square (≈ 3e33)
# still fits in float32 (max 3.4e38). A higher cap overflows the IPO loss there.
EXP_CAP = 30.0


@dataclass(frozen=True)
class AlphaPOConfig:
    """The non-tensor options of the loss, in one place (backends take it whole).

    Defaults: ``alpha=0.25`` is the paper's setting for Mistral-7B and Llama-3-8B.
    ``beta=2.5`` and ``gamma=1.375`` are SimPO's Llama-3-8B-Instruct recipe (β = 2.5,
    γ/β = 0.55), from which AlphaPO starts its search; TRL's ``CPOConfig`` defaults
    (β = 0.1, γ = 0.5) are tuned for summed, not averaged, log-probs.
    """

    alpha: float = 0.25
    beta: float = 2.5
    gamma: float = 1.375
    label_smoothing: float = 0.0
    loss_type: str = "sigmoid"
    average_log_prob: bool = True
    nll_weight: float = 0.0
    ignore_index: int = -100

    def __post_init__(self):
        for name in ("alpha", "beta", "gamma", "label_smoothing", "nll_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing <= 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5], got {self.label_smoothing}")
        if self.nll_weight < 0:
            raise ValueError(f"nll_weight must be >= 0, got {self.nll_weight}")
        if not isinstance(self.ignore_index, int):
            raise ValueError(f"ignore_index must be an int, got {self.ignore_index!r}")

    @property
    def pair_separable(self) -> bool:
        """Whether the loss is a sum over pairs of a function of each pair alone (plus the
        NLL term): what the pair-chunked path needs. Every loss type here is."""
        return self.loss_type in LOSS_TYPES


class AlphaPOOutput(NamedTuple):
    """Detached metrics of one loss call (TRL's names in brackets).

    Per pair, shape ``(B,)``: ``chosen_logps``, ``rejected_logps`` [logps/chosen,
    logps/rejected] (length-averaged unless ``average_log_prob=False``);
    ``chosen_rewards``, ``rejected_rewards`` (β·reward) [rewards/chosen,
    rewards/rejected]; ``reward_accuracy`` (1.0 where chosen beats rejected)
    [rewards/accuracies]; ``reward_margin`` [rewards/margins]. Scalars:
    ``chosen_logits_mean``, ``rejected_logits_mean`` (mean logit over valid tokens and the
    vocabulary) [logits/chosen, logits/rejected]; ``nll_loss`` (mean NLL of the chosen
    tokens, whether or not it is weighted into the loss) [nll_loss].
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    reward_accuracy: torch.Tensor
    reward_margin: torch.Tensor
    chosen_logits_mean: torch.Tensor
    rejected_logits_mean: torch.Tensor
    nll_loss: torch.Tensor

    def to_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The metrics reduced to scalars under TRL's log names (still tensors: no sync)."""
        return {
            f"{prefix}rewards/chosen": self.chosen_rewards.mean(),
            f"{prefix}rewards/rejected": self.rejected_rewards.mean(),
            f"{prefix}rewards/accuracies": self.reward_accuracy.mean(),
            f"{prefix}rewards/margins": self.reward_margin.mean(),
            f"{prefix}logps/chosen": self.chosen_logps.mean(),
            f"{prefix}logps/rejected": self.rejected_logps.mean(),
            f"{prefix}logits/chosen": self.chosen_logits_mean,
            f"{prefix}logits/rejected": self.rejected_logits_mean,
            f"{prefix}nll_loss": self.nll_loss,
        }


def alpha_reward(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """``f_alpha(x) = -expm1(-alpha x) / alpha`` (``x`` at alpha = 0), tangent past EXP_CAP."""
    if alpha == 0.0:
        return x
    exponent = -alpha * x
    inside = exponent <= EXP_CAP
    # Both branches are evaluated: clamp so the unused one cannot produce inf (and NaN grads).
    curve = -torch.expm1(exponent.clamp(max=EXP_CAP)) / alpha
    x_cap = -EXP_CAP / alpha
    tangent = -math.expm1(EXP_CAP) / alpha + math.exp(EXP_CAP) * (x - x_cap)
    return torch.where(inside, curve, tangent)


def pair_losses(chosen: torch.Tensor, rejected: torch.Tensor, cfg: AlphaPOConfig):
    """Per-pair losses and β·rewards from per-sequence values (log-probs or log-ratios)."""
    reward_w = alpha_reward(chosen, cfg.alpha)
    reward_l = alpha_reward(rejected, cfg.alpha)
    u = cfg.beta * (reward_w - reward_l) - cfg.gamma
    if cfg.loss_type == "sigmoid":
        eps = cfg.label_smoothing
        # -logsigmoid(u) = softplus(-u); softplus is the cheaper kernel on CPU (logsigmoid's
        # took milliseconds on 2 elements under thread contention).
        losses = (1.0 - eps) * F.softplus(-u) + eps * F.softplus(u)
    elif cfg.loss_type == "hinge":
        losses = torch.relu(1.0 - u)
    else:  # ipo
        losses = ((u - 0.5) / cfg.beta) ** 2
    return losses, cfg.beta * reward_w, cfg.beta * reward_l


def preference_loss(
    seq_logps_sum: torch.Tensor,
    n_tokens: torch.Tensor,
    cfg: AlphaPOConfig,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    num_pairs: int | None = None,
    nll_tokens=None,
):
    """Loss (differentiable w.r.t. ``seq_logps_sum``) and the per-pair metric tensors.

    ``seq_logps_sum``: (2B,) summed token log-probs; ``n_tokens``: (2B,) valid counts.
    The loss is ``sum(pair losses) / num_pairs + nll_weight * (-Σ chosen log-probs) / nll_tokens``;
    by default ``num_pairs = B`` and ``nll_tokens`` = this batch's chosen tokens, i.e. the
    mean over pairs plus the chosen tokens' mean NLL. The pair-chunked path evaluates it
    on a few pairs at a time with the whole batch's normalisers, so that the chunks' losses
    (and gradients) add up to the batch's. Returns ``(loss float64 scalar, logps (2B,),
    losses (B,), chosen_rewards, rejected_rewards, nll)``, ``nll`` being this batch's own
    mean NLL of the chosen tokens (a metric, whatever ``nll_tokens`` says).
    """
    s_sum = seq_logps_sum.double()
    n = n_tokens.double()
    logps = s_sum / n if cfg.average_log_prob else s_sum
    B = logps.shape[0] // 2
    x_w, x_l = logps[:B], logps[B:]
    if ref_chosen_logps is not None:
        x_w = x_w - ref_chosen_logps.double()
        x_l = x_l - ref_rejected_logps.double()
    losses, rewards_w, rewards_l = pair_losses(x_w, x_l, cfg)
    chosen_nll = -s_sum[:B].sum()
    nll = chosen_nll / n[:B].sum()
    loss = losses.mean() if num_pairs is None else losses.sum() / num_pairs
    if cfg.nll_weight:
        loss = loss + cfg.nll_weight * (nll if nll_tokens is None else chosen_nll / nll_tokens)
    return loss, logps, losses, rewards_w, rewards_l, nll


def pair_chunk_grad(
    seq_logps_sum: torch.Tensor,
    n_tokens: torch.Tensor,
    cfg: AlphaPOConfig,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    num_pairs: int,
    nll_tokens,
) -> torch.Tensor:
    """``dL/dS`` (float64, (2b,)) for a chunk of b whole pairs (chosen rows first).

    ``L`` is the batch's loss, of which this chunk's pairs own the terms
    ``pair losses / num_pairs`` and their chosen tokens' share of the NLL term
    (``nll_tokens``: the batch's normaliser). Every pair-separable loss depends on a
    pair's two sequences alone, so these are the batch gradient's entries for the chunk's
    sequences: :func:`preference_loss` itself is differentiated, so each loss type has one
    definition for both paths.
    """
    with torch.enable_grad():
        s = seq_logps_sum.detach().double().requires_grad_(True)
        loss = preference_loss(
            s, n_tokens, cfg, ref_chosen_logps, ref_rejected_logps, num_pairs=num_pairs, nll_tokens=nll_tokens
        )[0]
        (grad,) = torch.autograd.grad(loss, s)
    return grad


def make_output(logps, rewards_w, rewards_l, nll, logit_sums, n_tokens, vocab_size) -> AlphaPOOutput:
    """Pack detached metrics; ``logit_sums`` (2B,) is Σ over valid tokens of Σ_v z."""
    B = logps.shape[0] // 2
    logps, rewards_w, rewards_l = logps.detach(), rewards_w.detach(), rewards_l.detach()
    n = n_tokens.to(logit_sums.dtype)
    denom_w = n[:B].sum() * vocab_size
    denom_l = n[B:].sum() * vocab_size
    return AlphaPOOutput(
        chosen_logps=logps[:B].float(),
        rejected_logps=logps[B:].float(),
        chosen_rewards=rewards_w.float(),
        rejected_rewards=rewards_l.float(),
        reward_accuracy=(rewards_w > rewards_l).float(),
        reward_margin=(rewards_w - rewards_l).float(),
        chosen_logits_mean=(logit_sums[:B].sum() / denom_w).float(),
        rejected_logits_mean=(logit_sums[B:].sum() / denom_l).float(),
        nll_loss=nll.detach().float(),
    )
