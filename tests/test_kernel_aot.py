"""Every shipped kernel configuration compiles for Hopper (sm_90) and Ampere (sm_80) on the CPU.

``triton.compile`` of each kernel's ``ASTSource`` catches what the interpreter forgives:
shapes ``tl.dot`` rejects, shared memory beyond the target's limit, register spills
(``ptxas -v``), and ``tl.dot`` that fails to become tensor-core instructions (``wgmma`` on
sm_90, ``mma`` on sm_80) for 16-bit inputs. It runs in a subprocess because the
interpreter, which the kernel tests in this process use, replaces ``@triton.jit`` functions
at import time.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = """
import json, sys, torch
from alphapo.kernels.aot import compile_all
cap = int(sys.argv[1])
print(json.dumps(compile_all(cap)))
"""


@pytest.mark.parametrize("capability", [90, 80], ids=["sm90", "sm80"])
def test_kernels_compile_for(capability):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(capability)], capture_output=True, text=True, env=env, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    reports = json.loads(run.stdout.strip().splitlines()[-1])
    kernels = {(r["kernel"], r["dtype"]) for r in reports}
    expected = {(k, d) for k in ("fwd", "dz", "grad_h", "dz_tile") for d in ("bf16", "fp16", "fp32")}
    if capability >= 90:  # the TMA persistent forward, 16-bit inputs
        expected |= {("fwd_tma", "bf16"), ("fwd_tma", "fp16")}
    assert kernels == expected
    for r in reports:
        what = f"{r['kernel']} {r['dtype']} sm_{capability} {r['constexprs']} {r['config']}"
        assert r["spill_bytes"] == 0, f"{what}: {r['spill_bytes']} bytes of register spills"
        if r["kernel"] == "dz_tile":  # elementwise: no GEMM, shared memory only for the bias column sums
            assert r["shared"] <= r["shared_limit"], what
            continue
        assert 0 < r["shared"] <= r["shared_limit"], f"{what}: {r['shared']} B of shared memory"
        if r["dtype"] != "fp32":  # exact float32 products run on the FMA units by design
            assert r["mma"], f"{what}: no tensor-core instruction in the PTX"
            if capability >= 90:
                assert r["wgmma"], f"{what}: no wgmma on Hopper"
        if r["kernel"] == "fwd_tma":
            assert r["tma"], f"{what}: no TMA bulk tensor copy in the PTX"
