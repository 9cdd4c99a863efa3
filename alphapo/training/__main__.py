"""``python -m alphapo.training`` (and ``torchrun ... -m alphapo.training``): the ``alphapo-train`` command."""

import sys

from .train import main

sys.exit(main())
