"""TRL's CPO/AlphaPO trainer (``trl.experimental.cpo.CPOTrainer``) with the fused loss.

TRL's ``CPOTrainer`` runs the whole model, keeps the ``(2B, T, V)`` logits, and reduces
them to sequence log-probs and the loss. The subclass keeps everything else of TRL (data
processing, collator, ``CPOConfig``, logging, evaluation, saving) and replaces that one
forward: the model runs to its final hidden states and :class:`alphapo.AlphaPOLoss`
takes them with the ``lm_head`` weight, inside the model's forward
(:mod:`alphapo.integrations._common`).

The ``CPOConfig`` knobs map onto the loss exactly (tested for equal loss and gradients):

============================  ======================================================
TRL                           :class:`alphapo.AlphaPOLoss`
============================  ======================================================
``alpha``                     ``alpha`` (same sign convention)
``beta``                      ``beta``
``loss_type="simpo"``         ``"sigmoid"``, ``gamma=simpo_gamma``, averaged log-probs
(``"alphapo"`` is ``"simpo"`` with ``cpo_alpha=0``)
``loss_type="sigmoid"``       ``"sigmoid"``, ``gamma=0``, summed log-probs
``loss_type="hinge"``         ``"hinge"``, ``gamma=0``, summed log-probs
``loss_type="ipo"``           ``"ipo"``, ``gamma=0``, averaged log-probs
``cpo_alpha``                 ``nll_weight``
``label_smoothing``           ``label_smoothing``
============================  ======================================================

Logged metrics carry TRL's names and values, with two differences: ``logits/chosen`` and
``logits/rejected`` average the logits over completion tokens only (TRL also averages
prompt and padding positions, which it has in memory), and ``nll_loss`` is the chosen
tokens' NLL even when ``cpo_alpha = 0`` (TRL logs 0 then). Where TRL's
``exp(s) ** -alpha`` overflows (summed log-probs, ``alpha * |s| > 88`` in float32) TRL
returns inf/NaN and the fused loss stays finite (see :mod:`alphapo.epilogue`).

Gradient accumulation: the ``cpo_alpha`` NLL term is averaged over the chosen tokens of
the whole optimizer step (all micro-batches and ranks), as one big batch would
(``alphapo_exact_accumulation=True``, the default); TRL averages it per micro-batch and
then over micro-batches and ranks. With one micro-batch per step on one process the two
agree. Not supported: encoder-decoder models and MoE router auxiliary losses (both raise).
"""

from __future__ import annotations

from typing import Literal

import torch

from ..loss import AlphaPOLoss
from ._common import ExactNLLAccumulation, causal_lm, patch_forward

try:
    from trl.experimental.cpo import CPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without trl
    raise ImportError("alphapo.integrations.trl needs TRL with trl.experimental.cpo: pip install trl") from e


def loss_from_cpo_args(args, backend: str = "auto", scratch_bytes: int | None = None) -> AlphaPOLoss:
    """The :class:`AlphaPOLoss` that computes what ``CPOTrainer`` computes for ``args``."""
    loss_type = args.loss_type
    if loss_type == "alphapo":  # CPOConfig rewrites it in __post_init__; accept raw objects too
        loss_type = "simpo"
    if loss_type not in ("simpo", "sigmoid", "hinge", "ipo"):
        raise ValueError(f"CPO loss_type {loss_type!r} has no fused equivalent")
    return AlphaPOLoss(
        alpha=args.alpha,
        beta=args.beta,
        gamma=args.simpo_gamma if loss_type == "simpo" else 0.0,
        label_smoothing=args.label_smoothing if loss_type in ("simpo", "sigmoid") else 0.0,
        loss_type="sigmoid" if loss_type == "simpo" else loss_type,
        average_log_prob=loss_type in ("simpo", "ipo"),
        nll_weight=args.cpo_alpha,
        backend=backend,
        scratch_bytes=scratch_bytes,
    )


class AlphaPOCPOTrainer(ExactNLLAccumulation, CPOTrainer):
    """``trl.experimental.cpo.CPOTrainer`` with the AlphaPO loss computed from hidden states.

    Takes every ``CPOTrainer`` argument, plus ``alphapo_backend`` ("auto": Triton on CUDA,
    torch on CPU), ``alphapo_scratch_bytes`` (extra-memory budget of the fused loss) and
    ``alphapo_exact_accumulation`` (True: the NLL term averages over the optimizer step's
    chosen tokens; False: over each micro-batch's, as TRL).
    """

    def __init__(self, *args, alphapo_backend: str = "auto", alphapo_scratch_bytes: int | None = None,
                 alphapo_exact_accumulation: bool = True, **kwargs):
        self.alphapo_exact_accumulation = bool(alphapo_exact_accumulation)
        super().__init__(*args, **kwargs)
        if self.is_encoder_decoder:
            raise NotImplementedError("AlphaPOCPOTrainer supports decoder-only models")
        if self.aux_loss_enabled:
            raise NotImplementedError(
                "the model's config sets output_router_logits (MoE auxiliary loss), which the fused forward "
                "does not compute; set it to False or use CPOTrainer"
            )
        self.alphapo_loss = loss_from_cpo_args(self.args, alphapo_backend, alphapo_scratch_bytes)
        patch_forward(causal_lm(self.model), self.alphapo_loss)

    def _alphapo_has_nll(self) -> bool:
        return self.alphapo_loss.config.nll_total != 0

    def _alphapo_chosen_tokens(self, batch) -> torch.Tensor:
        return (batch["chosen_labels"][:, 1:] != -100).sum()  # CPO labels prompt and padding -100

    def get_batch_loss_metrics(
        self,
        model,
        batch: dict[str, list | torch.LongTensor],
        train_eval: Literal["train", "eval"] = "train",
    ):
        """TRL's loss and metrics for one batch, through the fused forward."""
        concatenated = self.concatenated_inputs(
            batch, is_encoder_decoder=False, padding_value=self.pad_token_id, device=self.accelerator.device
        )
        loss, aux = model(
            input_ids=concatenated["concatenated_input_ids"],
            attention_mask=concatenated["concatenated_attention_mask"],
            alphapo_labels=concatenated["concatenated_labels"],
            alphapo_nll_tokens=self._alphapo_nll_tokens() if train_eval == "train" else None,
        )
        gather = self.accelerator.gather_for_metrics
        prefix = "eval_" if train_eval == "eval" else ""
        metrics = {
            f"{prefix}rewards/chosen": gather(aux.chosen_rewards).mean().item(),
            f"{prefix}rewards/rejected": gather(aux.rejected_rewards).mean().item(),
            f"{prefix}rewards/accuracies": gather(aux.reward_accuracy).mean().item(),
            f"{prefix}rewards/margins": gather(aux.reward_margin).mean().item(),
            f"{prefix}logps/rejected": gather(aux.rejected_logps).mean().item(),
            f"{prefix}logps/chosen": gather(aux.chosen_logps).mean().item(),
            f"{prefix}logits/rejected": gather(aux.rejected_logits_mean).mean().item(),
            f"{prefix}logits/chosen": gather(aux.chosen_logits_mean).mean().item(),
            f"{prefix}nll_loss": gather(aux.nll_loss).mean().item(),
        }
        return loss, metrics
