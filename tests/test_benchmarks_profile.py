"""The developer's kernel profiler (``python -m benchmarks.profile``): it runs end to end.

On a GPU it times the real heads and is run by hand; here it runs its tiny CPU shape in
Triton's interpreter, as a smoke test of every measurement it records.
"""

from triton_interp import device, triton_interpreter  # noqa: F401  (first: see its docstring)

import json

import pytest
import torch

pytest.importorskip("triton")

from benchmarks import profile  # noqa: E402


def test_profile_tool_runs(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("on a GPU it times real shapes: run it by hand")
    out = tmp_path / "profile.json"
    profile.main(["--out", str(out)])
    data = json.loads(out.read_text())
    rec = data["records"][0]
    assert rec["gemm_ms"] > 0 and rec["fwd_store_ms"] > 0 and rec["dz_tile_ms"] > 0
    assert rec["fwd_bwd_ms/pair-chunked"] > 0 and rec["fwd_bwd_ms/recompute"] > 0
    assert all("ms" in v for v in rec["fwd"].values()), rec["fwd"]
