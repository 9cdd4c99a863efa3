"""The pair-loss epilogue: from per-sequence log-probs to the loss, and the metrics.

Every backend reduces the lm-head to per-sequence sums (2B,) (chosen rows first); what
follows touches 2B numbers and is plain, differentiable torch run in float64, so
``exp(-alpha * x)`` cannot overflow and autograd hands each backend ``dL/dS`` for its own
backward. The PyTorch it computes::

    s        = S / n if average_log_prob else S            # S: summed (LD-DPO: weighted) log-probs
    x_w, x_l = s[:B] - ref_w, s[B:] - ref_l               # ref_* = 0 without a reference model
    r        = f_alpha(x) = -expm1(-alpha * x) / alpha    # alpha == 0: r = x (SimPO, DPO)
    losses   = Σ_k loss_weights[k] · pair_loss(loss_type[k], r)   (× WPO weights)
    loss     = mean(losses) + (nll_weight + Σ weights of "sft") · NLL(chosen tokens)

with the loss types of :mod:`alphapo.pair_losses` (sigmoid: ``-(1-ε) logσ(u) - ε logσ(-u)``,
``u = β (r_w - r_l) - γ``; hinge; ipo; and the rest of TRL's DPO family).

Sign convention: the paper (arXiv 2501.03884) and TRL (``trl.experimental.cpo``,
``loss_type="alphapo"``) write the reward as ``(1 - p**(-alpha)) / alpha`` with
``p = exp(s)``, which is ``f`` above. The seed summary's ``(1/alpha)[(pi/pi_ref)**alpha - 1]``
is the same family with ``alpha -> -alpha``: pass ``alpha=-a`` to get it. TRL evaluates
``exp(s).pow(-alpha)``, which underflows to 0 and gives NaN for summed log-probs; here the
exponent is formed directly, with a tangent continuation past
:data:`~alphapo.pair_losses.EXP_CAP` (the regime is described there).
"""

from __future__ import annotations

import decimal
import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .pair_losses import (
    ALPHAPO_FAMILY,
    EXP_CAP,
    F_DIVERGENCES,
    LOSS_TYPES,
    PairInputs,
    alpha_reward,
    on_tangent,
    pair_loss,
    saturated,
)

__all__ = ["EXP_CAP", "AlphaPOConfig", "AlphaPOOutput", "alpha_reward", "preference_loss"]


def _scalar(name, value):
    """A one-element tensor or array as its Python number (other values as they are)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        if value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{name} must be a finite number, got a {value.dtype} tensor")
        return value.item()
    if isinstance(value, np.ndarray) and value.size == 1:
        return value.reshape(()).item()  # a bool array gives a bool, refused below
    return value


def _real(name, value, *, positive=False, lo=None, hi=None):
    """A finite real number: any real numeric type (numpy's, ``Decimal``, ``Fraction``) or a
    one-element real tensor / array; never a bool."""
    value = _scalar(name, value)
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a finite number (not a bool), got {value!r}")
    if not isinstance(value, (numbers.Real, decimal.Decimal)):
        raise ValueError(f"{name} must be a finite number, got {type(value).__name__} {value!r}")
    try:
        value = float(value)
    except ValueError:  # Decimal('sNaN')
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must lie in [{lo:g}, {hi:g}], got {value}")
    return value


def _flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


@dataclass(frozen=True)
class AlphaPOConfig:
    """The non-tensor options of the loss, in one place (backends take it whole).

    Defaults: ``alpha=0.25`` is the paper's setting for Mistral-7B and Llama-3-8B.
    ``beta=2.5`` and ``gamma=1.375`` (``gamma=None`` resolves to it for the AlphaPO family
    sigmoid/hinge/ipo, to 0 for TRL's other DPO losses, which have no margin) are SimPO's
    Llama-3-8B-Instruct recipe (β = 2.5, γ/β = 0.55), from which AlphaPO starts its search;
    TRL's defaults (β = 0.1, no margin) are tuned for summed, not averaged, log-probs.
    The DPO-family options keep TRL's ``DPOConfig`` names: ``loss_type`` (one name, or a
    list summed with ``loss_weights``, as MPO), ``f_divergence_type``,
    ``f_alpha_divergence_coef``, ``discopop_tau``, ``use_weighting`` (WPO) and ``ld_alpha``
    (LD-DPO: completion tokens beyond the shorter answer of a pair count ``ld_alpha``).
    """

    alpha: float = 0.25
    beta: float = 2.5
    gamma: float | None = None
    label_smoothing: float = 0.0
    loss_type: str | tuple = "sigmoid"
    average_log_prob: bool = True
    nll_weight: float = 0.0
    ignore_index: int = -100
    loss_weights: tuple | None = None
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    use_weighting: bool = False
    ld_alpha: float | None = None

    def __post_init__(self):
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        types = (self.loss_type,) if isinstance(self.loss_type, str) else self.loss_type
        if not isinstance(types, (tuple, list)) or not types or not all(isinstance(t, str) for t in types):
            raise ValueError(f"loss_type must be a name or a non-empty list of names, got {self.loss_type!r}")
        unknown = [t for t in types if t not in LOSS_TYPES]
        if unknown:
            raise ValueError(f"loss_type must be one of {tuple(LOSS_TYPES)} (or a list of them), got {unknown[0]!r}")
        put("loss_type", types[0] if len(types) == 1 else tuple(types))
        weights = self.loss_weights
        if weights is None:
            weights = (1.0,) * len(types)
        elif isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__") or len(weights) != len(types):
            raise ValueError(f"loss_weights must give one weight per loss type ({len(types)}), got {weights!r}")
        put("loss_weights", tuple(_real(f"loss_weights[{i}]", w) for i, w in enumerate(weights)))
        for name in ("alpha", "label_smoothing", "nll_weight", "f_alpha_divergence_coef"):
            put(name, _real(name, getattr(self, name)))
        put("beta", _real("beta", self.beta, positive=True))
        put("discopop_tau", _real("discopop_tau", self.discopop_tau, positive=True))
        put("average_log_prob", _flag("average_log_prob", self.average_log_prob))
        put("use_weighting", _flag("use_weighting", self.use_weighting))
        if isinstance(self.ignore_index, (bool, np.bool_)) or not isinstance(self.ignore_index, numbers.Integral):
            raise ValueError(f"ignore_index must be an int, got {self.ignore_index!r}")
        put("ignore_index", int(self.ignore_index))
        if self.nll_weight < 0:
            raise ValueError(f"nll_weight must be >= 0, got {self.nll_weight}")
        if self.ld_alpha is not None:
            put("ld_alpha", _real("ld_alpha", self.ld_alpha, lo=0.0, hi=1.0))
        self._check_shapes(types)

    def _check_shapes(self, types):
        """The rules that tie options to loss types (each names what it refuses)."""
        info = [LOSS_TYPES[t] for t in types]
        if self.gamma is None:
            object.__setattr__(self, "gamma", 1.375 if len(types) == 1 and types[0] in ALPHAPO_FAMILY else 0.0)
        else:
            object.__setattr__(self, "gamma", _real("gamma", self.gamma))
            if self.gamma != 0 and not any(i.margin for i in info):
                raise ValueError(f"gamma (a target margin) has no place in loss_type {self.loss_type!r}; pass gamma=0")
        eps = _real("label_smoothing", self.label_smoothing, lo=0.0, hi=0.5)
        if eps > 0 and all(i.smoothing == "no" for i in info):
            raise ValueError(
                f"label_smoothing={eps} would be ignored by loss_type {self.loss_type!r}: it applies to "
                f"{[t for t, i in LOSS_TYPES.items() if i.smoothing != 'no']}"
            )
        if "exo_pair" in types and not 0 < eps:
            raise ValueError('loss_type "exo_pair" needs label_smoothing > 0 (its ε; TRL suggests 1e-3)')
        if "robust" in types and eps >= 0.5:
            raise ValueError(f'loss_type "robust" needs label_smoothing < 0.5 (it divides by 1 - 2ε), got {eps}')
        if self.f_divergence_type not in F_DIVERGENCES:
            raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCES}, got {self.f_divergence_type!r}")
        if self.f_divergence_type != "reverse_kl":
            plain = [t for t, i in zip(types, info) if not i.fdiv]
            if plain:
                raise ValueError(
                    f"f_divergence_type={self.f_divergence_type!r} does not apply to loss_type {plain[0]!r} "
                    f"(as in TRL, only {[t for t, i in LOSS_TYPES.items() if i.fdiv]} take an f-divergence score)"
                )
        if self.use_weighting and any(i.coupled for i in info):
            raise ValueError("use_weighting (WPO) is not defined for aot / aot_unpaired (as in TRL)")

    @property
    def loss_types(self) -> tuple[str, ...]:
        return (self.loss_type,) if isinstance(self.loss_type, str) else self.loss_type

    @property
    def pair_separable(self) -> bool:
        """Whether the loss is a sum over pairs of a function of each pair alone (plus the
        NLL term): what the pair-chunked path needs. All loss types but aot/aot_unpaired."""
        return not any(LOSS_TYPES[t].coupled for t in self.loss_types)

    @property
    def nll_total(self) -> float:
        """Weight of the chosen tokens' mean NLL in the loss: nll_weight plus any "sft"."""
        return self.nll_weight + sum(w for t, w in zip(self.loss_types, self.loss_weights) if t == "sft")


class AlphaPOOutput(NamedTuple):
    """Detached metrics of one loss call (TRL's names in brackets).

    Per pair, shape ``(B,)``: ``chosen_logps``, ``rejected_logps`` [logps/chosen,
    logps/rejected] (length-averaged unless ``average_log_prob=False``; LD-DPO-weighted
    with ``ld_alpha``); ``chosen_rewards``, ``rejected_rewards`` (β · α-reward of the
    log-prob or log-ratio) [rewards/chosen, rewards/rejected]; ``reward_accuracy`` (1.0
    where chosen beats rejected) [rewards/accuracies]; ``reward_margin``
    [rewards/margins]. Scalars: ``chosen_logits_mean``, ``rejected_logits_mean`` (mean
    logit over valid tokens and the vocabulary) [logits/chosen, logits/rejected];
    ``nll_loss`` (mean NLL of the chosen tokens, whether or not it is weighted into the
    loss) [nll_loss]; ``entropy`` (mean softmax entropy over every valid token, chosen and
    rejected) [entropy]; ``mean_token_accuracy`` (share of chosen tokens whose target is
    the argmax) [mean_token_accuracy]; ``tangent_fraction`` (share of sequences whose α
    reward lies past :data:`EXP_CAP`, where it no longer depends on α's curve)
    [rewards/tangent_fraction]; ``saturated_fraction`` (share whose α reward is flat,
    ``α x > EXP_CAP``: its gradient is below e^-30) [rewards/saturated_fraction].
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
    entropy: torch.Tensor
    mean_token_accuracy: torch.Tensor
    tangent_fraction: torch.Tensor
    saturated_fraction: torch.Tensor

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
            f"{prefix}entropy": self.entropy,
            f"{prefix}mean_token_accuracy": self.mean_token_accuracy,
            f"{prefix}rewards/tangent_fraction": self.tangent_fraction,
            f"{prefix}rewards/saturated_fraction": self.saturated_fraction,
        }


class SequenceSums(NamedTuple):
    """What a backend hands the epilogue, per sequence (2B,), chosen rows first.

    ``logps``: Σ_t of the token log-probs (LD-DPO-weighted with ``ld_alpha``), the one the
    rewards use, differentiable; ``raw``: the unweighted sum when ``ld_alpha`` is set (the
    NLL term's), else None; ``n``: valid-token counts; ``wpo``: Σ_t (log p(y_t) - log Σ_v
    p_v²) for WPO weights (``use_weighting``), else None; ``entropy``, ``hits``: Σ_t of the
    token entropy and of 1[target is the argmax], for the metrics (None where a backend
    does not compute them).
    """

    logps: torch.Tensor
    n: torch.Tensor
    raw: torch.Tensor | None = None
    wpo: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    hits: torch.Tensor | None = None

    @classmethod
    def from_columns(cls, seq: torch.Tensor, metrics: torch.Tensor, n: torch.Tensor, want_wpo: bool) -> "SequenceSums":
        """From a backend's (2B, K) log-prob sums (column 0 raw, column 1 LD-DPO-weighted
        when K = 2) and (2B, 2 or 3) metric sums (entropy, hits[, WPO])."""
        two = seq.shape[1] == 2
        return cls(seq[:, -1], n, seq[:, 0] if two else None, metrics[:, 2] if want_wpo else None,
                   metrics[:, 0], metrics[:, 1])


class EpilogueOut(NamedTuple):
    loss: torch.Tensor  # float64 scalar
    logps: torch.Tensor  # (2B,) the per-sequence values before the reference (averaged or summed)
    losses: torch.Tensor  # (B,) weighted pair losses (WPO included), before the mean
    chosen_rewards: torch.Tensor  # (B,) β · f(x_w)
    rejected_rewards: torch.Tensor
    nll: torch.Tensor  # this batch's own mean NLL of the chosen tokens
    tangent: torch.Tensor  # (2B,) bool: α reward past the cap, on its tangent
    saturated: torch.Tensor  # (2B,) bool: α reward flat (slope below e^-EXP_CAP)


def preference_loss(
    sums: SequenceSums | torch.Tensor,
    n_tokens: torch.Tensor | None,
    cfg: AlphaPOConfig,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    num_pairs: int | None = None,
    nll_tokens=None,
) -> EpilogueOut:
    """The loss (differentiable w.r.t. the sums) and the per-pair metric tensors.

    ``sums``: a :class:`SequenceSums`, or just the (2B,) summed log-probs with
    ``n_tokens`` beside them. The loss is ``Σ pair losses / num_pairs + nll_total ·
    (-Σ chosen log-probs) / nll_tokens``; by default ``num_pairs = B`` and ``nll_tokens``
    = this batch's chosen tokens, i.e. the mean over pairs plus the chosen tokens' mean NLL.
    The pair-chunked path evaluates it on a few pairs at a time with the whole batch's
    normalisers, so that the chunks' losses and gradients add up to the batch's.
    """
    if not isinstance(sums, SequenceSums):
        sums = SequenceSums(sums, n_tokens)
    s_sum = sums.logps.double()
    raw = s_sum if sums.raw is None else sums.raw.double()
    n = sums.n.double()
    logps = s_sum / n if cfg.average_log_prob else s_sum
    B = logps.shape[0] // 2
    p_w, p_l = logps[:B], logps[B:]
    x_w, x_l = p_w, p_l
    q_w = q_l = None
    if ref_chosen_logps is not None:
        q_w, q_l = ref_chosen_logps.double(), ref_rejected_logps.double()
        x_w, x_l = p_w - q_w, p_l - q_l
    a = cfg.alpha
    r_w, r_l = alpha_reward(x_w, a), alpha_reward(x_l, a)
    shaped = PairInputs(
        r_w, r_l, n[:B], n[B:], alpha_reward(p_w, a), alpha_reward(p_l, a),
        None if q_w is None else alpha_reward(q_w, a), None if q_l is None else alpha_reward(q_l, a),
    )  # fmt: skip
    losses = torch.zeros_like(r_w)
    for kind, weight in zip(cfg.loss_types, cfg.loss_weights):
        if kind != "sft":
            losses = losses + weight * pair_loss(kind, shaped, cfg)
    if cfg.use_weighting:
        # WPO: each pair's losses times exp(mean_t [log p(y_t) - log Σ_v p_v²]) of both answers,
        # without gradient (TRL's use_weighting; its "sft" term is left unweighted here).
        wpo = torch.exp(sums.wpo.double() / n).detach()
        losses = losses * (wpo[:B] * wpo[B:])
    chosen_nll = -raw[:B].sum()
    nll = chosen_nll / n[:B].sum()
    loss = losses.mean() if num_pairs is None else losses.sum() / num_pairs
    if cfg.nll_total:
        loss = loss + cfg.nll_total * (nll if nll_tokens is None else chosen_nll / nll_tokens)
    tangent = torch.cat([on_tangent(x_w, a), on_tangent(x_l, a)])
    flat = torch.cat([saturated(x_w, a), saturated(x_l, a)])
    return EpilogueOut(loss, logps, losses, cfg.beta * r_w, cfg.beta * r_l, nll, tangent, flat)


def pair_chunk_grad(sums: SequenceSums, cfg: AlphaPOConfig, ref_chosen_logps, ref_rejected_logps, num_pairs: int,
                    nll_tokens) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``dL/dS`` (float64, (2b,)) for a chunk of b whole pairs (chosen rows first), and
    ``dL/dS_raw`` when the NLL term reads the unweighted sums (LD-DPO), else None.

    ``L`` is the batch's loss, of which this chunk's pairs own the terms
    ``pair losses / num_pairs`` and their chosen tokens' share of the NLL term
    (``nll_tokens``: the batch's normaliser). Every pair-separable loss depends on a
    pair's two sequences alone, so these are the batch gradient's entries for the chunk's
    sequences: :func:`preference_loss` itself is differentiated, so each loss type has one
    definition for both paths.
    """
    with torch.enable_grad():
        s = sums.logps.detach().double().requires_grad_(True)
        raw = None if sums.raw is None else sums.raw.detach().double().requires_grad_(True)
        leaves = [s] if raw is None else [s, raw]
        loss = preference_loss(
            sums._replace(logps=s, raw=raw), None, cfg, ref_chosen_logps, ref_rejected_logps,
            num_pairs=num_pairs, nll_tokens=nll_tokens,
        ).loss  # fmt: skip
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
    return grads[0], (grads[1] if raw is not None else None)


def make_output(epi: EpilogueOut, sums: SequenceSums, logit_sums, vocab_size) -> AlphaPOOutput:
    """Pack detached metrics; ``logit_sums`` (2B,) is Σ over valid tokens of Σ_v z."""
    B = epi.logps.shape[0] // 2
    logps, rewards_w, rewards_l = epi.logps.detach(), epi.chosen_rewards.detach(), epi.rejected_rewards.detach()
    n = sums.n.to(logit_sums.dtype)
    denom_w = n[:B].sum() * vocab_size
    denom_l = n[B:].sum() * vocab_size
    nan = torch.full((), float("nan"), device=logps.device)
    entropy = (sums.entropy.double().sum() / n.sum()).float() if sums.entropy is not None else nan
    accuracy = (sums.hits[:B].double().sum() / n[:B].sum()).float() if sums.hits is not None else nan
    return AlphaPOOutput(
        chosen_logps=logps[:B].float(),
        rejected_logps=logps[B:].float(),
        chosen_rewards=rewards_w.float(),
        rejected_rewards=rewards_l.float(),
        reward_accuracy=(rewards_w > rewards_l).float(),
        reward_margin=(rewards_w - rewards_l).float(),
        chosen_logits_mean=(logit_sums[:B].sum() / denom_w).float(),
        rejected_logits_mean=(logit_sums[B:].sum() / denom_l).float(),
        nll_loss=epi.nll.detach().float(),
        entropy=entropy,
        mean_token_accuracy=accuracy,
        tangent_fraction=epi.tangent.float().mean(),
        saturated_fraction=epi.saturated.float().mean(),
    )
