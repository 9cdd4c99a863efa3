"""TRL's trainers with the fused loss: no logits, the same knobs, metrics and results.

Two subclasses, each a one-line change in a TRL script:

* :class:`AlphaPODPOTrainer` — ``trl.DPOTrainer`` (TRL 1.16: every DPO loss type, MPO
  lists, f-divergences, WPO, LD-DPO, a reference model, a PEFT adapter or precomputed
  reference log-probs), with an optional AlphaPO α on every reward (``alphapo_alpha``);
* :class:`AlphaPOCPOTrainer` — ``trl.experimental.cpo.CPOTrainer`` (CPO, SimPO, AlphaPO
  with ``alpha``), TRL's reference implementation of AlphaPO.

::

    from trl import DPOConfig
    from alphapo.integrations.trl import AlphaPODPOTrainer        # was: from trl import DPOTrainer

    args = DPOConfig(output_dir="out", beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2], ...)
    trainer = AlphaPODPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=ds,
                                processing_class=tokenizer)
    trainer.train()

    from trl.experimental.cpo import CPOConfig
    from alphapo.integrations.trl import AlphaPOCPOTrainer

    args = CPOConfig(output_dir="out", loss_type="alphapo", alpha=0.25, simpo_gamma=1.375, beta=2.5, ...)
    trainer = AlphaPOCPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)

Both compute the loss inside the model's forward (:mod:`alphapo.integrations._common`),
so DDP and FSDP wrappers see the ``lm_head`` weight gathered, and both accumulate an NLL
term exactly over gradient-accumulation micro-batches and ranks by default. How each
maps TRL's config, and where the results differ from TRL's (documented and tested):
:mod:`alphapo.integrations._dpo`, :mod:`alphapo.integrations._cpo`.
"""

from ._common import causal_lm, patch_forward, unpatch_forward
from ._cpo import AlphaPOCPOTrainer, loss_from_cpo_args
from ._dpo import TRL_SMOOTHED, AlphaPODPOTrainer, loss_from_dpo_args

__all__ = [
    "TRL_SMOOTHED",
    "AlphaPOCPOTrainer",
    "AlphaPODPOTrainer",
    "causal_lm",
    "loss_from_cpo_args",
    "loss_from_dpo_args",
    "patch_forward",
    "unpatch_forward",
]
