"""Vocabulary parallelism (``process_group=``) on 2 gloo ranks against the single-process reference.

One pair of worker processes (this file run as a script, meeting through a FileStore: no
network) runs every case of ``CASES`` in turn and saves what each rank got: loss, metrics,
per-sequence log-probs, ``grad_hidden``, the gradient of its own weight / bias slice and the
full gradients gathered with :func:`alphapo.distributed.gather_vocab`. The tests then check
each rank against the materialised-logits reference on the full lm-head, computed here in
one process, and check that both ranks got bit-identical losses, metrics and ``grad_hidden``.

The cases cover even and uneven splits, bias and none, ragged masks with ignored prompts
and padding, float64 and float32, several alphas and loss types, reference log-probs,
``sequence_logprobs``, and the ways a group can deadlock: every target in one rank's slice
(the other rank owns no target logit), ``hidden`` requiring grad on one rank only or on
none (the backward's ``grad_h`` all-reduce must still run on both), a frozen head, and a
forward-only call under ``torch.no_grad()``.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from alphapo import AlphaPOLoss, alphapo_loss, sequence_logprobs
from alphapo.distributed import _check_sizes, gather_vocab, shard_vocab, split_sizes, vocab_range
from alphapo.reference import alphapo_loss_reference, sequence_logprobs_reference

WORLD = 2
T, H = 9, 16
COLLECTIVE_TIMEOUT_S = 30  # a desynchronised collective fails after this instead of hanging
WORKERS_TIMEOUT_S = 120  # the whole worker pair, start-up included


@dataclass
class Case:
    id: str
    V: int = 13
    sizes: tuple[int, ...] | None = None  # rows per rank; None: shard_vocab's default split
    dtype: torch.dtype = torch.float64
    bias: bool = True
    fn: str = "loss"  # "loss" (alphapo_loss), "module" (AlphaPOLoss), "seqlogps" (sequence_logprobs)
    options: dict = field(default_factory=dict)  # keyword options of that function
    targets: str = "all"  # "all", or "rank0" / "rank1": every target id in that rank's slice
    hidden_grad: tuple[bool, bool] = (True, True)  # hidden.requires_grad on rank 0, rank 1
    head_grad: bool = True  # weight and bias slices require grad
    backward: bool = True  # False: forward only, under torch.no_grad()
    refs: bool = False  # pass ref_chosen_logps / ref_rejected_logps
    rows: int = 4  # 2B (any count for "seqlogps")
    chunk_tokens: int | None = None  # tokens per chunk of the torch backend (None: its default)
    seed: int = 0

    @property
    def split(self) -> list[int]:
        return list(self.sizes) if self.sizes is not None else split_sizes(self.V, WORLD)


CASES = [
    Case("even-bias-sigmoid-fp64", V=12, options=dict(alpha=0.25)),
    # The same on the recompute path (the default above is the pair-chunked one), and the
    # pair-chunked path walking one pair per chunk (2 x 9 positions: 18 tokens at most).
    Case("even-bias-sigmoid-fp64-recompute", V=12, options=dict(alpha=0.25, path="recompute")),
    Case("pair-chunks-fp32-nll", dtype=torch.float32, options=dict(alpha=0.5, nll_weight=0.4, path="pair-chunked"),
         chunk_tokens=18, seed=14),
    # Uneven slices with one scratch_bytes for both ranks: each rank's budget holds a different
    # token count, and the ranks must agree on one chunking (or hang in a chunk's collective).
    Case("pair-chunks-uneven-one-budget", sizes=(3, 10), rows=8,
         options=dict(alpha=0.25, path="pair-chunked", scratch_bytes=18 * 10 * 8), seed=16),
    Case("uneven-nobias-hinge-fp64", sizes=(3, 10), bias=False, options=dict(alpha=-1.0, loss_type="hinge"), seed=1),
    Case("uneven-bias-ipo-alpha0-fp64", sizes=(9, 4), options=dict(alpha=0.0, loss_type="ipo", gamma=0.3), seed=2),
    Case(
        "default-split-fp32-chunked-smoothing-nll",
        dtype=torch.float32,
        options=dict(alpha=0.5, label_smoothing=0.1, nll_weight=0.5),
        chunk_tokens=3,
        seed=3,
    ),
    Case("targets-on-rank0", sizes=(5, 8), targets="rank0", options=dict(alpha=2.0), seed=4),
    Case(
        "targets-on-rank1-hidden-grad-on-rank0-only",
        sizes=(5, 8),
        targets="rank1",
        hidden_grad=(True, False),
        options=dict(alpha=0.25, label_smoothing=0.2),
        seed=5,
    ),
    Case("hidden-frozen-on-both-ranks", sizes=(4, 9), hidden_grad=(False, False), seed=6),
    Case("head-frozen", sizes=(8, 5), head_grad=False, options=dict(alpha=-0.5), seed=7),
    Case(
        "module-dpo-refs-summed-ignore-1-auto",
        sizes=(6, 7),
        fn="module",
        refs=True,
        options=dict(alpha=0.0, beta=0.1, gamma=0.0, average_log_prob=False, ignore_index=-1, backend="auto"),
        seed=8,
    ),
    Case("forward-only-no-grad", sizes=(2, 11), backward=False, options=dict(alpha=1.0), seed=9),
    Case("seqlogps-average-uneven-fp64", sizes=(4, 9), fn="seqlogps", rows=3, options=dict(average=True), seed=10),
    Case(
        "seqlogps-summed-fp32-targets-on-rank1",
        dtype=torch.float32,
        fn="seqlogps",
        rows=5,
        targets="rank1",
        hidden_grad=(False, True),
        chunk_tokens=2,
        options=dict(average=False),
        seed=11,
    ),
]
# The Triton kernels, in the workers under TRITON_INTERPRET=1 (CPU tensors, gloo): float32
# only (the interpreter's bf16 dot is wrong, DESIGN.md §4). Last, so that a failure here
# cannot stop the torch cases (the workers stop at the first failing case).
if importlib.util.find_spec("triton") is not None and importlib.util.find_spec("alphapo.kernels") is not None:
    CASES += [
        Case("triton-uneven-bias-fp32", sizes=(5, 8), dtype=torch.float32, options=dict(backend="triton"), seed=12),
        Case("triton-uneven-bias-fp32-recompute", sizes=(5, 8), dtype=torch.float32,
             options=dict(backend="triton", path="recompute"), seed=15),
        Case(
            "triton-seqlogps-targets-on-rank1-hidden-grad-on-rank0-only",
            sizes=(5, 8),
            dtype=torch.float32,
            fn="seqlogps",
            targets="rank1",
            hidden_grad=(True, False),
            options=dict(backend="triton", average=True),
            seed=13,
        ),
    ]


def make_inputs(case: Case) -> dict:
    """The full lm-head and the batch of ``case``, identical in every process (seeded)."""
    g = torch.Generator().manual_seed(case.seed)
    ignore = case.options.get("ignore_index", -100)
    weight = 0.5 * torch.randn(case.V, H, generator=g, dtype=torch.float64)
    bias = torch.randn(case.V, generator=g, dtype=torch.float64) if case.bias else None
    hidden = torch.randn(case.rows, T, H, generator=g, dtype=torch.float64)
    split = case.split
    lo, hi = {"all": (0, case.V), "rank0": (0, split[0]), "rank1": (split[0], case.V)}[case.targets]
    target = torch.randint(lo, hi, (case.rows, T), generator=g)
    for i in range(case.rows):  # ragged: an ignored prompt, >= 1 completion token, ignored padding
        prompt = int(torch.randint(0, T - 1, (), generator=g))
        completion = int(torch.randint(1, T - prompt + 1, (), generator=g))
        target[i, :prompt] = ignore
        target[i, prompt + completion :] = ignore
    B = case.rows // 2
    refs = (-torch.rand(B, generator=g, dtype=torch.float64) * 20, -torch.rand(B, generator=g, dtype=torch.float64) * 20)
    return dict(
        weight=weight.to(case.dtype),
        bias=bias.to(case.dtype) if bias is not None else None,
        hidden=hidden.to(case.dtype),
        target=target,
        refs=refs if case.refs else (None, None),
        upstream=torch.randn(case.rows, generator=g, dtype=torch.float64),  # dObjective/ds for "seqlogps"
    )


# ----------------------------------------------------------------------------- worker side


def run_case(case: Case, rank: int, group) -> dict:
    """One case on this rank, as a user would run it: shard the head, call, backward."""
    inp = make_inputs(case)
    start, stop = vocab_range(case.V, group, case.sizes)
    w_view, b_view = shard_vocab(inp["weight"], inp["bias"], group, case.sizes)
    weight = w_view.detach().clone().requires_grad_(case.head_grad and case.backward)
    bias = b_view.detach().clone().requires_grad_(case.head_grad and case.backward) if case.bias else None
    hidden = inp["hidden"].clone().requires_grad_(case.hidden_grad[rank] and case.backward)
    options = dict(case.options)
    if case.chunk_tokens is not None:
        options["scratch_bytes"] = case.chunk_tokens * (stop - start) * 4
    options.setdefault("backend", "torch")
    out = {"range": (start, stop)}
    with torch.set_grad_enabled(case.backward):
        if case.fn == "seqlogps":
            logps = sequence_logprobs(hidden, weight, inp["target"], bias, process_group=group, **options)
            objective = (logps.double() * inp["upstream"]).sum()
            out["seq_logps"] = logps.detach()
        else:
            if case.fn == "module":
                loss, aux = AlphaPOLoss(**options, process_group=group)(weight, hidden, inp["target"], bias, *inp["refs"])
            else:
                loss, aux = alphapo_loss(weight, hidden, inp["target"], bias, *inp["refs"], process_group=group, **options)
            objective = loss
            out["loss"], out["aux"] = loss.detach(), aux._asdict()
    if case.backward:
        objective.backward()
    out["grad_hidden"] = hidden.grad
    out["grad_weight"], out["grad_bias"] = weight.grad, bias.grad if bias is not None else None
    # Collective calls: the same on every rank (each case's flags are rank-independent).
    out["full_grad_weight"] = gather_vocab(weight.grad, group) if weight.grad is not None else None
    out["full_grad_bias"] = gather_vocab(bias.grad, group) if bias is not None and bias.grad is not None else None
    out["full_weight"] = gather_vocab(weight, group)
    return out


def worker_main(rank: int, store_path: str, out_path: str) -> None:
    """Run every case on this rank; save results (or the first error: collectives desync after it)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.FileStore(store_path, WORLD)
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=timeout)
    # A group object, as a user with model replicas passes; new_group's own default timeout is 30 min.
    group = dist.new_group(list(range(WORLD)), timeout=timeout)
    results = {}
    try:
        for case in CASES:
            try:
                results[case.id] = run_case(case, rank, group)
            except Exception:
                results[case.id] = {"error": f"rank {rank}:\n{traceback.format_exc()}"}
                break
    finally:
        torch.save(results, out_path)
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- test side


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    """Run the worker pair once for the module; returns each rank's results by case id."""
    tmp = tmp_path_factory.mktemp("vocab_parallel")
    repo = Path(__file__).resolve().parents[1]
    # TRITON_INTERPRET=1: the "triton" cases run the kernels on the workers' CPU tensors.
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    outs = [tmp / f"rank{rank}.pt" for rank in range(WORLD)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(tmp / "store"), str(outs[rank])],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )
        for rank in range(WORLD)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=WORKERS_TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"vocabulary-parallel workers still running after {WORKERS_TIMEOUT_S} s (deadlock?)")
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        if proc.returncode != 0 or not outs[rank].exists():
            pytest.fail(f"worker rank {rank} exited with {proc.returncode}:\n{log}")
    return [torch.load(out, weights_only=False) for out in outs]


def reference(case: Case) -> dict:
    """The single-process answer on the full lm-head, materialised logits, full autograd."""
    inp = make_inputs(case)
    weight = inp["weight"].clone().requires_grad_()
    bias = inp["bias"].clone().requires_grad_() if case.bias else None
    hidden = inp["hidden"].clone().requires_grad_()
    options = {k: v for k, v in case.options.items() if k not in ("backend", "path", "scratch_bytes")}
    out = {}
    if case.fn == "seqlogps":
        logps = sequence_logprobs_reference(weight, hidden, inp["target"], bias, **options)
        objective = (logps.double() * inp["upstream"]).sum()
        out["seq_logps"] = logps.detach()
    else:
        loss, aux = alphapo_loss_reference(weight, hidden, inp["target"], bias, *inp["refs"], **options)
        objective = loss
        out["loss"], out["aux"] = loss.detach(), aux._asdict()
    objective.backward()
    out.update(grad_hidden=hidden.grad, grad_weight=weight.grad, grad_bias=bias.grad if bias is not None else None)
    out["weight"] = inp["weight"]
    with torch.no_grad():  # the logits' magnitude: the scale of the logits-mean metrics' rounding
        logits = inp["hidden"] @ inp["weight"].t() + (inp["bias"] if case.bias else 0)
        out["logit_scale"] = float(logits.abs().max())
    return out


def assert_close(got, want, dtype, what, scale=None):
    """float64: to rounding; float32: relative to ``scale`` (default: the reference's largest entry)."""
    assert got is not None, f"{what}: missing"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, want {want.dtype}"
    scale = max(float(want.abs().max()) if scale is None else scale, 1e-30)
    tol = 1e-11 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got, want, rtol=tol * 10, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def case_results(rank_results, case: Case) -> list[dict]:
    per_rank = []
    for rank, results in enumerate(rank_results):
        if case.id not in results:
            pytest.fail(f"rank {rank} did not run this case: the workers stopped at an earlier failing case")
        if "error" in results[case.id]:
            pytest.fail(f"case raised in the worker on {results[case.id]['error']}")
        per_rank.append(results[case.id])
    return per_rank


@pytest.mark.slow
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_vocab_parallel_matches_single_process(rank_results, case: Case):
    per_rank = case_results(rank_results, case)
    ref = reference(case)
    if case.backward:  # a case whose loss is flat here (e.g. a satisfied hinge) would check nothing
        assert float(ref["grad_hidden"].abs().max()) > 1e-3, "vacuous case: the reference gradient is ~0"
    split = case.split
    for rank, got in enumerate(per_rank):
        at = f"rank {rank}"
        start = sum(split[:rank])
        stop = start + split[rank]
        assert got["range"] == (start, stop), f"{at}: slice {got['range']}, want {(start, stop)}"
        torch.testing.assert_close(got["full_weight"], ref["weight"], rtol=0, atol=0)  # shard + gather round trip
        if case.fn == "seqlogps":
            assert_close(got["seq_logps"], ref["seq_logps"], case.dtype, f"{at} seq_logps")
        else:
            assert_close(got["loss"], ref["loss"], case.dtype, f"{at} loss")
            for name, want in ref["aux"].items():
                # A mean logit is a sum of +-|z| terms that nearly cancel: its rounding scales with |z|.
                scale = ref["logit_scale"] if name.endswith("logits_mean") else None
                assert_close(got["aux"][name], want, case.dtype, f"{at} aux.{name}", scale)
        if not case.backward:
            assert got["grad_hidden"] is None and got["grad_weight"] is None
            continue
        if case.hidden_grad[rank]:
            assert_close(got["grad_hidden"], ref["grad_hidden"], case.dtype, f"{at} grad_hidden")
        else:
            assert got["grad_hidden"] is None, f"{at}: hidden does not require grad, yet got a gradient"
        if case.head_grad:
            assert_close(got["grad_weight"], ref["grad_weight"][start:stop], case.dtype, f"{at} grad_weight slice")
            assert_close(got["full_grad_weight"], ref["grad_weight"], case.dtype, f"{at} gathered grad_weight")
            if case.bias:
                assert_close(got["grad_bias"], ref["grad_bias"][start:stop], case.dtype, f"{at} grad_bias slice")
                assert_close(got["full_grad_bias"], ref["grad_bias"], case.dtype, f"{at} gathered grad_bias")
        else:
            assert got["grad_weight"] is None and got["grad_bias"] is None
    # Every rank returns the same numbers, bit for bit (two-rank sums commute exactly).
    first, *others = per_rank
    for rank, got in enumerate(others, start=1):
        for key in ("loss", "seq_logps"):
            if key in first:
                assert torch.equal(first[key], got[key]), f"{key} differs between rank 0 and rank {rank}"
        for name, value in first.get("aux", {}).items():
            assert torch.equal(value, got["aux"][name]), f"aux.{name} differs between rank 0 and rank {rank}"
        if first["grad_hidden"] is not None and got["grad_hidden"] is not None:
            assert torch.equal(first["grad_hidden"], got["grad_hidden"]), f"grad_hidden differs between rank 0 and {rank}"


@pytest.mark.slow
def test_every_rank_ran_every_case(rank_results):
    """No case may silently drop out of the worker run (e.g. an early failure)."""
    for rank, results in enumerate(rank_results):
        errors = [r["error"] for r in results.values() if "error" in r]
        assert not errors, errors[0]
        assert list(results) == [c.id for c in CASES], f"rank {rank} ran {list(results)}"


def test_split_sizes():
    assert split_sizes(12, 2) == [6, 6]
    assert split_sizes(13, 2) == [7, 6]
    assert split_sizes(10, 4) == [3, 3, 2, 2]
    assert split_sizes(3, 3) == [1, 1, 1]
    assert sum(split_sizes(50257, 8)) == 50257
    with pytest.raises(ValueError, match="at least one row"):
        split_sizes(3, 4)
    with pytest.raises(ValueError, match="world_size"):
        split_sizes(3, 0)


def test_custom_sizes_are_checked():
    assert _check_sizes((3, 10), 13, 2) == [3, 10]
    with pytest.raises(ValueError, match="one row count per rank"):
        _check_sizes((13,), 13, 2)
    with pytest.raises(ValueError, match="at least one"):
        _check_sizes((0, 13), 13, 2)
    with pytest.raises(ValueError, match="sum to 12"):
        _check_sizes((6, 6), 13, 2)


def test_reference_backend_refuses_process_group():
    """The materialised reference has no vocabulary-parallel path: say so, do not compute locally."""
    inp = make_inputs(CASES[0])
    group = object()  # refused before any collective, so no group needs to exist
    with pytest.raises(ValueError, match="process_group"):
        alphapo_loss(inp["weight"], inp["hidden"], inp["target"], backend="reference", process_group=group)
    with pytest.raises(ValueError, match="process_group"):
        sequence_logprobs(inp["hidden"], inp["weight"], inp["target"], backend="reference", process_group=group)


if __name__ == "__main__":  # a worker: python test_distributed.py RANK STORE_PATH OUT_PATH
    worker_main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
    # The results are saved and closed; skip the interpreter's teardown of torch and gloo,
    # which takes ~3 s per process on a 2-core machine (a third of this module's run time).
    sys.stdout.flush()
    os._exit(0)
