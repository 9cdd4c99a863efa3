"""The slim trainer: ``alphapo-train`` (``python -m alphapo.training``), built on the loss library.

Nothing in the loss library (``alphapo/*.py``, ``alphapo/kernels/``) imports this package;
it imports the library like any user would, through :class:`alphapo.AlphaPOLoss`.
"""
