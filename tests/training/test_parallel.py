"""Data parallelism in the trainer (alphapo/training/parallel.py): DDP and FSDP2 on 2 gloo ranks.

One pair of worker processes (this file run as a script, meeting through a FileStore: no
network) trains the built-in tiny model three times with ``alphapo.training.train``: under
DDP, under FSDP2, and under FSDP2 interrupted after its first checkpoint and resumed
through the command line. The tests compare what the runs wrote against one process
training on the whole batch: the same parameters (within float32 reduction-order
rounding), the same logged losses and held-out metrics. Then ``torchrun`` itself
(``python -m torch.distributed.run``, on 127.0.0.1) runs the trainer end to end.

Every optimizer step sees 2 micro-batches (``grad_accum=2``) of 8 pairs, 4 per rank, so
DDP's skipped all-reduce on the first micro-batch (``no_sync``) is exercised too; the
held-out set has 33 pairs in batches of 16, so its last batch (1 pair) leaves rank 1 with
no pair: it runs a stand-in with weight 0.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

import alphapo.training.modeling as modeling
import alphapo.training.parallel as P
from alphapo.training import build, cli, loop
from alphapo.training.config import TrainConfig
from alphapo.training.tokenizer import load_tokenizer

WORLD = 2
COLLECTIVE_TIMEOUT_S = 60  # a desynchronised collective fails after this instead of hanging
WORKERS_TIMEOUT_S = 150  # the whole worker pair, start-up included
TINY = dict(train_size=96, eval_size=33, n_layer=1, n_embd=32, n_head=2, batch_size=8, grad_accum=2,
            eval_batch_size=16, max_steps=4, warmup_steps=2, eval_every=2, save_every=2, log_every=1,
            progress=False, plot=False)
JOBS = ("ddp", "fsdp", "fsdp-cut", "ddp-nll")
NLL = {"nll_weight": 0.5}  # the ddp-nll job's loss: with the chosen tokens' NLL
# Both runs are float32 with the same data: they differ only in the order of the sums
# (two half-batch backwards and the ranks' all-reduce vs one whole-batch backward).
ATOL, RTOL = 2e-5, 1e-4


def quiet(*args):
    pass


class Interrupt(Exception):
    pass


def params_of(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / (run_dir / "latest").read_text().strip() / "model.safetensors")


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- worker side


def run_job(job: str, out: Path, rank: int) -> dict:
    """One training run on this rank; what the test needs besides the run directory."""
    cfg = TrainConfig(**TINY, **(NLL if job.endswith("nll") else {}), parallel=job.split("-")[0],
                      out_dir=str(out / job))
    info = {}
    if job == "fsdp":
        # What the fused loss reads under FSDP: the whole lm_head weight, not a DTensor shard.
        seen, forward = set(), modeling.AlphaPOLoss.forward

        def spy(self, weight, *args, **kwargs):
            from torch.distributed.tensor import DTensor

            seen.add((isinstance(weight, DTensor), tuple(weight.shape)))
            return forward(self, weight, *args, **kwargs)

        modeling.AlphaPOLoss.forward = spy
        try:
            loop.train(cfg, log=quiet)
        finally:
            modeling.AlphaPOLoss.forward = forward
        info["loss_weights"] = sorted(seen)
    elif job == "fsdp-cut":
        # Both ranks stop in the forward of step 4's first micro-batch (training forward 7),
        # after the checkpoint at step 2; then resume from the run directory, as a user would.
        calls, real = {"n": 0}, modeling.fused_forward

        def crash(lm, *args, **kwargs):
            if lm.training:
                calls["n"] += 1
                if calls["n"] == 7:
                    raise Interrupt()
            return real(lm, *args, **kwargs)

        modeling.fused_forward = crash
        try:
            loop.train(cfg, log=quiet)
            raise AssertionError("the run was not interrupted")
        except Interrupt:
            pass
        finally:
            modeling.fused_forward = real
        run = out / job
        info["latest_after_crash"] = (run / "latest").read_text().strip() if rank == 0 else None
        info["steps_logged_after_crash"] = max(r["step"] for r in records(run)) if rank == 0 else None
        torch.distributed.barrier()  # rank 0 has looked before anyone resumes
        assert cli.main(["--resume", str(run), "--no-progress"]) == 0
    else:
        loop.train(cfg, log=quiet)
    return info


def worker_main(rank: int, store_path: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.FileStore(store_path, WORLD)
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=timeout)
    results = {}
    try:
        for job in JOBS:
            t0 = time.time()
            try:
                results[job] = run_job(job, Path(out), rank)
                results[job]["seconds"] = time.time() - t0
            except Exception:
                results[job] = {"error": f"rank {rank}:\n{traceback.format_exc()}"}
                break  # the ranks' collectives are out of step after a failure
    finally:
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- test side


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The worker pair's runs, and the single-process runs on the same data (trained
    here while the workers run). Returns run directories by name and each rank's info."""
    out = tmp_path_factory.mktemp("ddp")
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    procs = [
        subprocess.Popen([sys.executable, __file__, str(rank), str(out / "store"), str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
        for rank in range(WORLD)
    ]
    try:
        # The reference: one process, the whole batch. The control: one process, half of it.
        loop.train(TrainConfig(**TINY, out_dir=str(out / "single")), log=quiet)
        loop.train(TrainConfig(**TINY, **NLL, out_dir=str(out / "single-nll")), log=quiet)
        loop.train(TrainConfig(**{**TINY, "batch_size": 4}, out_dir=str(out / "half")), log=quiet)
        logs = [proc.communicate(timeout=WORKERS_TIMEOUT_S)[0] for proc in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"data-parallel workers still running after {WORKERS_TIMEOUT_S} s (deadlock?)")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    info = []
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        result = out / f"rank{rank}.json"
        if proc.returncode != 0 or not result.exists():
            pytest.fail(f"worker rank {rank} exited with {proc.returncode}:\n{log}")
        info.append(json.loads(result.read_text()))
    for rank, results in enumerate(info):
        errors = [r["error"] for r in results.values() if "error" in r]
        assert not errors, errors[0]
        assert list(results) == list(JOBS), f"rank {rank} ran {list(results)}"
    return {"dirs": {name: out / name for name in ("single", "single-nll", "half", *JOBS)}, "info": info}


def assert_params_close(got: dict, want: dict, what: str, atol=ATOL, rtol=RTOL):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=rtol, msg=lambda m: f"{what} {name}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_with_half_the_batch_match_one_process(runs, mode):
    """Same parameters after 4 steps, same logged losses and held-out metrics (averaged over ranks)."""
    dirs = runs["dirs"]
    single = params_of(dirs["single"])
    assert_params_close(params_of(dirs[mode]), single, mode)

    # Not vacuous: the run moved the weights, and a run on half the data lands elsewhere.
    cfg = TrainConfig(**TINY)
    tokenizer = load_tokenizer("")
    init = build.build_model(cfg, tokenizer, torch.device("cpu"), None).lm.state_dict()
    assert max(float((single[k] - init[k]).abs().max()) for k in single) > 100 * ATOL
    half = params_of(dirs["half"])
    assert max(float((half[k] - single[k]).abs().max()) for k in single) > 100 * ATOL

    want, got = records(dirs["single"]), records(dirs[mode])
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for w, g in zip(want, got):
        for key in ("loss", "grad_norm", "rewards/accuracies", "rewards/margins", "logps/chosen", "eval_loss",
                    "eval_rewards/accuracies", "eval_logps/chosen", "eval_logps/rejected", "eval_logits/chosen",
                    "eval_pairs"):
            if key in w:
                assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-5), f"step {w['step']} {key}"
    assert got[-1]["eval_pairs"] == TINY["eval_size"]
    # Tokens are counted over both ranks' pairs.
    assert got[1]["tokens_per_s"] > 0 and "loss" in got[1]


@pytest.mark.slow
def test_two_ranks_match_one_process_with_an_nll_term(runs):
    """The NLL term is normalised by the step's chosen tokens over both ranks and both micro-batches
    (nll_num_tokens), so DDP on unequal token counts is the whole batch's gradient, as without it."""
    dirs = runs["dirs"]
    assert_params_close(params_of(dirs["ddp-nll"]), params_of(dirs["single-nll"]), "ddp-nll")
    want, got = records(dirs["single-nll"]), records(dirs["ddp-nll"])
    for w, g in zip(want, got):
        if "loss" in w:
            assert g["loss"] == pytest.approx(w["loss"], rel=1e-4, abs=1e-5), f"step {w['step']}"


@pytest.mark.slow
def test_fsdp_loss_reads_the_whole_lm_head(runs):
    """Inside the FSDP root's forward the fused loss gets the gathered (V, H) weight, not a shard."""
    V = len(load_tokenizer(""))
    for rank, info in enumerate(runs["info"]):
        assert info["fsdp"]["loss_weights"] == [[False, [V, TINY["n_embd"]]]], f"rank {rank}"


@pytest.mark.slow
def test_fsdp_resume_matches_an_uninterrupted_run(runs):
    """Interrupted at step 4 (checkpoint at 2), resumed with 2 ranks: the same parameters and logs."""
    dirs, info = runs["dirs"], runs["info"][0]["fsdp-cut"]
    assert info["latest_after_crash"] == "checkpoints/step-000002" and info["steps_logged_after_crash"] == 3
    # Bit for bit: the same collectives on the same shards, in the same order.
    a, b = params_of(dirs["fsdp-cut"]), params_of(dirs["fsdp"])
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name

    def losses(run):
        return [(r["step"], r.get("loss"), r.get("eval_loss"), r.get("logps/chosen")) for r in records(run)]

    assert losses(dirs["fsdp-cut"]) == losses(dirs["fsdp"])
    # The checkpoint is the single-process format: index-keyed AdamW state, each rank's RNG.
    ckpt = dirs["fsdp-cut"] / "checkpoints" / "step-000004"
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    n_params = len(params_of(dirs["fsdp"]))
    assert sorted(state["optimizer"]["state"]) == list(range(n_params))
    assert len(state["rng_ranks"]) == WORLD


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_runs_the_trainer_end_to_end(tmp_path):
    """``torchrun --nproc_per_node=2 -m alphapo.training`` (FSDP, gloo): one run directory, rank 0's log only."""
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    args = ["--parallel", "fsdp", "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--train-size", "64",
            "--eval-size", "16", "--batch-size", "8", "--eval-batch-size", "8", "--max-steps", "3", "--warmup-steps",
            "1", "--log-every", "1", "--eval-every", "3", "--save-every", "3", "--no-plot", "--no-progress"]
    proc = subprocess.run(launcher + ["-m", "alphapo.training"] + args, cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs
    run = runs[0]
    assert [r["step"] for r in records(run) if "loss" in r] == [1, 2, 3]
    assert (run / "summary.json").is_file() and (run / "checkpoints" / "step-000003" / "model.safetensors").is_file()
    assert proc.stdout.count("done: 3 steps") == 1, output  # rank 0 logs, rank 1 does not
    assert "x 2 (fsdp)" in proc.stdout


# ----------------------------------------------------------------------------- no processes


def fake(rank: int, world_size: int) -> P.Parallel:
    return P.Parallel("ddp", rank, world_size, torch.device("cpu"), owns_group=False)


def test_local_batch_keeps_pairs_together_and_drops_own_padding():
    B, T_ = 3, 7
    lengths = torch.tensor([2, 5, 3, 4, 6, 1])  # rows 0..2 chosen, 3..5 rejected
    mask = (torch.arange(T_) < lengths[:, None]).long()
    batch = {"input_ids": torch.arange(2 * B)[:, None] * 10 + torch.arange(T_), "attention_mask": mask,
             "labels": torch.where(mask.bool(), 1, -100)}
    parts = [P.local_batch(batch, fake(r, 2), even=False) for r in range(2)]
    assert [n for _, n in parts] == [2, 1]
    rows0 = parts[0][0]["input_ids"][:, 0] // 10
    assert rows0.tolist() == [0, 1, 3, 4] and parts[0][0]["input_ids"].shape[1] == 6
    assert parts[1][0]["input_ids"][:, 0].tolist() == [20, 50] and parts[1][0]["labels"].shape[1] == 3
    with pytest.raises(P.ParallelError, match="multiple of 2"):
        P.local_batch(batch, fake(0, 2))
    # More ranks than pairs: rank 3 runs a stand-in (pair 0) that counts for nothing.
    stand_in, n = P.local_batch(batch, fake(3, 4), even=False)
    assert n == 0 and stand_in["input_ids"][:, 0].tolist() == [0, 30]
    assert [P.pair_range(10, fake(r, 4), even=False) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]


def test_setup_refuses_launches_that_cannot_work(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert P.setup("auto", torch.device("cpu")).mode == "none"
    with pytest.raises(P.ParallelError, match="torchrun"):
        P.setup("fsdp", torch.device("cpu"))
    assert cli.main(["--parallel", "ddp", "--out-dir", str(tmp_path / "x"), "--train-size", "64"]) == 1
    assert "launch with torchrun" in capsys.readouterr().err and not (tmp_path / "x").exists()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(P.ParallelError, match="2 processes"):
        P.setup("none", torch.device("cpu"))
    with pytest.raises(P.ParallelError, match="one of"):
        P.setup("zero", torch.device("cpu"))


if __name__ == "__main__":  # a worker: python test_ddp.py RANK STORE_PATH OUT_DIR
    worker_main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
    sys.stdout.flush()
    os._exit(0)  # skip torch's and gloo's interpreter teardown (seconds on 2 cores)
