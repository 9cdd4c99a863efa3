"""alphapo: the AlphaPO preference loss computed straight from hidden states and the lm-head.

>>> loss_fn = AlphaPOLoss(alpha=0.25, beta=2.5, gamma=1.375)
>>> loss, aux = loss_fn(model.lm_head.weight, hidden, target)   # hidden (2B, T, H), chosen first
"""

from .epilogue import AlphaPOConfig, AlphaPOOutput, alpha_reward
from .loss import BACKENDS, AlphaPOLoss, alphapo_loss, resolve_backend, sequence_logprobs
from .reference import alphapo_loss_reference, sequence_logprobs_reference

__all__ = [
    "AlphaPOConfig",
    "AlphaPOLoss",
    "AlphaPOOutput",
    "BACKENDS",
    "alpha_reward",
    "alphapo_loss",
    "alphapo_loss_reference",
    "resolve_backend",
    "sequence_logprobs",
    "sequence_logprobs_reference",
]
__version__ = "0.1.0"
