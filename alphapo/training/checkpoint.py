"""Run directories and checkpoints: model (safetensors) + tokenizer + optimizer, scheduler, RNG, step.

A run directory holds ``config.json``, ``metrics.jsonl``, ``plot.png``, ``summary.json``,
``checkpoints/step-NNNNNN/`` and ``latest``, a one-line file naming the newest complete
checkpoint. Each checkpoint is written into a temporary directory and renamed into place
(a rename is atomic on one filesystem), then ``latest`` is replaced the same way: a crash
at any point leaves the previous checkpoint whole and ``latest`` pointing at a complete
one. The trainer state holds only tensors, numbers and strings, so it loads with
``torch.load(weights_only=True)``: no pickled code runs on resume. Under data parallelism
every rank joins in (FSDP gathers the full model and optimizer state onto rank 0), rank 0
alone writes, and nobody goes on until the checkpoint is complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import torch

from . import parallel as P


class CheckpointError(ValueError):
    """A checkpoint or run directory that cannot be resumed from; the message names the path."""


def fresh_run_dir(root: str = "runs") -> Path:
    stamp = time.strftime("alphapo-%Y%m%d-%H%M%S")
    path, n = Path(root) / stamp, 1
    while path.exists():
        path, n = Path(root) / f"{stamp}-{n}", n + 1
    return path


# ----------------------------------------------------------------------------------------
# Saving


def save_checkpoint(run_dir: Path, wrapper, tokenizer, optimizer, scheduler, step: int, nonfinite: int,
                    cfg, keep_last: int, par: P.Parallel) -> Path:
    model_state = P.full_model_state(wrapper, par)  # None: the model is whole, save_pretrained reads it
    optimizer_state = P.optimizer_state(wrapper, optimizer, par)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    rng_ranks = P.gather(rng, par)
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"step-{step:06d}"
    if not par.is_main:
        P.barrier(par)
        return final
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_root / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    P.unwrap(wrapper).lm.save_pretrained(tmp, state_dict=model_state)
    tokenizer.save_pretrained(tmp)
    state = {"step": step, "nonfinite": nonfinite, "optimizer": optimizer_state,
             "scheduler": scheduler.state_dict(), "rng": rng}
    if par.world_size > 1:
        state["rng_ranks"] = rng_ranks  # each rank's generators, restored rank by rank on resume
    torch.save(state, tmp / "trainer_state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "config": dataclasses.asdict(cfg)}, indent=1))
    if final.exists():  # the same step saved again (a resumed run): move the old one aside first
        old = ckpt_root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        shutil.rmtree(old)
    os.replace(tmp, final)
    latest_tmp = run_dir / f".latest-{os.getpid()}"
    latest_tmp.write_text(f"checkpoints/{final.name}\n")
    os.replace(latest_tmp, run_dir / "latest")
    kept = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    for old in kept[:-keep_last]:
        shutil.rmtree(old)
    P.barrier(par)
    return final


# ----------------------------------------------------------------------------------------
# Finding and loading


def find_checkpoint(path) -> Path:
    """A checkpoint directory, or a run directory's latest checkpoint."""
    path = Path(path)
    if (path / "trainer_state.pt").is_file():
        return path
    if (path / "latest").is_file():
        ckpt = path / (path / "latest").read_text().strip()
        if (ckpt / "trainer_state.pt").is_file():
            return ckpt
    raise CheckpointError(f"--resume {path}: neither a checkpoint (trainer_state.pt) nor a run directory (latest)")


def saved_config(checkpoint: Path) -> dict:
    """The knob values the checkpoint's run was trained with."""
    return json.loads((checkpoint / "trainer_state.json").read_text())["config"]


def load_trainer_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=True)


def restore(checkpoint: Path, wrapper, optimizer, scheduler, par: P.Parallel) -> tuple[int, int]:
    """Optimizer, scheduler and this rank's RNG from the checkpoint; returns ``(step, nonfinite)``.

    (The weights were loaded when the model was built from the checkpoint directory.)
    """
    state = load_trainer_state(checkpoint)
    P.load_optimizer_state(wrapper, optimizer, state["optimizer"], par)
    scheduler.load_state_dict(state["scheduler"])
    rng = state.get("rng_ranks", [state["rng"]])  # each rank's own, if saved by as many ranks
    rng = rng[par.rank] if len(rng) == par.world_size else state["rng"]
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state["step"], state["nonfinite"]
