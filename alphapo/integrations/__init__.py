"""Integrations of the fused AlphaPO loss with other trainers (imported on demand).

* :mod:`alphapo.integrations.trl`: :class:`~alphapo.integrations.trl.AlphaPODPOTrainer`
  and :class:`~alphapo.integrations.trl.AlphaPOCPOTrainer`, TRL's DPO and CPO/AlphaPO
  trainers with the loss computed from hidden states (needs ``trl``).
"""
