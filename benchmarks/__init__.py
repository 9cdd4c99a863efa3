"""The benchmark suite: alphapo against the materialised reference, Liger and Cut Cross-Entropy.

Every provider (:mod:`benchmarks.providers`) computes the same AlphaPO loss and its
gradients w.r.t. hidden and weight on the same seeded batches (:mod:`benchmarks.cases`:
real lm-head shapes, full and ragged masks, flat and trained-looking softmaxes); the
harness (:mod:`benchmarks.harness`) times them, takes their peak memory and their error
against an exact reference, next to the no-logits floor; :mod:`benchmarks.report` writes
the raw JSON, a markdown table and a plot.

Entry points: ``python -m benchmarks`` (see ``--help``; ``--quick`` on CPU) and
``pytest benchmarks/ --benchmark-only`` (pytest-benchmark). On a GPU machine,
``bash benchmarks/gpu_suite.sh`` runs the GPU tests and the GPU preset in one go.
"""

from .cases import Case, make_batch, preset_cases
from .harness import RECORD_FIELDS, run
from .providers import PROVIDERS

__all__ = ["Case", "PROVIDERS", "RECORD_FIELDS", "make_batch", "preset_cases", "run"]
