"""Run the Triton kernels where this machine can: on CUDA, else in Triton's CPU interpreter.

Every kernel test module imports its fixtures first:
``from triton_interp import device, triton_interpreter  # noqa: F401``.

Without CUDA, ``tests/conftest.py`` has already imported Triton and the kernels with
``TRITON_INTERPRET=1`` (the interpreter is chosen when ``@triton.jit`` runs); the autouse
fixture here sets the variable again for each kernel test, since ``resolve_backend`` reads
it at call time. It is not left set for the rest of the suite: other tests check that
``backend="triton"`` refuses CPU tensors without it. The interpreter's ``tl.dot`` on
bfloat16 returns garbage in Triton 3.9 (DESIGN.md §4): CPU runs test float32 and float16.
"""

import pytest
import torch

ON_GPU = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def device():
    return "cuda" if ON_GPU else "cpu"
