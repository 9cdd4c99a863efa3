"""What the Triton backend allocates: no logits-sized tensor, scratch within its knob, and
prompt/padding rows never reach the GEMM kernels."""

from triton_interp import device, triton_interpreter  # noqa: F401  (first: see its docstring)

import pytest
import torch
from conftest import make_batch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import alphapo
from alphapo.kernels import fused
from alphapo.kernels.config import launch_config


KERNELS = ("_lse_fwd_kernel", "_dz_kernel", "_grad_h_kernel", "_dz_tile_kernel")
RECOMPUTE_KERNELS = {"_lse_fwd_kernel", "_dz_kernel", "_grad_h_kernel"}
PAIR_KERNELS = {"_lse_fwd_kernel", "_dz_tile_kernel"}  # + the two cuBLAS (torch) gradient GEMMs


class AllocationRecorder(TorchDispatchMode):
    """Records the shape and byte size of every tensor an ATen op returns.

    Ops issued *inside* a kernel launch are not the package's allocations: Triton's CPU
    interpreter stages each argument's storage through host copies while it runs a kernel
    (on a GPU a launch issues no ATen op at all). ``paused`` is set around launches.
    """

    def __init__(self):
        super().__init__()
        self.tensors = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.tensors.append((str(func), tuple(t.shape), t.numel() * t.element_size()))
        return out


class Spy:
    """Stands in for a kernel: records each launch's grid and N, then launches it."""

    def __init__(self, name, kernel, seen, recorder=None):
        self.name, self.kernel, self.seen, self.recorder = name, kernel, seen, recorder

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append((self.name, grid, args[self.kernel.arg_names.index("N")]))
            if self.recorder is not None:
                self.recorder.paused = True
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                if self.recorder is not None:
                    self.recorder.paused = False

        return launch


def spy_on_kernels(monkeypatch, recorder=None):
    seen = []
    for name in KERNELS:
        monkeypatch.setattr(fused, name, Spy(name, getattr(fused, name), seen, recorder))
    return seen


def _record(monkeypatch, batch, **kw):
    weight, hidden, target, bias = batch
    leaves = [t.clone().requires_grad_() for t in (weight, hidden, bias)]
    rec = AllocationRecorder()
    seen = spy_on_kernels(monkeypatch, rec)
    loss_fn = alphapo.AlphaPOLoss(backend="triton", **kw)
    with rec:
        loss, _ = loss_fn(*leaves[:2], target, leaves[2])
        loss.backward()
    assert rec.tensors and seen, "the recorder saw nothing"
    return rec.tensors, seen, loss_fn.last_path


@pytest.mark.parametrize("scratch_bytes", [2048, 64 * 1024], ids=["2KiB", "64KiB"])
def test_recompute_path_no_logits_and_scratch_within_budget(scratch_bytes, device, monkeypatch):
    B, T, H, V = 2, 16, 32, 400
    batch = make_batch(B, T, H, V, torch.float32, seed=0, device=device)
    n_valid = int((batch[2] != -100).sum())
    tensors, seen, path = _record(monkeypatch, batch, scratch_bytes=scratch_bytes, path="recompute")
    assert path == "recompute" and {s[0] for s in seen} == RECOMPUTE_KERNELS
    rows = 2 * B * T
    block = launch_config(torch.device(device), torch.float32, "dz").block_n
    for op, shape, nbytes in tensors:
        numel = 1
        for d in shape:
            numel *= d
        # No (tokens × vocabulary) tensor, whatever its layout: not even one of the N valid rows.
        assert numel < n_valid * V, f"{op} made a logits-sized tensor {shape}"
        # Anything with a token dimension and a vocabulary-slice dimension is dz: within budget
        # (the minimum slice is one tile wide, which these budgets exceed).
        if len(shape) == 2 and shape[0] in (n_valid, rows) and shape[1] not in (H,):
            assert nbytes <= max(scratch_bytes, n_valid * block * 4), f"{op} {shape} {nbytes} B > {scratch_bytes}"


def test_pair_chunked_path_holds_whole_pairs_within_budget(device, monkeypatch):
    """Each chunk's logit tile holds whole pairs and fits scratch_bytes; nothing else but
    the weight-shaped gradient (V, H) and per-vocabulary vectors has a vocabulary axis."""
    B, T, H, V = 3, 16, 32, 400
    batch = make_batch(B, T, H, V, torch.float32, seed=0, device=device)
    n_host = (batch[2] != -100).sum(1).tolist()
    pair_tokens = [n_host[j] + n_host[B + j] for j in range(B)]
    scratch = (max(pair_tokens) + 1) * V * 4  # one pair, sometimes two, per chunk
    tensors, seen, path = _record(monkeypatch, batch, scratch_bytes=scratch)
    assert path == "pair-chunked" and {s[0] for s in seen} == PAIR_KERNELS
    from alphapo._pairchunk import chunk_pairs

    chunks = chunk_pairs(n_host, scratch // (V * 4))
    assert len(chunks) > 1, "the test should walk several chunks"
    expected_rows = sorted(sum(pair_tokens[j0:j1]) for j0, j1 in chunks)
    forward_rows = sorted(N for name, grid, N in seen if name == "_lse_fwd_kernel")
    assert forward_rows == expected_rows
    for op, shape, nbytes in tensors:
        if V in shape and shape not in ((V,), (V, H), (H, V)):
            assert nbytes <= scratch, f"{op} {shape}: {nbytes} B > scratch_bytes={scratch}"


@pytest.mark.parametrize("path", ["recompute", "pair-chunked"])
def test_only_valid_rows_reach_the_kernels(monkeypatch, device, path):
    """The grids of all GEMM kernels cover the compacted valid tokens, not 2B·T positions."""
    batch = make_batch(2, 20, 32, 100, torch.float32, prompt_len=10, seed=4, device=device)
    n_valid = int((batch[2] != -100).sum())
    assert n_valid < batch[2].numel() // 2
    _, seen, ran = _record(monkeypatch, batch, path=path)
    assert ran == path
    assert {s[0] for s in seen} == (RECOMPUTE_KERNELS if path == "recompute" else PAIR_KERNELS)
    for name, grid, N in seen:
        cfg = launch_config(torch.device(device), torch.float32, "fwd")
        assert N == n_valid, f"{name} ran over {N} rows, not the {n_valid} valid tokens"
        if name != "_dz_tile_kernel":
            assert grid[0] == -(-n_valid // cfg.block_m), f"{name} grid {grid}"


def test_triton_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    weight, hidden, target, bias = make_batch(1, 4, 16, 20, torch.float32)
    with pytest.raises(RuntimeError, match=r'backend="torch"'):
        alphapo.alphapo_loss(weight, hidden, target, bias, backend="triton")


def test_triton_refuses_float64(device):
    weight, hidden, target, bias = make_batch(1, 4, 16, 20, torch.float64, device=device)
    with pytest.raises(TypeError, match="float64"):
        alphapo.alphapo_loss(weight, hidden, target, bias, backend="triton")

