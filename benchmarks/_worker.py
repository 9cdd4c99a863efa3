"""``python -m benchmarks._worker SPEC``: measure one provider over prepared cases.

The CPU runs start one such process per provider, so that each provider's peak RSS is
its own (see :func:`benchmarks.harness.cpu_peak_bytes`); results go back to the parent
on stdout as ``@@result {json}`` lines.
"""

import sys

from .harness import worker_main

if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
