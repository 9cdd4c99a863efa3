"""Triton kernels of the fused AlphaPO loss (imported lazily: triton is optional).

``fused``: the lm-head → log-softmax statistics forward and the recomputing backward;
``config``: their fixed launch configurations per GPU family.
"""
