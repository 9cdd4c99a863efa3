"""Where the time goes: each kernel and GEMM of the Triton backend against cuBLAS, per variant.

A developer's tool for the GPU performance work, built to run in one short call on a lent
GPU (``python -m benchmarks.profile --out $OUT/profile.json``). Per shape it times,
with ``triton.testing.do_bench`` (median of warm runs):

* ``gemm``: one cuBLAS GEMM of (N × H)·(H × V) in the input dtype — the unit of the cost
  model: the forward should cost one, forward + backward four (8·N·H·V);
* ``fwd/<impl>/<config>``: the forward statistics kernel alone (pointer or TMA forward,
  several tile configurations), reported as a ratio to ``gemm``;
* ``dz``, ``grad_w``, ``grad_h``: the three steps of the backward summed over its
  vocabulary slices at the default scratch budget (ratio to ``gemm`` each: 1 is the goal);
* ``fwd_bwd``: the whole loss forward + backward through the public API (ratio to
  4 × ``gemm``).

Tile configurations are tried by swapping entries of :data:`alphapo.kernels.config.CONFIGS`
for the duration of one measurement; the shipped defaults are not changed by running it.
On CPU (``TRITON_INTERPRET=1``) it runs tiny shapes with a wall-clock timer, as a smoke test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import torch

import alphapo
from alphapo.kernels import config as C
from alphapo.kernels import fused

# (name, H, V, N valid tokens): the heads of DESIGN.md §3 at ~40% of 4 × 2048 × 2 valid,
# and all-valid at the Llama-3-8B head.
GPU_SHAPES = [
    ("llama3-8b-ragged", 4096, 128256, 6554),
    ("llama3-8b-full", 4096, 128256, 16384),
    ("qwen2.5-7b-ragged", 3584, 152064, 6554),
    ("gemma2-2b-ragged", 2304, 256000, 6554),
    ("qwen2.5-0.5b-ragged", 896, 151936, 6554),
]
CPU_SHAPES = [("tiny", 32, 100, 20)]

# Tile variants worth a look on Hopper (block_m, block_n, block_k, warps, stages).
FWD_VARIANTS = {
    "pointer": [C.LaunchConfig(128, 128, 64, 8, 3), C.LaunchConfig(128, 128, 64, 8, 4), C.LaunchConfig(128, 256, 64, 8, 3)],
    "tma": [C.LaunchConfig(128, 128, 64, 8, 3), C.LaunchConfig(128, 256, 64, 8, 3), C.LaunchConfig(128, 128, 64, 8, 4)],
}


def _timer(fn) -> float:
    """Milliseconds per call: do_bench's median on CUDA, a warmed-up mean on CPU."""
    if torch.cuda.is_available():
        import triton.testing

        return triton.testing.do_bench(fn, warmup=5, rep=30, return_mode="median")
    fn()
    start = time.perf_counter()
    for _ in range(2):
        fn()
    return (time.perf_counter() - start) / 2 * 1e3


@contextlib.contextmanager
def _override(kernel: str, cfg: C.LaunchConfig, device, dtype):
    key = (C.gpu_family(device), C.dtype_class(dtype))
    saved = C.CONFIGS[key][kernel]
    C.CONFIGS[key][kernel] = cfg
    try:
        yield
    finally:
        C.CONFIGS[key][kernel] = saved


@contextlib.contextmanager
def _env(name, value):
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ[name]
        else:
            os.environ[name] = saved


def profile_shape(name, H, V, N, dtype, device) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(N, H, generator=gen).to(device=device, dtype=dtype)
    w = (torch.randn(V, H, generator=gen) * H**-0.5).to(device=device, dtype=dtype)
    y = torch.randint(0, V, (N,), generator=gen).to(device)
    idx = torch.arange(N, device=device)
    rec = {"shape": name, "H": H, "V": V, "N": N, "dtype": str(dtype).replace("torch.", "")}
    rec["gemm_ms"] = gemm = _timer(lambda: h @ w.t())
    rec["fwd"] = {}
    variants_by_impl = FWD_VARIANTS
    if not h.is_cuda:  # the interpreter: one small tile per forward, enough for a smoke test
        tile = C.CONFIGS[("interpreter", C.dtype_class(dtype))]["fwd"]
        variants_by_impl = {impl: [tile] for impl in FWD_VARIANTS}
    for impl, variants in variants_by_impl.items():
        kernel = "fwd_tma" if impl == "tma" else "fwd"
        for cfg in variants:
            key = f"{impl}/{cfg.block_m}x{cfg.block_n}x{cfg.block_k}/w{cfg.num_warps}/s{cfg.num_stages}"
            try:
                with _env("ALPHAPO_FWD_IMPL", impl), _override(kernel, cfg, h.device, dtype):
                    ms = _timer(lambda: fused.forward_stats(h, w, None, idx, y, None, torch.float32))
                rec["fwd"][key] = {"ms": ms, "x_gemm": ms / gemm}
            except Exception as exc:  # a variant that does not compile here is a result too
                rec["fwd"][key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    lse = fused.forward_stats(h, w, None, idx, y, None, torch.float32)[0]
    coef = torch.full((N,), 1.0 / N, device=device)
    needs_only = {"dz": (False, False, False), "grad_w": (False, True, False), "grad_h": (True, False, False)}
    dz_ms = _timer(lambda: fused.backward_grads(h, w, None, idx, y, lse, coef, fused.DEFAULT_SCRATCH_BYTES, needs_only["dz"]))
    rec["dz_ms"] = dz_ms
    for part in ("grad_w", "grad_h"):
        ms = _timer(lambda: fused.backward_grads(h, w, None, idx, y, lse, coef, fused.DEFAULT_SCRATCH_BYTES, needs_only[part]))
        rec[f"{part}_ms"] = ms - dz_ms  # each run recomputes dz: subtract it
    rec["x_gemm"] = {k: rec[f"{k}_ms"] / gemm for k in ("dz", "grad_w", "grad_h")}

    hidden = h.view(2, N // 2, H) if N % 2 == 0 else h[: N - 1].view(2, (N - 1) // 2, H)
    target = y[: hidden.shape[0] * hidden.shape[1]].view(hidden.shape[:2])
    hidden, w_leaf = hidden.detach().requires_grad_(), w.detach().requires_grad_()

    # The pair-chunked path's own steps: the storing forward and the in-place dz kernel.
    z, stats, _ = fused.chunk_logits(h, w, None, y, torch.float32)
    rec["fwd_store_ms"] = _timer(lambda: fused.chunk_logits(h, w, None, y, torch.float32))
    rec["dz_tile_ms"] = _timer(lambda: fused.logits_to_dz_(z, stats[0], coef, y, False))
    del z

    for path in ("pair-chunked", "recompute"):
        def fwd_bwd(path=path):
            loss, _ = alphapo.alphapo_loss(w_leaf, hidden, target, backend="triton", path=path)
            torch.autograd.grad(loss, (hidden, w_leaf))

        ms = _timer(fwd_bwd)
        rec[f"fwd_bwd_ms/{path}"] = ms
        rec[f"fwd_bwd_x_gemm/{path}"] = ms / gemm  # 3 is the 6·N·H·V floor, 4 the 8·N·H·V one
    return rec


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write the JSON records here")
    parser.add_argument("--shapes", nargs="*", default=None, help="names from GPU_SHAPES (default: all)")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float16
    shapes = GPU_SHAPES if on_gpu else CPU_SHAPES
    if args.shapes:
        shapes = [s for s in shapes if s[0] in args.shapes]
    meta = {"device": torch.cuda.get_device_name() if on_gpu else "cpu (TRITON_INTERPRET)", "torch": torch.__version__}
    import triton

    meta["triton"] = triton.__version__
    records = []
    for name, H, V, N in shapes:
        rec = profile_shape(name, H, V, N, dtype, device)
        records.append(rec)
        print(json.dumps(rec), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
