"""The slim trainer: ``alphapo-train`` (``python -m alphapo.training``), built on the loss library.

Nothing in the loss library (``alphapo/*.py``, ``alphapo/kernels/``) imports this package;
it uses the library as any user would, through :class:`alphapo.AlphaPOLoss`. Its files, in
the order a step needs them:

* ``config.py``: :class:`TrainConfig` (every knob, its default, its check), the command line
  and config files;
* ``build.py``: device and precision, data, model and loss, optimizer and schedule;
* ``data.py``, ``tokenizer.py``, ``modeling.py``: preference data, the built-in tokenizer,
  the loss-inside-forward model wrapper;
* ``loop.py``: :func:`train`, the training loop and the held-out evaluation;
* ``parallel.py``: torchrun, DDP and FSDP2;
* ``checkpoint.py``: run directories, atomic checkpoints, resume;
* ``report.py``: the metrics file, the progress output, the plot and the summary;
* ``cli.py``: :func:`main`, the ``alphapo-train`` command.
"""

from .cli import main
from .config import TrainConfig
from .loop import train

__all__ = ["TrainConfig", "main", "train"]
