"""How each provider × case is measured, and the run loop that turns them into records.

Per case (once): the seeded batch; ``gemm_ms``, the time of one cuBLAS (CPU: BLAS) GEMM
of (valid tokens × H)·(H × V) in the benchmark dtype, and the **floor** ``floor_ms`` =
4 × it — the 8·N·H·V limit of a method that stores no logits (3 × ``gemm_ms`` is the
6·N·H·V limit of the pair-chunked order); and the **accuracy reference**, loss and gradients in float32 on
GPU (float64 on CPU), exact, computed in row chunks so that it fits at every shape.

Per provider × case: one warm-up call (compilation, autotuning, allocator), then

* ``fwd``: the loss with ``requires_grad`` inputs (as in training);
  ``fwd_bwd``: the loss and ``torch.autograd.grad`` w.r.t. hidden and weight. Median,
  20th and 80th percentiles from ``triton.testing.do_bench`` on GPU, from a warmed-up
  ``perf_counter`` loop on CPU;
* peak memory above the inputs and the parameter-dtype gradients over one more
  ``fwd_bwd``: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the peak RSS of a
  process that runs this provider alone (see :func:`cpu_peak_bytes`);
* accuracy: norm-wise relative error ``|x − x_ref| / |x_ref|`` of the loss, grad_hidden
  and grad_weight of that same call;
* ``tflops = 6·n_valid·H·V / fwd_bwd time``: the work of the problem (the valid-token
  GEMM forward and the two gradient GEMMs), whatever the provider actually computes;
* ``path``: the order of work that ran — alphapo's ``pair-chunked`` (6·N·H·V) or
  ``recompute`` (8·N·H·V), read from the loss module after the call; for peers, their
  method (``materialised``, ``chunked``, ``recompute``).
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import providers as P
from .cases import IGNORE_INDEX, SHAPES, Case, make_batch, softmax_stats

REPO_ROOT = Path(__file__).resolve().parent.parent

# Every record carries these keys (values may be null, e.g. for skipped providers).
RECORD_FIELDS = (
    "provider", "preset", "mask", "logits", "B", "T", "H", "V", "N", "n_valid", "dtype",
    "fwd_ms", "fwd_bwd_ms", "fwd_bwd_p20_ms", "fwd_bwd_p80_ms", "peak_mem_mb", "gemm_ms", "floor_ms", "tflops",
    "path",
    "loss_rel_err", "grad_h_rel_err", "grad_w_rel_err", "status", "reason",
    "device", "torch", "triton", "commit",
)  # fmt: skip


# ---------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------


def _git(*args) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit_id() -> str:
    """Short HEAD hash, "+dirty" when tracked files differ from it; "unknown" outside git.

    ``ALPHAPO_COMMIT`` overrides it: a copy of the tree without ``.git`` (a lent GPU
    machine's) still records which commit it measured.
    """
    if os.environ.get("ALPHAPO_COMMIT"):
        return os.environ["ALPHAPO_COMMIT"]
    head = _git("rev-parse", "--short=12", "HEAD")
    if not head:
        return "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return head + ("+dirty" if dirty else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    n = torch.get_num_threads()
    return f"CPU ({model}; {n} thread{'s' if n > 1 else ''} of {os.cpu_count()} cores)"


def device_slug(device: torch.device) -> str:
    """File-name form of the device: "cpu", "nvidia-h100-80gb-hbm3", ..."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit_id(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "peers": peer_versions(),
        # CPU times are only as good as the machine is quiet: keep its load next to them.
        "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def peer_versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("liger-kernel", "cut-cross-entropy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


# ---------------------------------------------------------------------------------------
# Timers
# ---------------------------------------------------------------------------------------


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantiles(samples_ms: list[float]) -> tuple[float, float, float]:
    """Median, 20th and 80th percentiles (linear interpolation; one sample gives it thrice)."""
    if len(samples_ms) == 1:
        return samples_ms[0], samples_ms[0], samples_ms[0]
    q = statistics.quantiles(samples_ms, n=10, method="inclusive")  # deciles: q[1] = p20, q[7] = p80
    return statistics.median(samples_ms), q[1], q[7]


def cpu_time(fn, min_reps: int = 3, max_reps: int = 25, budget_s: float = 0.6) -> tuple[float, float, float]:
    """Median/p20/p80 ms of ``fn()`` on a warmed-up CPU: at least ``min_reps`` calls, more
    while the ``budget_s`` lasts."""
    samples = []
    stop = time.perf_counter() + budget_s
    while len(samples) < min_reps or (len(samples) < max_reps and time.perf_counter() < stop):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(samples)


def gpu_time(fn, estimate_ms: float) -> tuple[float, float, float]:
    """Median/p20/p80 ms from ``triton.testing.do_bench`` (L2 flushed between calls).

    do_bench runs ``rep`` ms worth of calls; stretch it so that even a 100 ms call is
    sampled at least 5 times.
    """
    from triton.testing import do_bench

    rep = max(100.0, 5.5 * estimate_ms)
    warmup = max(25.0, estimate_ms)
    p50, p20, p80 = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return float(p50), float(p20), float(p80)


def time_call(fn, device: torch.device, estimate_ms: float, cpu_budget_s: float = 0.6):
    if device.type == "cuda":
        return gpu_time(fn, estimate_ms)
    return cpu_time(fn, budget_s=cpu_budget_s)


# ---------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_hwm():
    # Linux ≥ 4.0: writing 5 resets the peak RSS to the current RSS (proc(5), clear_refs).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
# While timing: blocks up to 32 MiB (glibc's ceiling for its own dynamic threshold) are
# reused from the heap, as a long-running trainer would see. While taking the peak: every
# block above 64 KiB is its own mapping, returned to the OS when freed, so RSS follows the
# live tensors and heap fragmentation does not count as the provider's memory.
_TIMING_MMAP_THRESHOLD = 32 * 2**20
_MEMORY_MMAP_THRESHOLD = 64 * 2**10


def _mallopt_mmap_threshold(nbytes: int):
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, nbytes)


def _malloc_trim():
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def cpu_peak_supported() -> bool:
    try:
        _rss_bytes(), _hwm_bytes(), _reset_hwm()
    except OSError:
        return False
    return True


def cpu_peak_bytes(fn):
    """``(fn(), peak RSS during fn above the RSS before it)`` for this process.

    Blocks above 64 KiB are mmapped during the call (``mallopt``) and the free heap is
    handed back to the OS first (``malloc_trim(0)``), so the call has to fault in all it
    uses, frees return memory at once, and the high-water mark above the starting RSS is
    its peak.
    """
    _mallopt_mmap_threshold(_MEMORY_MMAP_THRESHOLD)
    try:
        gc.collect()
        _malloc_trim()
        base = _rss_bytes()
        _reset_hwm()
        out = fn()
        return out, max(0, _hwm_bytes() - base)
    finally:
        _mallopt_mmap_threshold(_TIMING_MMAP_THRESHOLD)


def gpu_peak_bytes(fn, device):
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    return out, max(0, torch.cuda.max_memory_allocated(device) - base)


# ---------------------------------------------------------------------------------------
# Floor and accuracy reference (once per case)
# ---------------------------------------------------------------------------------------


def time_gemm(batch, n_valid: int, device: torch.device) -> float:
    """The time of one (n_valid × H)·(H × V) GEMM in the batch's dtype, in ms."""
    H = batch.hidden.shape[-1]
    a = batch.hidden.reshape(-1, H)[: max(1, n_valid)]  # n_valid ≤ 2B·T rows: any n_valid of them
    b = batch.weight.t()
    fn = lambda: torch.mm(a, b)  # noqa: E731
    fn()
    _sync(device)
    if device.type == "cuda":
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        p50 = gpu_time(fn, (time.perf_counter() - t0) * 1e3)[0]
    else:
        p50 = cpu_time(fn, min_reps=5, budget_s=0.3)[0]
    return p50


@dataclass
class Reference:
    loss: torch.Tensor  # 0-d, accumulation dtype
    grad_h: torch.Tensor  # like hidden
    grad_w: torch.Tensor  # like weight


def _set_tf32(enabled):
    """Set cuBLAS TF32 for float32 GEMMs; returns the previous setting (None: untouched)."""
    if enabled is None:
        return None
    try:
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = enabled
        return previous
    except (RuntimeError, AttributeError):  # torch versions that refuse the legacy flag
        return None


@torch.no_grad()
def accuracy_reference(weight, hidden, target, alphas, acc_dtype, chunk_bytes: int = 256 * 2**20) -> dict:
    """Exact loss and gradients in ``acc_dtype`` for each α, with the logits in row chunks.

    Over the valid tokens t (sequence i(t), n_i valid tokens): pass 1 computes
    ``logp_t = z_t[y_t] − logsumexp(z_t)`` and ``s_i = Σ logp_t / n_i``; autograd of
    :func:`~benchmarks.providers.trl_pair_loss` in float64 gives ``c_i = dL/ds_i``; pass 2
    recomputes each chunk's logits and uses ``d logp_t / d z_t = onehot(y_t) − softmax(z_t)``::

        grad_h[t] = (c_i(t) / n_i(t)) · (onehot − p)_t · W        grad_W = Σ_t (c/n)_t (onehot − p)_tᵀ h_t

    The ``(onehot − p)·W`` GEMM is shared by every α. TF32 is switched off for it.
    """
    V, H = weight.shape
    rows, T = target.shape
    W = weight.to(acc_dtype)
    h2 = hidden.reshape(-1, H).to(acc_dtype)
    y = target.reshape(-1)
    idx = (y != IGNORE_INDEX).nonzero().squeeze(1)
    seq = torch.div(idx, T, rounding_mode="floor")
    n_tok = torch.bincount(seq, minlength=rows).double()
    step = max(1, chunk_bytes // (V * torch.finfo(acc_dtype).bits // 8))
    tf32 = _set_tf32(False)
    try:
        S = torch.zeros(rows, dtype=torch.float64, device=weight.device)
        lse = torch.empty(idx.numel(), dtype=acc_dtype, device=weight.device)
        for start in range(0, idx.numel(), step):
            sl = slice(start, start + step)
            z = h2[idx[sl]] @ W.t()
            lse[sl] = torch.logsumexp(z, -1)
            logp = z.gather(1, y[idx[sl], None]).squeeze(1) - lse[sl]
            S.index_add_(0, seq[sl], logp.double())
        coefs, out = {}, {}
        for alpha in alphas:
            with torch.enable_grad():
                s = (S / n_tok).requires_grad_()
                loss = P.trl_pair_loss(s, alpha)
                (c,) = torch.autograd.grad(loss, s)
            coefs[alpha] = (c / n_tok)[seq].to(acc_dtype)
            out[alpha] = Reference(loss.detach().to(acc_dtype), torch.zeros_like(h2), torch.zeros_like(W))
        for start in range(0, idx.numel(), step):
            sl = slice(start, start + step)
            hc = h2[idx[sl]]
            dz = (hc @ W.t()).sub_(lse[sl, None]).exp_().neg_()  # −softmax
            dz.scatter_add_(1, y[idx[sl], None], torch.ones_like(lse[sl, None]))  # + onehot
            G = dz @ W
            for alpha in alphas:
                c = coefs[alpha][sl, None]
                out[alpha].grad_h[idx[sl]] = c * G
                out[alpha].grad_w.addmm_(dz.t(), c * hc)
            del dz, G
    finally:
        _set_tf32(tf32)
    for r in out.values():
        r.grad_h = r.grad_h.view(hidden.shape)
    return out


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x = x.detach().to(ref.dtype)
    denom = ref.norm().item()
    return (x - ref).norm().item() / denom if denom > 0 else float("nan")


# ---------------------------------------------------------------------------------------
# One provider on one batch
# ---------------------------------------------------------------------------------------


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    msg = str(exc)
    return "out of memory" in msg.lower() or "can't allocate memory" in msg


def measure(fn, weight, hidden, target, ref: Reference | None, device: torch.device, cpu_budget_s: float = 0.6) -> dict:
    """Times, peak memory and errors of one provider on one batch (see the module docstring)."""
    w = weight.detach().requires_grad_()
    h = hidden.detach().requires_grad_()

    def fwd():
        return fn(w, h, target)

    def fwd_bwd():
        loss = fn(w, h, target)
        return loss, torch.autograd.grad(loss, (h, w))

    fwd_bwd()  # warm-up: compilation, autotuning, allocator
    _sync(device)
    t0 = time.perf_counter()
    fwd_bwd()
    _sync(device)
    estimate_ms = (time.perf_counter() - t0) * 1e3

    fwd_ms, fwd_p20, fwd_p80 = time_call(fwd, device, estimate_ms, cpu_budget_s)
    bwd_ms, bwd_p20, bwd_p80 = time_call(fwd_bwd, device, estimate_ms, cpu_budget_s)

    if device.type == "cuda":
        (loss, (grad_h, grad_w)), peak_bytes = gpu_peak_bytes(fwd_bwd, device)
    else:
        # RSS noise only ever adds (a one-off page fault, a late free): take the lower of two.
        _, first = cpu_peak_bytes(fwd_bwd)
        (loss, (grad_h, grad_w)), peak_bytes = cpu_peak_bytes(fwd_bwd)
        peak_bytes = min(first, peak_bytes)
    grad_bytes = h.numel() * h.element_size() + w.numel() * w.element_size()
    out = {
        "fwd_ms": fwd_ms, "fwd_p20_ms": fwd_p20, "fwd_p80_ms": fwd_p80,
        "fwd_bwd_ms": bwd_ms, "fwd_bwd_p20_ms": bwd_p20, "fwd_bwd_p80_ms": bwd_p80,
        "peak_mem_mb": max(0, peak_bytes - grad_bytes) / 2**20,
        "loss": float(loss.item()),
        "path": P.path_of(fn),
    }  # fmt: skip
    if ref is not None:
        out["loss_rel_err"] = rel_err(loss, ref.loss)
        out["grad_h_rel_err"] = rel_err(grad_h, ref.grad_h)
        out["grad_w_rel_err"] = rel_err(grad_w, ref.grad_w)
    return out


def interleave_times(fns: dict, results: dict, batch, rounds: int) -> None:
    """Re-time fwd+bwd of every provider of one case round-robin: each round calls each
    provider once, in an order rotated every round, so a machine that slows down for a while
    slows every provider alike. The rounds' median, 20th and 80th percentiles replace the
    ``fwd_bwd_*`` times, ``fwd_bwd_min_ms`` is the fastest round (on a shared CPU, the
    minimum is the least disturbed figure)."""
    w = batch.weight.detach().requires_grad_()
    h = batch.hidden.detach().requires_grad_()
    names = list(fns)
    samples = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            loss = fns[name](w, h, batch.target)
            torch.autograd.grad(loss, (h, w))
            samples[name].append((time.perf_counter() - t0) * 1e3)
    for name in names:
        med, p20, p80 = _quantiles(samples[name])
        results[name].update(fwd_bwd_ms=med, fwd_bwd_p20_ms=p20, fwd_bwd_p80_ms=p80, fwd_bwd_min_ms=min(samples[name]),
                             timing=f"interleaved, {rounds} rounds")


def measure_safely(name, opts: P.BuildOptions, fn_cache: dict, weight, hidden, target, ref, cpu_budget_s) -> dict:
    """:func:`measure` with the provider built (or taken from ``fn_cache``); failures
    become ``status`` skipped / oom / error with the reason, never an exception."""
    try:
        if name not in fn_cache:
            fn_cache[name] = P.build(name, opts)
        fn = fn_cache[name]
        if isinstance(fn, P.Unavailable):
            raise fn
        result = measure(fn, weight, hidden, target, ref, opts.device, cpu_budget_s)
        result.update(status="ok", reason="")
        return result
    except P.Unavailable as exc:
        fn_cache[name] = exc
        return {"status": "skipped", "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 - one failing provider must not end the run
        if _is_oom(exc):
            return {"status": "oom", "reason": f"out of memory: {str(exc).splitlines()[0][:300]}"}
        tb = traceback.format_exc(limit=3).strip().splitlines()
        return {"status": "error", "reason": f"{type(exc).__name__}: {exc}"[:500], "traceback": tb[-6:]}
    finally:
        gc.collect()
        if opts.device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------
# The run loop
# ---------------------------------------------------------------------------------------


@dataclass
class RunOptions:
    preset: str
    device: torch.device
    dtype: torch.dtype
    providers: list[str]
    scratch_bytes: int | None = None
    isolate: bool = False  # CPU: each provider in its own process (peak RSS per provider)
    time_budget_s: float | None = None
    cpu_budget_s: float = 0.4  # CPU timer: seconds of calls per measurement (≥ 3 calls)
    interleave_rounds: int = 0  # CPU, in one process: re-time fwd+bwd round-robin over the providers
    threads: int | None = None  # CPU: intra-op threads for every provider and the floor (None: torch's)
    command: str = ""
    on_record: object = None  # callable(record) after each record (progress, incremental save)
    env: dict = field(default_factory=dict)


def providers_for(case: Case, names: list[str]) -> list[str]:
    if case.group == "sweep":
        return [n for n in names if n in P.SWEEP_PROVIDERS]
    return list(names)


def base_record(case: Case, provider: str, opts: RunOptions, n_valid: int | None) -> dict:
    shape = SHAPES[case.shape]
    rec = dict.fromkeys(RECORD_FIELDS)
    rec.update(
        provider=provider, alpha=P.PROVIDERS[provider].alpha, preset=opts.preset, shape=case.shape,
        shape_name=shape.name, group=case.group, mask=case.mask, logits=case.logits, B=case.B, T=case.T,
        H=case.H, V=case.V, N=case.N, n_valid=n_valid, dtype=str(opts.dtype).removeprefix("torch."),
        seed=case.seed, scratch_bytes=opts.scratch_bytes if provider.startswith("alphapo") else None,
        command=opts.command, status="pending", reason="",
        **{k: opts.env.get(k) for k in ("device", "torch", "triton", "commit", "date", "load_avg")},
        peers=opts.env.get("peers"),
    )  # fmt: skip
    return rec


def finish_record(rec: dict, result: dict, case_info: dict) -> dict:
    rec.update(case_info)
    rec.update(result)
    if rec.get("status") == "ok":
        rec["floor_ratio"] = rec["fwd_bwd_ms"] / rec["floor_ms"] if rec.get("floor_ms") else None
        rec["floor6_ratio"] = rec["fwd_bwd_ms"] / (3 * rec["gemm_ms"]) if rec.get("gemm_ms") else None
        # 6·n_valid·H·V: forward 2NHV + grad_h 2NHV + grad_W 2NHV.
        rec["tflops"] = 6.0 * rec["n_valid"] * rec["H"] * rec["V"] / (rec["fwd_bwd_ms"] * 1e-3) / 1e12
    if not case_info.get("accuracy", True) and rec.get("status") == "ok":
        rec["notes"] = "accuracy not measured on token-sweep points"
    rec.pop("accuracy", None)
    return rec


def prepare_case(case: Case, opts: RunOptions) -> tuple[object, dict, dict]:
    """The batch, per-case record fields (n_valid, floor, softmax stats) and the references."""
    batch = make_batch(case, opts.device, opts.dtype)
    n_valid = int((batch.target != IGNORE_INDEX).sum().item())
    logp, top1 = softmax_stats(batch.weight, batch.hidden, batch.target)
    gemm_ms = time_gemm(batch, n_valid, opts.device)
    info = {
        "n_valid": n_valid,
        "gemm_ms": gemm_ms,
        "floor_ms": 4.0 * gemm_ms,
        "logp_mean": logp,
        "top1_mean": top1,
        "accuracy": case.accuracy,
    }
    if batch.peaked is not None:
        info.update(prior_scale=batch.peaked.prior_scale, push=batch.peaked.push)
    refs = {}
    if case.accuracy:
        alphas = sorted({P.PROVIDERS[n].alpha for n in providers_for(case, opts.providers)})
        acc_dtype = torch.float32 if opts.device.type == "cuda" else torch.float64
        refs = accuracy_reference(batch.weight, batch.hidden, batch.target, alphas, acc_dtype)
    return batch, info, refs


def _budget_left(deadline) -> bool:
    return deadline is None or time.time() < deadline


def apply_threads(opts: RunOptions):
    if opts.threads and opts.device.type == "cpu":
        torch.set_num_threads(opts.threads)


def run(cases: list[Case], opts: RunOptions) -> list[dict]:
    """Measure every provider on every case; returns one record per provider × case."""
    apply_threads(opts)
    opts.env = opts.env or environment(opts.device)
    deadline = time.time() + opts.time_budget_s if opts.time_budget_s else None
    if opts.isolate:
        return _run_isolated(cases, opts, deadline)
    return _run_in_process(cases, opts, deadline)


def _emit(opts: RunOptions, rec: dict, records: list):
    records.append(rec)
    if opts.on_record:
        opts.on_record(rec)


def _skip_all(case, names, opts, records, reason, info=None):
    for name in names:
        rec = base_record(case, name, opts, None)
        _emit(opts, finish_record(rec, {"status": "skipped", "reason": reason}, info or {}), records)


def _run_in_process(cases, opts, deadline) -> list[dict]:
    records: list[dict] = []
    build = P.BuildOptions(opts.device, opts.dtype, opts.scratch_bytes)
    fn_cache: dict = {}
    oom_at: dict[tuple[str, str], int] = {}  # (provider, head) -> fewest positions at which it ran out of memory
    for case in cases:
        names = providers_for(case, opts.providers)
        if not _budget_left(deadline):
            _skip_all(case, names, opts, records, _budget_reason(opts, "before this case"))
            continue
        batch, info, refs = prepare_case(case, opts)
        results = {}
        for name in names:
            rec = base_record(case, name, opts, info["n_valid"])
            key = (name, case.shape)
            if key in oom_at and case.N >= oom_at[key]:
                result = {"status": "oom", "reason": f"not run: out of memory already at N={oom_at[key]} positions"}
            elif not _budget_left(deadline):
                result = {"status": "skipped", "reason": _budget_reason(opts)}
            else:
                ref = refs.get(P.PROVIDERS[name].alpha)
                result = measure_safely(
                    name, build, fn_cache, batch.weight, batch.hidden, batch.target, ref, opts.cpu_budget_s
                )
                if result["status"] == "oom":
                    oom_at[key] = min(case.N, oom_at.get(key, case.N))
            results[name] = (rec, result)
        if opts.interleave_rounds and opts.device.type == "cpu":
            interleave_times({n: fn_cache[n] for n, (_, r) in results.items() if r["status"] == "ok"},
                             {n: r for n, (_, r) in results.items()}, batch, opts.interleave_rounds)
        for rec, result in results.values():
            _emit(opts, finish_record(rec, result, info), records)
        del batch, refs
        gc.collect()
        if opts.device.type == "cuda":
            torch.cuda.empty_cache()
    return records


# --- CPU: one process per provider ------------------------------------------------------

def _run_isolated(cases, opts, deadline) -> list[dict]:
    """Prepare every case here, then run each provider in its own process over all cases."""
    done: dict[tuple[int, str], dict] = {}

    def emit(k, case, name, result, info):
        rec = finish_record(base_record(case, name, opts, info.get("n_valid")), dict(result), info)
        done[(k, name)] = rec
        if opts.on_record:
            opts.on_record(rec)

    build = P.BuildOptions(opts.device, opts.dtype, opts.scratch_bytes)
    with tempfile.TemporaryDirectory(prefix="alphapo-bench-") as tmp:
        tmp = Path(tmp)
        prepared = {}  # k -> (info, path)
        for k, case in enumerate(cases):
            if not _budget_left(deadline):
                for name in providers_for(case, opts.providers):
                    emit(k, case, name, {"status": "skipped", "reason": _budget_reason(opts, "before this case")}, {})
                continue
            batch, info, refs = prepare_case(case, opts)
            path = tmp / f"case{k}.pt"
            torch.save(
                {
                    "weight": batch.weight, "hidden": batch.hidden, "target": batch.target,
                    "refs": {a: (r.loss, r.grad_h, r.grad_w) for a, r in refs.items()},
                },
                path,
            )  # fmt: skip
            prepared[k] = (info, path)
        for name in opts.providers:
            jobs = [k for k in prepared if name in providers_for(cases[k], opts.providers)]
            if not jobs:
                continue
            try:
                P.build(name, build)  # cheap availability check before paying for a process
            except P.Unavailable as exc:
                for k in jobs:
                    emit(k, cases[k], name, {"status": "skipped", "reason": str(exc)}, prepared[k][0])
                continue
            spec = {
                "provider": name,
                "device": str(opts.device),
                "dtype": str(opts.dtype).removeprefix("torch."),
                "scratch_bytes": opts.scratch_bytes,
                "cpu_budget_s": opts.cpu_budget_s,
                "threads": opts.threads,
                "deadline": deadline,
                "jobs": [{"key": k, "path": str(prepared[k][1]), "alpha": P.PROVIDERS[name].alpha} for k in jobs],
            }

            def on_result(k, result, name=name):
                emit(k, cases[k], name, result, prepared[k][0])

            returncode, log_tail = _run_worker(spec, tmp / f"{name}.json", on_result)
            for k in jobs:
                if (k, name) not in done:
                    reason = f"worker process exited with {returncode} before this case: {log_tail}"
                    emit(k, cases[k], name, {"status": "error", "reason": reason[-600:]}, prepared[k][0])
    return [done[(k, name)] for k, case in enumerate(cases) for name in providers_for(case, opts.providers)]


def _budget_reason(opts, where="") -> str:
    return f"time budget of {opts.time_budget_s:.0f} s spent {where}".strip()


def _run_worker(spec: dict, spec_path: Path, on_result) -> tuple[int, str]:
    """Run one provider's worker; results stream back as ``@@result {json}`` lines."""
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])  # size the pool before torch creates it
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    log = spec_path.with_suffix(".log")
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks._worker", str(spec_path)],
            stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=str(REPO_ROOT),
        )  # fmt: skip
        for line in proc.stdout:
            if line.startswith("@@result "):
                msg = json.loads(line[len("@@result ") :])
                on_result(msg["key"], msg["result"])
        proc.wait()
    return proc.returncode, log.read_text()[-1000:].strip()


def _die_with_parent():
    """Linux: end this worker when the run that started it is killed (a time limit)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "prctl"):
        import signal

        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def worker_main(spec_path: str) -> int:
    """Entry of ``python -m benchmarks._worker SPEC``: one provider over its cases."""
    spec = json.loads(Path(spec_path).read_text())
    _die_with_parent()
    _mallopt_mmap_threshold(_TIMING_MMAP_THRESHOLD)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    opts = P.BuildOptions(device, dtype, spec["scratch_bytes"])
    fn_cache: dict = {}
    for job in spec["jobs"]:
        if spec["deadline"] and time.time() > spec["deadline"]:
            result = {"status": "skipped", "reason": "time budget spent before this case"}
        else:
            data = torch.load(job["path"], map_location=device)
            ref = data["refs"].get(job["alpha"])
            ref = Reference(*ref) if ref is not None else None
            result = measure_safely(
                spec["provider"], opts, fn_cache, data["weight"], data["hidden"], data["target"], ref,
                spec["cpu_budget_s"],
            )  # fmt: skip
            del data, ref
        print("@@result " + json.dumps({"key": job["key"], "result": result}), flush=True)
    return 0
