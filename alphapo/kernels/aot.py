"""Ahead-of-time compilation of every kernel for a GPU that this machine need not have.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` lowers a kernel to
PTX and a cubin on the CPU. It catches what the interpreter forgives (dot shapes,
shared-memory overflow, unsupported casts), and the compiled artefacts tell whether the
shipped configuration spills registers (``ptxas -v``), how much shared memory it takes,
and whether ``tl.dot`` became tensor-core instructions (``wgmma`` on sm_90, ``mma`` on
sm_80). Run it as ``python -m alphapo.kernels.aot [90 80]``; the tests call
:func:`compile_all`. Must run with ``TRITON_INTERPRET`` unset (the interpreter replaces
``@triton.jit`` functions at import time).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import torch

# Shared memory per block that each compute capability allows (bytes, opt-in maximum).
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
TORCH_TO_TRITON = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _signatures(dtype: torch.dtype, family: str):
    """(kernel, signature, constexprs, config) for each kernel variant that ships."""
    from . import fused
    from .config import CONFIGS, dtype_class

    # Hints as Triton's launcher derives them for the usual call (``triton.tools.compile``'s
    # syntax): ":16" a pointer or int divisible by 16, ":1" an int equal to 1 (specialised
    # to a constant). Contiguous hidden and weight rows with H % 16 == 0, as in every model
    # of DESIGN.md §3; without them the loads compile unvectorised and the report misleads.
    t = TORCH_TO_TRITON[dtype]
    precision = "ieee" if dtype == torch.float32 else "tf32"
    cfgs = CONFIGS[(family, dtype_class(dtype))]
    p = f"*{t}:16"
    stats = {"h_ptr": p, "w_ptr": p, "b_ptr": p, "idx_ptr": "*i64:16", "y_ptr": "*i64:16"}
    strides = {"stride_hn": "i32:16", "stride_hh": "i32:1", "stride_wv": "i32:16", "stride_wh": "i32:1"}
    for has_bias in (False, True):
        for store_z in (False, True):  # the recompute path's forward, and the pair-chunked one
            c = cfgs["fwd_store" if store_z else "fwd"]
            yield "fwd", fused._lse_fwd_kernel, {
                **stats, "part_ptr": "*fp32:16", "z_ptr": p,
                "N": "i32", "V": "i32", "H": "i32:16", "V_PER_SPLIT": "i32:16", **strides, "stride_zn": "i32:16",
                "stride_part": "i32:16",
            }, dict(HAS_BIAS=has_bias, STORE_Z=store_z, BLOCK_N=c.block_m, BLOCK_V=c.block_n, BLOCK_H=c.block_k,
                    DOT_PRECISION=precision), c
        c = cfgs["dz_tile"]
        yield "dz_tile", fused._dz_tile_kernel, {
            "z_ptr": p, "y_ptr": "*i64:16", "lse_ptr": "*fp32:16", "coef_ptr": "*fp32:16", "db_ptr": "*fp32:16",
            "N": "i32", "V": "i32", "ROWS_PER_PROGRAM": "i32:16", "stride_zn": "i32:16", "stride_dbn": "i32:16",
        }, dict(NEED_DB=has_bias, BLOCK_N=c.block_m, BLOCK_V=c.block_n), c
        c = cfgs["dz"]
        yield "dz", fused._dz_kernel, {
            **stats, "lse_ptr": "*fp32:16", "coef_ptr": "*fp32:16", "dz_ptr": p, "db_ptr": "*fp32:16",
            "tile_max_ptr": "*fp32:16",
            "N": "i32", "V": "i32", "H": "i32:16", "v_lo": "i32:16", "V_S": "i32", **strides,
            "stride_dzn": "i32:16", "stride_dbn": "i32:16", "stride_tmn": "i32",
        }, dict(HAS_BIAS=has_bias, NEED_DB=has_bias, FILTER=has_bias, BLOCK_N=c.block_m, BLOCK_V=c.block_n,
                BLOCK_H=c.block_k, DOT_PRECISION=precision), c
    if family == "sm90" and dtype != torch.float32:  # TMA forward: Hopper+, 16-bit inputs
        c = cfgs["fwd_tma"]
        yield "fwd_tma", fused._lse_fwd_tma_kernel, {
            "h_desc": f"tensordesc<{t}[{c.block_m},{c.block_k}]>",
            "w_desc": f"tensordesc<{t}[{c.block_n},{c.block_k}]>",
            "b_ptr": p, "y_ptr": "*i64:16", "part_ptr": "*fp32:16",
            "N": "i32", "V": "i32", "H": "i32:16", "V_PER_SPLIT": "i32:16", "ROW_BLOCKS": "i32", "ITEMS": "i32",
            "stride_part": "i32:16",
        }, dict(HAS_BIAS=True, BLOCK_N=c.block_m, BLOCK_V=c.block_n, BLOCK_H=c.block_k, NUM_PROGRAMS=132,
                DOT_PRECISION=precision), c
    c = cfgs["grad_h"]
    # (first, not last) stores the float32 accumulator, (not first, last) loads it and
    # writes grad_hidden: between them every code path of the kernel; the second one with
    # gradient filtering on (as the dz kernel with a bias), the first with it off.
    for first, last in ((True, False), (False, True)):
        yield "grad_h", fused._grad_h_kernel, {
            "dz_ptr": p, "w_ptr": p, "acc_ptr": "*fp32:16", "out_ptr": p, "idx_ptr": "*i64:16",
            "tile_max_ptr": "*fp32:16",
            "N": "i32", "H": "i32:16", "v_lo": "i32:16", "V_S": "i32", "filter_eps": "fp32",
            "stride_dzn": "i32:16", "stride_wv": "i32:16", "stride_wh": "i32:1", "stride_accn": "i32:16",
            "stride_outn": "i32:16", "stride_tmn": "i32",
        }, dict(FIRST=first, LAST=last, FILTER=last, DZ_BLOCK_V=cfgs["dz"].block_n, BLOCK_N=c.block_m, BLOCK_H=c.block_n, BLOCK_K=c.block_k,
                DOT_PRECISION=precision), c


def _split_hints(fn, hinted: dict, constexprs: dict):
    """``{"arg": "type:hint"}`` -> (signature, divisibility attrs, constexprs incl. ints == 1)."""
    signature, attrs, constexprs = {}, {}, dict(constexprs)
    for name, spec in hinted.items():
        kind, _, hint = spec.partition(":")
        if hint == "1":
            constexprs[name] = 1
        else:
            signature[name] = kind
            if hint == "16":
                attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    signature.update({k: "constexpr" for k in constexprs})
    return signature, attrs, constexprs


def _ptxas_report(ptx: str, capability: int) -> dict:
    """Registers and spill bytes from ``ptxas -v`` (the ptxas Triton itself uses)."""
    from triton.backends.nvidia import compiler as nv

    try:
        ptxas = nv.get_ptxas(capability).path
    except TypeError:  # older Triton: get_ptxas() takes no argument
        ptxas = nv.get_ptxas().path
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        run = subprocess.run([ptxas, f"-arch={arch}", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"ptxas failed: {run.stderr[-2000:]}")
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", run.stderr)]
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", run.stderr)]
    return {"spill_bytes": sum(spills), "registers": max(regs) if regs else None}


def compile_all(capability: int = 90, dtypes=(torch.bfloat16, torch.float16, torch.float32)) -> list[dict]:
    """Compile every shipped kernel variant for ``sm_<capability>``; one report per variant."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_all needs TRITON_INTERPRET unset (it replaces @triton.jit functions)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    family = "sm90" if capability >= 90 else "sm80"
    reports = []
    for dtype in dtypes:
        for name, fn, hinted, constexprs, cfg in _signatures(dtype, family):
            signature, attrs, constexprs = _split_hints(fn, hinted, constexprs)
            kernel = triton.compile(
                ASTSource(fn, signature, constexprs, attrs),
                target=GPUTarget("cuda", capability, 32),
                options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
            )
            ptx = kernel.asm["ptx"]
            reports.append({
                "kernel": name,
                "dtype": TORCH_TO_TRITON[dtype],
                "capability": capability,
                "constexprs": constexprs,
                "config": cfg._asdict(),
                "shared": kernel.metadata.shared,
                "shared_limit": SHARED_LIMIT.get(capability, 99 * 1024),
                "wgmma": "wgmma" in ptx,
                "mma": bool(re.search(r"\bmma\.sync", ptx)) or "wgmma" in ptx,
                "tma": "cp.async.bulk.tensor" in ptx,
                **_ptxas_report(ptx, capability),
            })
    return reports


if __name__ == "__main__":
    caps = [int(c) for c in sys.argv[1:]] or [90, 80]
    print(json.dumps([r for c in caps for r in compile_all(c)], indent=1))
