"""The benchmark suite's own correctness: its batches, its reference, its providers, its output.

The suite itself (``python -m benchmarks``, ``pytest benchmarks/ --benchmark-only``) is not
part of the default test run; these tests check, fast and on CPU, that what it measures is
what it claims: the ragged mask and the calibrated "peaked" softmax have the documented
shape, the accuracy reference equals autograd, every runnable provider computes the same
loss and gradients, unrunnable ones become skipped records with a reason, peak-RSS
measurement sees what a call allocates, and the CLI writes JSON with every field.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from benchmarks import harness, providers as P, report
from benchmarks.cases import (
    IGNORE_INDEX,
    PEAKED_LOGP,
    PEAKED_TOP1,
    REAL_SHAPES,
    SHAPES,
    Case,
    make_batch,
    preset_cases,
    softmax_stats,
    valid_mask,
)

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


# --- cases ------------------------------------------------------------------------------


def test_ragged_mask_prompt_completion_padding():
    """Prompt T/4 ignored, completion length in [T/4, 3T/4] contiguous after it, then padding."""
    case = Case("tiny", B=16, T=64, mask="ragged")
    valid = valid_mask(case)
    T = case.T
    assert not valid[:, : T // 4].any(), "prompt positions must be ignored"
    lengths = valid.sum(1)
    assert lengths.min() >= T // 4 and lengths.max() <= 3 * T // 4
    for row, n in zip(valid, lengths.tolist()):  # one contiguous block right after the prompt
        assert row[T // 4 : T // 4 + n].all() and not row[T // 4 + n :].any()
    assert 0.4 < valid.float().mean().item() < 0.6  # about half valid, as in preference data
    assert torch.equal(valid, valid_mask(case)), "seeded: the same case gives the same mask"
    assert valid_mask(Case("tiny", 2, 16, mask="full")).all()


@pytest.mark.parametrize("shape,B,T", [("tiny", 2, 64), ("standin-8k", 1, 128), ("tiny", 4, 512)])
def test_peaked_calibration_hits_its_targets(shape, B, T):
    """Mean token log-prob ≈ −1.6 and mean top-1 probability ≈ 0.5 over the valid tokens.

    The last batch has 2048 valid rows, more than the 1024 the calibration solves on: the
    targets must hold for the whole batch, not just the sample.
    """
    batch = make_batch(Case(shape, B, T, mask="ragged" if B == 2 else "full", logits="peaked"))
    logp, top1 = softmax_stats(batch.weight, batch.hidden, batch.target)
    assert abs(logp - PEAKED_LOGP) < 0.1, logp
    assert abs(top1 - PEAKED_TOP1) < 0.05, top1
    assert batch.peaked.prior_scale > 0 and batch.peaked.push > 0
    # A trained-looking softmax: the top 1% of the vocabulary holds most of the mass
    # (≈ 1% of it for the flat batch, see below).
    assert _top_percent_mass(batch) > 0.5


def _top_percent_mass(batch) -> float:
    z = batch.hidden.reshape(-1, batch.hidden.shape[-1])[:64] @ batch.weight.t()
    p = torch.softmax(z, -1)
    return p.topk(max(1, p.shape[1] // 100), -1).values.sum(-1).mean().item()


def test_flat_batch_is_untrained():
    batch = make_batch(Case("standin-8k", 1, 64, logits="flat"))
    logp, top1 = softmax_stats(batch.weight, batch.hidden, batch.target)
    assert abs(logp + math.log(SHAPES["standin-8k"].V)) < 0.5  # near-uniform softmax
    assert top1 < 0.01
    assert _top_percent_mass(batch) < 0.05
    assert abs(batch.weight.std().item() - 0.02) < 0.002 and abs(batch.hidden.std().item() - 1) < 0.05


def test_presets_cover_the_issue():
    quick = preset_cases("quick")
    assert {(c.mask, c.logits) for c in quick} == {("full", "flat"), ("full", "peaked"), ("ragged", "flat"), ("ragged", "peaked")}
    assert all(SHAPES[c.shape].H <= 128 and SHAPES[c.shape].V <= 16384 for c in quick), "quick must stay CPU-sized"
    assert any(c.group == "sweep" for c in quick)
    gpu = preset_cases("gpu")
    assert [c.id for c in gpu[:4]] == [f"llama3-8b-4x2048-{m}-{l}" for m, l in
                                       (("full", "flat"), ("full", "peaked"), ("ragged", "flat"), ("ragged", "peaked"))]  # fmt: skip
    full = preset_cases("full")
    for preset in (gpu, full):
        assert set(REAL_SHAPES) <= {c.shape for c in preset}
        assert {(c.B, c.T) for c in preset if c.group == "main"} == {(4, 2048), (2, 1024)}
    assert len({c.id for c in full}) == len(full)


# --- the accuracy reference -------------------------------------------------------------


def test_accuracy_reference_equals_autograd():
    """The chunked, hand-differentiated reference equals autograd of the materialised loss."""
    batch = make_batch(Case("tiny", 2, 24, mask="ragged", logits="peaked"), dtype=torch.float64)
    refs = harness.accuracy_reference(
        batch.weight, batch.hidden, batch.target, [0.0, 0.25], torch.float64, chunk_bytes=7 * 512 * 8
    )  # 7 rows per chunk: several chunks, one ragged
    for alpha in (0.0, 0.25):
        w = batch.weight.clone().requires_grad_()
        h = batch.hidden.clone().requires_grad_()
        loss = P.reference_loss(w, h, batch.target, alpha)
        gh, gw = torch.autograd.grad(loss, (h, w))
        r = refs[alpha]
        assert harness.rel_err(r.loss, loss.detach()) < 1e-12
        assert harness.rel_err(r.grad_h, gh) < 1e-10
        assert harness.rel_err(r.grad_w, gw) < 1e-10


# --- providers --------------------------------------------------------------------------


def _run(fn, batch):
    w = batch.weight.clone().requires_grad_()
    h = batch.hidden.clone().requires_grad_()
    loss = fn(w, h, batch.target)
    return (loss, *torch.autograd.grad(loss, (h, w)))


@pytest.fixture(scope="module")
def small_case():
    batch = make_batch(Case("tiny", 2, 32, mask="ragged", logits="peaked"))
    refs = harness.accuracy_reference(batch.weight, batch.hidden, batch.target, [0.0, 0.25], torch.float64)
    return batch, refs


@pytest.mark.parametrize("name", ["alphapo-torch", "alphapo-torch-a0", "reference", "liger"])
def test_providers_compute_the_same_loss(name, small_case):
    """Each provider's loss and gradients match the float64 reference at its own α.

    (reference-compile is the reference under torch.compile, whose CPU compile takes a
    minute; Liger runs without torch.compile here for the same reason.)
    """
    if name == "liger":
        pytest.importorskip("liger_kernel")
    batch, refs = small_case
    fn = P.build(name, P.BuildOptions(CPU, torch.float32, scratch_bytes=4096, compile=False))
    loss, gh, gw = _run(fn, batch)
    ref = refs[P.PROVIDERS[name].alpha]
    assert harness.rel_err(loss, ref.loss) < 1e-5
    assert harness.rel_err(gh, ref.grad_h) < 1e-5
    assert harness.rel_err(gw, ref.grad_w) < 1e-5


def test_alpha_is_the_loss_we_think(small_case):
    """α = 0.25 and α = 0 differ (so the "-a0" rows and Liger are a different loss)."""
    _, refs = small_case
    assert abs(refs[0.25].loss.item() - refs[0.0].loss.item()) > 1e-3


def test_alphapo_triton_provider_under_the_interpreter(small_case, monkeypatch):
    """The Triton provider's wrapper, run by Triton's CPU interpreter (CUDA runs it for real)."""
    pytest.importorskip("triton")
    if importlib_missing("alphapo.kernels.fused"):
        pytest.skip("alphapo.kernels.fused not present")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    batch, refs = small_case
    fn = P.build("alphapo-triton", P.BuildOptions(CPU, torch.float32))
    loss, gh, gw = _run(fn, batch)
    assert harness.rel_err(loss, refs[0.25].loss) < 1e-5
    assert harness.rel_err(gh, refs[0.25].grad_h) < 1e-5


def importlib_missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


class _FakeCCE(torch.autograd.Function):
    """Per-token NLL like cut_cross_entropy 25.1.1 (reduction="none"), including its
    backward's ``grad_out.view(-1)``, which fails on a stride-0 upstream gradient."""

    @staticmethod
    def forward(ctx, e, c, targets, ignore_index):
        valid = targets != ignore_index
        logits = e.float() @ c.float().t()
        nll = -torch.log_softmax(logits, -1).gather(-1, torch.where(valid, targets, 0)[..., None])[..., 0]
        ctx.save_for_backward(e, c, targets, valid)
        return torch.where(valid, nll, 0.0)

    @staticmethod
    def backward(ctx, grad_out):
        e, c, targets, valid = ctx.saved_tensors
        g = grad_out.view(-1).view(targets.shape) * valid  # what CCE does
        with torch.enable_grad():
            e_, c_ = e.detach().requires_grad_(), c.detach().requires_grad_()
            lp = torch.log_softmax(e_ @ c_.t(), -1).gather(-1, torch.where(valid, targets, 0)[..., None])[..., 0]
            de, dc = torch.autograd.grad(-(lp * g).sum(), (e_, c_))
        return de, dc, None, None


def test_cce_provider_glue_with_a_fake_cce(small_case, monkeypatch):
    """The CCE provider (per-token NLL → float-mask sum → epilogue) gives the reference's
    loss and gradients, and survives CCE's ``view(-1)`` backward; a plain ``.sum(-1)``
    of the NLL would not (checked, so the workaround stays needed and tested)."""
    calls = []

    def linear_cross_entropy(e, c, targets, ignore_index=-100, reduction="mean", **kw):
        assert reduction == "none"
        calls.append(kw)
        return _FakeCCE.apply(e, c, targets, ignore_index)

    monkeypatch.setitem(sys.modules, "cut_cross_entropy", types.SimpleNamespace(linear_cross_entropy=linear_cross_entropy))
    batch, refs = small_case
    pretend_cuda = P.BuildOptions(torch.device("cuda"), torch.float32)  # the fake runs on CPU
    for name, kwargs in (("cce", {}), ("cce-exact", {"filter_eps": None})):
        fn = P.build(name, pretend_cuda)
        loss, gh, gw = _run(fn, batch)
        assert calls[-1] == kwargs, "cce keeps CCE's default filter; cce-exact passes filter_eps=None"
        assert harness.rel_err(loss, refs[0.25].loss) < 1e-5
        assert harness.rel_err(gh, refs[0.25].grad_h) < 1e-5
        assert harness.rel_err(gw, refs[0.25].grad_w) < 1e-5
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        h = batch.hidden.clone().requires_grad_()
        seq = -_FakeCCE.apply(h, batch.weight, batch.target, IGNORE_INDEX).sum(-1)
        (seq * torch.arange(1.0, seq.numel() + 1)).sum().backward()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU skip path")
def test_unrunnable_providers_are_skipped_with_a_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    opts = P.BuildOptions(CPU, torch.float32)
    for name in ("alphapo-triton", "alphapo-triton-a0", "cce", "cce-exact"):
        with pytest.raises(P.Unavailable, match="CUDA|not importable"):
            P.build(name, opts)
    result = harness.measure_safely("alphapo-triton", opts, {}, None, None, None, None, 0.1)
    assert result["status"] == "skipped" and "CUDA" in result["reason"]


# --- measurement ------------------------------------------------------------------------


@pytest.mark.skipif(not harness.cpu_peak_supported(), reason="needs /proc peak-RSS reset (Linux)")
def test_cpu_peak_rss_sees_what_a_call_allocates():
    def hold_32mb():
        x = torch.ones(8 * 2**20)  # 32 MiB
        return x.sum()

    def stream_1mb():  # 1 MiB at a time: peak ~1 MiB, not 32
        return sum(torch.ones(2**18).sum() for _ in range(32))

    hold_32mb(), stream_1mb()
    _, held = harness.cpu_peak_bytes(hold_32mb)
    _, streamed = harness.cpu_peak_bytes(stream_1mb)
    assert 30 * 2**20 < held < 40 * 2**20
    assert streamed < 6 * 2**20


def test_record_arithmetic():
    """×floor, ×3 GEMM and TFLOP/s come from the record's own numbers (6·n_valid·H·V per fwd+bwd)."""
    opts = harness.RunOptions("quick", CPU, torch.float32, ["reference"], env={"device": "cpu"})
    case = Case("tiny", 2, 16)
    rec = harness.finish_record(
        harness.base_record(case, "reference", opts, 40),
        {"status": "ok", "fwd_bwd_ms": 2.0, "fwd_ms": 1.0},
        {"n_valid": 40, "gemm_ms": 0.125, "floor_ms": 0.5, "accuracy": True},
    )
    assert rec["floor_ratio"] == 4.0
    assert rec["floor6_ratio"] == pytest.approx(2.0 / 0.375)
    assert rec["tflops"] == pytest.approx(6 * 40 * 32 * 512 / 2e-3 / 1e12)
    assert set(harness.RECORD_FIELDS) <= set(rec)


# --- the CLI, end to end ----------------------------------------------------------------


def test_cli_writes_every_field(tmp_path):
    """``python -m benchmarks`` on the smoke preset: JSON with every field, skipped records
    with reasons, and a table and plot made from those records."""
    cmd = [
        sys.executable, "-m", "benchmarks", "--preset", "smoke", "--out", str(tmp_path), "--name", "smoke",
        "--providers", "alphapo-torch,reference,alphapo-triton,cce,trl-fused", "--no-progress", "--cpu-time-s", "0.05",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    records = json.loads((tmp_path / "smoke.json").read_text())
    cases = preset_cases("smoke")
    names = ["alphapo-torch", "reference", "alphapo-triton", "cce", "trl-fused"]
    assert len(records) == sum(len(harness.providers_for(c, names)) for c in cases)
    for rec in records:
        missing = set(harness.RECORD_FIELDS) - set(rec)
        assert not missing, f"{rec['provider']}: missing {missing}"
        assert rec["commit"] and rec["torch"] == torch.__version__ and rec["device"].startswith("CPU")
        if rec["provider"] in ("alphapo-torch", "reference", "trl-fused"):
            assert rec["status"] == "ok", rec["reason"]
            assert 0 < rec["fwd_ms"] and rec["fwd_bwd_p20_ms"] <= rec["fwd_bwd_ms"] <= rec["fwd_bwd_p80_ms"]
            assert rec["floor_ms"] == pytest.approx(4 * rec["gemm_ms"]) and rec["tflops"] > 0 and rec["peak_mem_mb"] >= 0
            assert rec["path"] == {"alphapo-torch": "pair-chunked", "reference": "materialised",
                                   "trl-fused": "recompute"}[rec["provider"]]
            if rec["group"] == "main":
                assert rec["grad_h_rel_err"] < 1e-4 and rec["grad_w_rel_err"] < 1e-4 and rec["loss_rel_err"] < 1e-4
        elif not torch.cuda.is_available():
            assert rec["status"] == "skipped" and rec["reason"], rec
    md = (tmp_path / "smoke.md").read_text()
    assert md == report.markdown(records, title="AlphaPO loss benchmark — smoke"), "the table is made from the JSON"
    ok = next(r for r in records if r["status"] == "ok" and r["group"] == "main")
    assert report._ms(ok["fwd_bwd_ms"]) in md
    assert "Skipped: alphapo-triton" in md
    pytest.importorskip("matplotlib")
    assert (tmp_path / "smoke.png").stat().st_size > 1000


def test_peak_memory_tool_reports_each_provider(capsys):
    """``python -m benchmarks.peak_memory``: one JSON line per provider, each from its own process."""
    from benchmarks import peak_memory

    peak_memory.main(["--H", "32", "--V", "512", "--B", "1", "--T", "16", "--providers", "alphapo-torch,reference",
                      "--threads", "1"])
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [r["provider"] for r in lines] == ["alphapo-torch", "reference"]
    for r in lines:
        assert "error" not in r, r
        assert r["extra_mb"] >= 0 and r["with_grads_mb"] >= r["extra_mb"] and r["commit"]
    assert lines[0]["path"] == "pair-chunked" and lines[1]["path"] == "materialised"


def test_interleaved_cpu_timing_round_robin():
    """--interleave: the providers' fwd+bwd re-timed round-robin in one process."""
    opts = harness.RunOptions("smoke", CPU, torch.float32, ["alphapo-torch", "reference"], isolate=False,
                              cpu_budget_s=0.01, interleave_rounds=4, env={"device": "cpu"})
    records = harness.run([Case("tiny", 2, 16)], opts)
    assert [r["provider"] for r in records] == ["alphapo-torch", "reference"]
    for r in records:
        assert r["status"] == "ok" and r["timing"] == "interleaved, 4 rounds"
        assert 0 < r["fwd_bwd_min_ms"] <= r["fwd_bwd_p20_ms"] <= r["fwd_bwd_ms"] <= r["fwd_bwd_p80_ms"]
