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
from .loop import Interrupted, NonFiniteLossError, train


def main(argv=None) -> int:
    cfg = None
    try:
        cfg = parse_config(argv)
        train(cfg)
    except (ConfigError, CheckpointError, D.DataError, NonFiniteLossError, P.ParallelError) as e:
        print(f"alphapo-train: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a path that cannot be written, a full disk: its message names the file
        print(f"alphapo-train: error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:  # while training: it says where the run stands
        print(f"alphapo-train: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # while reading the config or loading: nothing was trained
        then = f"; continue with --resume {cfg.resume}" if cfg is not None and cfg.resume else ""
        print(f"alphapo-train: interrupted before training began{then}", file=sys.stderr)
        return 130
    return 0
