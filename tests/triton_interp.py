"""Run the Triton kernels where this machine can: on CUDA, else in Triton's CPU interpreter.

Import it first in every kernel test module, and pull in its fixtures:
``from triton_interp import ON_GPU, device, triton_interpreter  # noqa: F401``.

``TRITON_INTERPRET=1`` must be set when ``@triton.jit`` runs (it swaps in the interpreter
at decoration time), so without CUDA the kernels module is imported here with it set, and
every kernel test runs with it set (``resolve_backend`` reads it at call time). It is not
left set for the rest of the suite: other tests check that ``backend="triton"`` refuses CPU
tensors without it. The interpreter's ``tl.dot`` on bfloat16 returns garbage in Triton 3.9
(DESIGN.md §4): CPU runs test float32 and float16 only.
"""

import importlib
import os
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()

if not ON_GPU:
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        if "alphapo.kernels.fused" in sys.modules:  # imported earlier as GPU kernels: redo
            importlib.reload(sys.modules["alphapo.kernels.fused"])
        else:
            import alphapo.kernels.fused  # noqa: F401  (decorated as interpreted functions)
    finally:
        if _saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _saved


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def device():
    return "cuda" if ON_GPU else "cpu"
