"""Peak extra memory of one fwd+bwd per provider, each in a fresh process (CPU).

``python -m benchmarks.peak_memory --H 4096 --V 32000 --B 4 --T 256 [--providers ...]``
prints one JSON line per provider: the peak resident memory during one forward+backward
above the inputs (``with_grads_mb``) and above the inputs and the parameter-dtype
gradients (``extra_mb``), float32, every position valid. Each provider runs alone in its
own process, warms up once on the same batch (compilation), then the lower of two
measured calls is kept (``harness.cpu_peak_bytes``: the free heap handed back first,
blocks above 64 KiB mmapped, ``VmHWM`` reset through ``clear_refs``). This is how the
6·N·H·V issue's memory comparison at (896, 151936) and (4096, 32000) was measured.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _child(name: str, H: int, V: int, B: int, T: int, threads: int) -> dict:
    import torch

    from . import cases as C
    from . import harness as HN
    from . import providers as P

    torch.set_num_threads(threads)
    C.SHAPES["peak-memory"] = C.Shape("peak memory", H, V)
    batch = C.make_batch(C.Case("peak-memory", B, T), "cpu", torch.float32)
    fn = P.build(name, P.BuildOptions(torch.device("cpu"), torch.float32))
    w = batch.weight.detach().requires_grad_()
    h = batch.hidden.detach().requires_grad_()

    def fwd_bwd():
        loss = fn(w, h, batch.target)
        return loss, torch.autograd.grad(loss, (h, w))

    fwd_bwd()  # compilation, allocator
    HN._mallopt_mmap_threshold(HN._TIMING_MMAP_THRESHOLD)
    t0 = time.perf_counter()
    (loss, grads), first = HN.cpu_peak_bytes(fwd_bwd)
    seconds = time.perf_counter() - t0
    del grads
    (loss, grads), second = HN.cpu_peak_bytes(fwd_bwd)
    peak = min(first, second)
    grad_bytes = (h.numel() + w.numel()) * 4
    return dict(
        provider=name, H=H, V=V, B=B, T=T, dtype="float32", threads=threads,
        extra_mb=(peak - grad_bytes) / 2**20, with_grads_mb=peak / 2**20, seconds=seconds,
        path=P.path_of(fn), loss=float(loss.detach()), commit=HN.commit_id(), date=HN.environment(torch.device("cpu"))["date"],
    )  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for dim in ("H", "V", "B", "T"):
        p.add_argument(f"--{dim}", type=int, required=True)
    p.add_argument("--providers", default="alphapo-torch,trl-fused,liger,reference,reference-compile")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(_child(a.child, a.H, a.V, a.B, a.T, a.threads)), flush=True)
        return 0
    for name in a.providers.split(","):
        cmd = [sys.executable, "-m", "benchmarks.peak_memory", "--child", name,
               *(f"--{d}={getattr(a, d)}" for d in ("H", "V", "B", "T")), f"--threads={a.threads}"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else None
        print(line or json.dumps({"provider": name, "error": out.stderr.strip()[-500:]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
