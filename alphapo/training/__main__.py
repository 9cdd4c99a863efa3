"""``python -m alphapo.training`` (and ``torchrun ... -m alphapo.training``): the ``alphapo-train`` command."""

import sys

from .cli import main

sys.exit(main())
