"""pytest options of the benchmark suite (``pytest benchmarks/ --benchmark-only``).

    --bench-preset quick|gpu|full|smoke   the cases (default: gpu on CUDA, quick on CPU)
    --bench-providers a,b,...             the providers (default: all)
    --bench-shapes llama3-8b,...          keep only these heads
    --bench-sweep                         also the token-sweep points

The default ``pytest`` run never collects this folder (``testpaths = ["tests"]``).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.cases import preset_cases, select
from benchmarks.providers import default_providers


def pytest_addoption(parser):
    group = parser.getgroup("alphapo benchmarks")
    group.addoption("--bench-preset", default=None, help="quick, gpu, full or smoke")
    group.addoption("--bench-providers", default=None, help="comma list of providers")
    group.addoption("--bench-shapes", default=None, help="comma list of heads")
    group.addoption("--bench-sweep", action="store_true", help="include the token-sweep points")


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_generate_tests(metafunc):
    config = metafunc.config
    device = bench_device()
    if "bench_case" in metafunc.fixturenames:
        preset = config.getoption("--bench-preset") or ("gpu" if device.type == "cuda" else "quick")
        shapes = config.getoption("--bench-shapes")
        groups = None if config.getoption("--bench-sweep") else ["main"]
        cases = select(preset_cases(preset), shapes.split(",") if shapes else None, groups=groups)
        metafunc.parametrize("bench_case", cases, ids=[c.id for c in cases], scope="module")
    if "provider" in metafunc.fixturenames:
        names = config.getoption("--bench-providers")
        names = names.split(",") if names else default_providers(device)
        metafunc.parametrize("provider", names)


@pytest.fixture(scope="session")
def bench_dtype():
    return torch.bfloat16 if bench_device().type == "cuda" else torch.float32
