"""TRL's CPO/AlphaPO trainer with the fused loss: no logits are ever built.

TRL's ``CPOTrainer`` (``trl.experimental.cpo``) runs the whole model, keeps the
``(2B, T, V)`` logits, and reduces them to sequence log-probs and the loss. The subclass
here keeps everything else of TRL (data processing, collator, ``CPOConfig``, logging,
evaluation, saving) and replaces that one forward: the model runs to its final hidden
states and :class:`alphapo.AlphaPOLoss` takes them with the ``lm_head`` weight::

    from trl.experimental.cpo import CPOConfig
    from alphapo.integrations.trl import AlphaPOCPOTrainer

    args = CPOConfig(output_dir="out", loss_type="alphapo", alpha=0.25, simpo_gamma=1.375, beta=2.5, ...)
    trainer = AlphaPOCPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
    trainer.train()

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

The loss is computed *inside the model's forward*: the trainer patches the forward of its
causal LM so that a call with ``alphapo_labels=`` returns ``(loss, aux)``. A DDP or FSDP
wrapper that accelerate puts around the model therefore runs the loss while the
``lm_head`` weight is gathered, as the Liger and Cut Cross-Entropy integrations do.
Not supported: encoder-decoder models and MoE router auxiliary losses (both raise).
"""

from __future__ import annotations

import types
from typing import Literal

import torch

from ..loss import AlphaPOLoss
from ..training.modeling import decoder_and_head, fused_forward

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


def patch_forward(lm: torch.nn.Module, loss_fn: AlphaPOLoss) -> torch.nn.Module:
    """Make ``lm(input_ids=..., attention_mask=..., alphapo_labels=labels)`` return ``(loss, aux)``.

    Calls without ``alphapo_labels`` run the model's own forward, unchanged. The patch is
    on this instance only; :func:`unpatch_forward` removes it.
    """
    decoder_and_head(lm)  # refuse models the fused path cannot reproduce, now
    if getattr(lm, "_alphapo_original_forward", None) is None:
        lm._alphapo_original_forward = lm.forward
    original = lm._alphapo_original_forward

    def forward(self, *args, alphapo_labels=None, **kwargs):
        if alphapo_labels is None:
            return original(*args, **kwargs)
        input_ids = kwargs.pop("input_ids", args[0] if args else None)
        attention_mask = kwargs.pop("attention_mask", args[1] if len(args) > 1 else None)
        return fused_forward(self, loss_fn, input_ids, attention_mask, alphapo_labels)

    lm.forward = types.MethodType(forward, lm)
    return lm


def unpatch_forward(lm: torch.nn.Module) -> torch.nn.Module:
    original = getattr(lm, "_alphapo_original_forward", None)
    if original is not None:
        del lm.forward  # the instance attribute; the class's forward shows through again
        lm._alphapo_original_forward = None
    return lm


def _causal_lm(model):
    """The causal LM inside a PEFT wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class AlphaPOCPOTrainer(CPOTrainer):
    """``trl.experimental.cpo.CPOTrainer`` with the AlphaPO loss computed from hidden states.

    Takes every ``CPOTrainer`` argument, plus ``alphapo_backend`` ("auto": Triton on CUDA,
    torch on CPU) and ``alphapo_scratch_bytes`` (extra-memory budget of the fused loss).
    """

    def __init__(self, *args, alphapo_backend: str = "auto", alphapo_scratch_bytes: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.is_encoder_decoder:
            raise NotImplementedError("AlphaPOCPOTrainer supports decoder-only models")
        if self.aux_loss_enabled:
            raise NotImplementedError(
                "the model's config sets output_router_logits (MoE auxiliary loss), which the fused forward "
                "does not compute; set it to False or use CPOTrainer"
            )
        self.alphapo_loss = loss_from_cpo_args(self.args, alphapo_backend, alphapo_scratch_bytes)
        patch_forward(_causal_lm(self.model), self.alphapo_loss)

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
