"""``alphapo-train``: the command line's entry point (``python -m alphapo.training`` runs it too).

Errors a user can fix (a knob, a file, a launch, a full disk) end in one line naming what
to change, with exit status 1; no traceback.
"""

from __future__ import annotations

import sys

from . import data as D
from . import parallel as P
from .checkpoint import CheckpointError
from .config import ConfigError, parse_config
from .loop import NonFiniteLossError, train


def main(argv=None) -> int:
    try:
        cfg = parse_config(argv)
        train(cfg)
    except (ConfigError, CheckpointError, D.DataError, NonFiniteLossError, P.ParallelError) as e:
        print(f"alphapo-train: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a path that cannot be written, a full disk: its message names the file
        print(f"alphapo-train: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("alphapo-train: interrupted; continue with --resume <run dir>", file=sys.stderr)
        return 130
    return 0
