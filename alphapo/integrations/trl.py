"""TRL's trainers with the fused loss: no logits, the same knobs, metrics and results.

* :class:`AlphaPOCPOTrainer` — ``trl.experimental.cpo.CPOTrainer`` (CPO, SimPO, AlphaPO
  with ``alpha``), TRL's reference implementation of AlphaPO.

::

    from trl.experimental.cpo import CPOConfig
    from alphapo.integrations.trl import AlphaPOCPOTrainer

    args = CPOConfig(output_dir="out", loss_type="alphapo", alpha=0.25, simpo_gamma=1.375, beta=2.5, ...)
    trainer = AlphaPOCPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)

It computes the loss inside the model's forward (:mod:`alphapo.integrations._common`),
so DDP and FSDP wrappers see the ``lm_head`` weight gathered, and accumulates its NLL
term exactly over gradient-accumulation micro-batches and ranks by default. How it maps
TRL's config, and where the results differ from TRL's: :mod:`alphapo.integrations._cpo`.
"""

from ._common import causal_lm, patch_forward, unpatch_forward
from ._cpo import AlphaPOCPOTrainer, loss_from_cpo_args

__all__ = ["AlphaPOCPOTrainer", "causal_lm", "loss_from_cpo_args", "patch_forward", "unpatch_forward"]
