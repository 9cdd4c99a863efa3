"""Every DPO-family pair loss TRL's ``DPOTrainer`` has (trl 1.16), each shaped by the α reward.

A loss sees, per pair j, the two sequences' values ``x`` (the log-prob, or the log-ratio
to the reference model; length-averaged or summed, see :class:`~alphapo.AlphaPOConfig`)
and turns them into a per-pair loss. Here ``x`` first passes through the α reward
``r = f_α(x) = -expm1(-α x) / α`` (``r = x`` at α = 0, which reproduces TRL exactly),
then, for the losses that take one, through TRL's f-divergence score ``s = φ(r)``::

    r_w, r_l  = f_α(x_w), f_α(x_l)                      # TRL's chosen/rejected log-ratios at α = 0
    s_w, s_l  = φ(r_w), φ(r_l)                           # f_divergence_type (reverse_kl: φ(r) = r)
    Δ         = s_w - s_l;   z = β Δ - γ                 # γ: the target margin (0 in TRL)

=============  ==========================================================  ===========  =====  ===
loss_type      per-pair loss (``sp(t) = softplus(t) = -log σ(-t)``)         ε            γ      φ
=============  ==========================================================  ===========  =====  ===
sigmoid        (1-ε) sp(-z) + ε sp(z)      (DPO, SimPO, AlphaPO; ε: cDPO)  optional     yes    yes
hinge          relu(1 - z)                                                  –            yes    yes
ipo            (s_w/L_w - s_l/L_l - γ/β - 1/(2β))²                          –            yes    yes
exo_pair       σ(z)(log σ(z) - log(1-ε)) + σ(-z)(log σ(-z) - log ε)          required     yes    yes
nca_pair       sp(-β r_w) + sp(β r_w)/2 + sp(β r_l)/2                       –            –      –
robust         ((1-ε) sp(-z) - ε sp(z)) / (1 - 2ε)                          optional     yes    yes
bco_pair       sp(-β r_w) + sp(β r_l)                                        –            –      –
sppo_hard      (r_w - 1/(2β))² + (r_l + 1/(2β))²                             –            –      –
aot            (1-ε) sp(-z) + ε sp(z),  z = β(sort(f(p_w)-f(p_l)) -        optional     yes    –
               sort(f(q_w)-f(q_l))) - γ   (p policy, q reference log-probs: sorted over the batch)
aot_unpaired   the same with z = β(sort(r_w) - sort(r_l)) - γ               optional     yes    –
apo_zero       1 - σ(β r_w) + σ(β r_l)                                       –            –      –
apo_down       σ(β r_w) + 1 - σ(β (r_w - r_l))                               –            –      –
discopop       sp(-z)(1 - m) + exp(-z) m,  m = σ(z / discopop_tau)          –            yes    yes
sft            the chosen tokens' mean NLL (not a pair loss: see below)     –            –      yes
sigmoid_norm   sp(-(β (s_w/L_w - s_l/L_l) - γ))                              –            yes    yes
=============  ==========================================================  ===========  =====  ===

``L`` is the sequence's valid-token count when log-probs are summed (``average_log_prob=
False``: TRL's length normalisation of IPO and ``sigmoid_norm``, applied after φ) and 1 when
they are already averaged (then IPO is CPO's/SimPO's IPO on averaged log-probs; at
α = 0 with φ = identity the two agree). ``sft`` is the NLL term (:mod:`alphapo.epilogue`).
``aot`` and ``aot_unpaired`` sort over the batch, so they couple pairs: they run on the
recompute path; every other loss is a function of one pair.

TRL's α-divergence score ``φ(r) = (e^{(a-1) r} - 1)/(a - 1)`` with ``a =
f_alpha_divergence_coef`` is the α reward family itself: ``φ = f_{1-a}`` (``-expm1((a-1) r)
/ (1-a)``); ``f_divergence_type="alpha_divergence"`` at α = 0 therefore equals
``f_divergence_type="reverse_kl"`` with ``alpha = 1 - a`` (tested) while the exponent
``(a-1)·r`` stays below :data:`~alphapo.epilogue.EXP_CAP` = 30. Past it they part: the α
reward continues along its tangent, the score keeps TRL's curve up to TRL's clamp of the
exponent at 80 (:data:`ALPHA_DIVERGENCE_CAP`) and is constant beyond, as in TRL.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

EXP_CAP = 30.0
"""Past ``-α x = EXP_CAP`` the α reward leaves its curve along the tangent there: it stays
continuous, monotone and once differentiable, and loss and gradients stay finite in
float32 for α in [-2, 2] down to summed log-probs of -5000 (the IPO square included:
e^30 ≈ 1.1e13, so the tangent reward at x = -5000 is ≈ 5e16 and its square ≈ 3e33 still
fits float32). On the tangent ``f`` is linear with slope e^30: when every sequence of a
batch lies there (|α x| > 30 — e.g. α ≥ 10 with summed log-probs, or α·x ≤ -30 for negative
α, whose reward then saturates towards ``1/|α|`` with gradient e^{-|α x|} → 0), the loss
no longer changes with α. ``AlphaPOOutput.tangent_fraction`` reports the share of
sequences past the cap on the tangent side (``-α x > EXP_CAP``), ``saturated_fraction``
the share on the flat side (``-α x < -EXP_CAP``: slope below e^-30, no gradient to speak
of); both are 0 at α = 0."""


ALPHA_DIVERGENCE_CAP = 80.0
ALPHA_DIVERGENCE_CAP_FP16 = 11.0
"""TRL's clamp on the α-divergence score's exponent (float32/bfloat16, float16), kept so
that ``f_divergence_type="alpha_divergence"`` is TRL's score everywhere, not only below
EXP_CAP."""


class LossType(NamedTuple):
    margin: bool  # takes γ (z = β Δ - γ)
    smoothing: str  # label_smoothing: "no", "optional" or "required"
    fdiv: bool  # takes an f-divergence score φ
    coupled: bool = False  # couples pairs across the batch (sorts over it)


LOSS_TYPES: dict[str, LossType] = {
    "sigmoid": LossType(True, "optional", True),
    "hinge": LossType(True, "no", True),
    "ipo": LossType(True, "no", True),
    "exo_pair": LossType(True, "required", True),
    "nca_pair": LossType(False, "no", False),
    "robust": LossType(True, "optional", True),
    "bco_pair": LossType(False, "no", False),
    "sppo_hard": LossType(False, "no", False),
    "aot": LossType(True, "optional", False, coupled=True),
    "aot_unpaired": LossType(True, "optional", False, coupled=True),
    "apo_zero": LossType(False, "no", False),
    "apo_down": LossType(False, "no", False),
    "discopop": LossType(True, "no", True),
    "sft": LossType(False, "no", True),
    "sigmoid_norm": LossType(True, "no", True),
}

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

# The loss types whose definition here is AlphaPO's own starting point (SimPO's recipe):
# γ defaults to 1.375 for them alone, 0 for the rest (TRL's DPO has no margin).
ALPHAPO_FAMILY = ("sigmoid", "hinge", "ipo")


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


def on_tangent(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Where the α reward of ``x`` has left its curve (bool, like ``x``)."""
    return (-alpha * x > EXP_CAP) if alpha != 0.0 else torch.zeros_like(x, dtype=torch.bool)


def saturated(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Where the α reward of ``x`` is flat: within e^-EXP_CAP of its limit 1/α, with a slope
    of at most e^-EXP_CAP (bool, like ``x``)."""
    return (-alpha * x < -EXP_CAP) if alpha != 0.0 else torch.zeros_like(x, dtype=torch.bool)


def f_divergence_score(r: torch.Tensor, kind: str, coef: float) -> torch.Tensor:
    """TRL's f-divergence score φ of a log-ratio ``r`` (``reverse_kl``: r itself)."""
    if kind == "reverse_kl":
        return r
    if kind == "forward_kl":  # f'(t) = 1 - 1/t at t = e^r
        return -torch.expm1(-r)
    if kind == "js_divergence":  # log(2t / (t + 1))
        return math.log(2.0) + F.logsigmoid(r)
    if abs(coef - 1.0) < 1e-6:  # alpha_divergence at a = 1 is reverse KL
        return r
    # (t^(a-1) - 1) / (a - 1) = f_{1-a}(r), in TRL's form: its exponent clamped at 80 (11 in
    # float16), the curve up to there and constant past it. Not alpha_reward's tangent past
    # EXP_CAP = 30: an exponent in (30, 80] is a log-ratio of only -60 at a = 0.5.
    exponent = (coef - 1.0) * r
    cap = ALPHA_DIVERGENCE_CAP_FP16 if r.dtype == torch.float16 else ALPHA_DIVERGENCE_CAP
    wide = exponent.to(torch.promote_types(exponent.dtype, torch.float32))
    return torch.expm1(wide.clamp(max=cap)).to(r.dtype) / (coef - 1.0)


class PairInputs(NamedTuple):
    """Per pair (B,): the α rewards ``r_w, r_l``, the sequences' lengths ``n_w, n_l`` (for
    the length-normalised losses), and for ``aot`` the α-shaped policy and reference
    log-probs on their own (``p_w, p_l, q_w, q_l``; None without a reference)."""

    r_w: torch.Tensor
    r_l: torch.Tensor
    n_w: torch.Tensor
    n_l: torch.Tensor
    p_w: torch.Tensor
    p_l: torch.Tensor
    q_w: torch.Tensor | None
    q_l: torch.Tensor | None


def _smoothed_sigmoid(z, eps):
    return (1.0 - eps) * F.softplus(-z) + eps * F.softplus(z) if eps else F.softplus(-z)


def pair_loss(kind: str, x: PairInputs, cfg) -> torch.Tensor:
    """The per-pair losses (B,) of one loss type (not ``sft``): see the module table."""
    beta, gamma, eps = cfg.beta, cfg.gamma, cfg.label_smoothing
    if LOSS_TYPES[kind].fdiv:
        s_w = f_divergence_score(x.r_w, cfg.f_divergence_type, cfg.f_alpha_divergence_coef)
        s_l = f_divergence_score(x.r_l, cfg.f_divergence_type, cfg.f_alpha_divergence_coef)
    if kind in ("ipo", "sigmoid_norm"):
        L_w, L_l = (x.n_w, x.n_l) if not cfg.average_log_prob else (1.0, 1.0)
        delta = s_w / L_w - s_l / L_l
        if kind == "ipo":
            return (delta - gamma / beta - 1.0 / (2.0 * beta)) ** 2
        return F.softplus(-(beta * delta - gamma))
    if kind in ("aot", "aot_unpaired"):
        if kind == "aot":
            if x.q_w is None:
                raise ValueError('loss_type "aot" needs reference log-probs (it sorts the reference margins)')
            d = torch.sort(x.p_w - x.p_l, dim=0).values - torch.sort(x.q_w - x.q_l, dim=0).values
        else:
            d = torch.sort(x.r_w, dim=0).values - torch.sort(x.r_l, dim=0).values
        return _smoothed_sigmoid(beta * d - gamma, eps)
    if kind == "nca_pair":
        return F.softplus(-beta * x.r_w) + 0.5 * F.softplus(beta * x.r_w) + 0.5 * F.softplus(beta * x.r_l)
    if kind == "bco_pair":
        return F.softplus(-beta * x.r_w) + F.softplus(beta * x.r_l)
    if kind == "sppo_hard":
        return (x.r_w - 0.5 / beta) ** 2 + (x.r_l + 0.5 / beta) ** 2
    if kind == "apo_zero":
        return 1.0 - torch.sigmoid(beta * x.r_w) + torch.sigmoid(beta * x.r_l)
    if kind == "apo_down":
        return torch.sigmoid(beta * x.r_w) + 1.0 - torch.sigmoid(beta * (x.r_w - x.r_l))
    z = beta * (s_w - s_l) - gamma
    if kind == "sigmoid":
        # -logsigmoid(u) = softplus(-u); softplus is the cheaper kernel on CPU.
        return _smoothed_sigmoid(z, eps)
    if kind == "hinge":
        return torch.relu(1.0 - z)
    if kind == "exo_pair":
        return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
            F.logsigmoid(-z) - math.log(eps)
        )
    if kind == "robust":
        return ((1.0 - eps) * F.softplus(-z) - eps * F.softplus(z)) / (1.0 - 2.0 * eps)
    if kind == "discopop":
        m = torch.sigmoid(z / cfg.discopop_tau)
        # TRL's exp(-z) overflows for z < -709 (float64), and inf·m is NaN where m underflows
        # to 0: the clamp changes nothing below that.
        return F.softplus(-z) * (1.0 - m) + torch.exp((-z).clamp(max=700.0)) * m
    raise ValueError(f"unknown loss_type {kind!r}")  # pragma: no cover - checked by the config
