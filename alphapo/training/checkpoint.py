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

Every checkpoint carries ``checksums.sha256`` (``sha256sum -c`` reads it), verified before
anything loads: a truncated or bit-flipped file is named with its path instead of loading
as garbage (a same-size corruption of ``model.safetensors`` used to train NaN weights).
Resuming a run directory takes its latest checkpoint or, when that one is missing or
damaged, the newest intact one before it, and says so; a damaged checkpoint asked for by
name is refused, with the newest intact one offered.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
from pathlib import Path

import torch

from . import parallel as P


class CheckpointError(ValueError):
    """A checkpoint or run directory that cannot be resumed from; the message names the path."""


# ----------------------------------------------------------------------------------------
# Run directories
#
# A directory holds one run. A run refuses a directory that holds another one (its files
# would be overwritten and its checkpoints rotated away), unless --overwrite asks for
# exactly that; and it claims its directory atomically, once data and model have loaded:
# a fresh one with mkdir (exactly one process creates a given name), an explicit one by
# creating config.json exclusively. Two runs started together never share a directory.

# What a run writes into its directory; a directory with any of these holds a run, or
# another program's files of the same names, which --overwrite must not delete.
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "plot.png", "latest", "checkpoints")
# Knobs every run's config.json holds: what tells it from another program's config.json.
RUN_CONFIG_KEYS = ("alpha", "beta", "max_steps", "out_dir", "resume")


def run_of(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint belongs to (``<run>/checkpoints/step-N``), or None."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


def holds_run(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in RUN_FILES)


def is_run(path: Path) -> bool:
    """Whether ``path`` is an alphapo-train run: its ``config.json``, ``latest`` or checkpoints say so."""
    try:
        config = json.loads((path / "config.json").read_text())
        if isinstance(config, dict) and all(key in config for key in RUN_CONFIG_KEYS):
            return True
    except (OSError, ValueError):
        pass
    return _read_latest(path)[0] is not None or any((p / "trainer_state.json").is_file() for p in _checkpoints(path))


def describe_run(path: Path) -> str:
    steps = sorted(_step_of(p) for p in (path / "checkpoints").glob("step-*") if _step_of(p) is not None)
    return f"checkpoints up to step {steps[-1]}" if steps else "no checkpoint"


def check_run_dir(run_dir: Path | None, resumed: Path | None, overwrite: bool) -> None:
    """Refuse, before anything loads, a directory whose run this one would destroy.

    ``resumed``: the run directory being resumed, which this run continues in place.
    """
    if run_dir is None:
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"--out-dir {run_dir}: exists and is not a directory")
    same = resumed is not None and run_dir.resolve() == resumed.resolve()
    if same and overwrite:
        raise CheckpointError(f"--overwrite would delete {run_dir}, the run being resumed; leave it out to "
                              "continue that run, or give a new --out-dir")
    # A checkpoint, or a run's checkpoints/, is part of a run: writing a run into it would
    # replace the checkpoint's own config.json (and --overwrite delete it).
    if _is_checkpoint(run_dir) or (run_dir.name == "checkpoints" and is_run(run_dir.parent)):
        checkpoint = _is_checkpoint(run_dir)
        what = "a checkpoint" if checkpoint else f"the checkpoints directory of the run {run_dir.parent}"
        raise CheckpointError(f"--out-dir {run_dir} is {what}, not a run directory: choose another --out-dir "
                              f"(to continue from it: --resume {run_dir if checkpoint else run_dir.parent})")
    if holds_run(run_dir) and not same and not is_run(run_dir):
        found = ", ".join(name for name in RUN_FILES if (run_dir / name).exists())
        raise CheckpointError(
            f"--out-dir {run_dir} holds {found}, but not an alphapo-train run: its files would be "
            f"{'deleted (--overwrite replaces only a run)' if overwrite else 'overwritten'}; choose another "
            "--out-dir, or an empty one")
    if holds_run(run_dir) and not same and not overwrite:
        resumable = any(True for _ in _checkpoints(run_dir))
        raise CheckpointError(
            f"--out-dir {run_dir} already holds a run ({describe_run(run_dir)}"
            f"{'' if resumable else ': it stopped before its first checkpoint, so there is nothing to resume'}): "
            f"{f'continue it with --resume {run_dir}, ' if resumable else ''}choose another --out-dir, or pass "
            "--overwrite to replace it (its checkpoints and metrics are deleted)")


def claim_run_dir(run_dir: Path | None, resumed: Path | None, overwrite: bool, config: dict,
                  root: str = "runs") -> Path:
    """Create or take the run's directory, atomically, and write ``config.json`` into it.

    ``run_dir`` None: a fresh ``<root>/alphapo-<date>-<time>[-N]``. A directory that gained
    a run since :func:`check_run_dir` (another process took it meanwhile) is refused.
    """
    text = json.dumps(config, indent=1)
    if run_dir is None:
        run_dir = _fresh_run_dir(Path(root))
    elif resumed is not None and run_dir.resolve() == resumed.resolve():
        _replace_file(run_dir / "config.json", text)  # the run's config from this step on
        return run_dir
    else:
        check_run_dir(run_dir, resumed, overwrite)
        run_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for name in RUN_FILES:
                target = run_dir / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    try:
        with open(run_dir / "config.json", "x") as f:  # "x": exactly one run creates it
            f.write(text)
    except FileExistsError:
        raise CheckpointError(f"--out-dir {run_dir} already holds a run: another run took it while this one "
                              "was loading; choose another --out-dir") from None
    return run_dir


# One process per run directory: a run holds an exclusive flock on <run>/.lock from before
# it loads until it ends. The kernel drops the lock when the process ends, however it ends
# (Ctrl-C, SIGKILL, a crash), so a lock is never stale. Without it two `--resume R` at once
# both trained in R, interleaving their metrics and checkpoints and rotating away the
# checkpoint the other was loading, and both exited 0.
LOCK = ".lock"


def lock_run_dir(run_dir: Path):
    """Hold ``run_dir`` for this process: an open file whose closing releases it (a context manager).

    Raises :class:`CheckpointError` if another process holds it. Where ``fcntl`` is missing
    (Windows) nothing is locked and None is returned.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: the exclusive claim of config.json still holds
        return None
    lock = open(run_dir / LOCK, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip()
        lock.close()
        raise CheckpointError(f"{run_dir} is in use by another alphapo-train process"
                              f"{f' (pid {holder})' if holder.isdigit() else ''}: wait for it to end, or give this "
                              "run another --out-dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def newer_checkpoints(run_dir: Path, step: int) -> list[str]:
    """The checkpoints of ``run_dir`` past ``step``: left by the run before it was resumed earlier."""
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step-*") if (_step_of(p) or 0) > step)


def _fresh_run_dir(root: Path) -> Path:
    stamp = time.strftime("alphapo-%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    for n in itertools.count():
        path = root / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            path.mkdir()  # atomic: of two runs in the same second, one gets -1
            return path
        except FileExistsError:
            continue


def _replace_file(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file and a rename: readers see the old or the new text."""
    tmp = path.with_name(f".{path.name}-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _step_of(path: Path) -> int | None:
    """N of a ``step-N`` checkpoint directory."""
    name = path.name
    return int(name[5:]) if name.startswith("step-") and name[5:].isdigit() and path.is_dir() else None


# ----------------------------------------------------------------------------------------
# Saving


def save_checkpoint(run_dir: Path, wrapper, tokenizer, optimizer, scheduler, par: P.Parallel, *, step: int,
                    nonfinite: int, config: dict, changes: list[dict], data: dict, keep_last: int) -> Path:
    """Checkpoint ``step`` into ``run_dir/checkpoints/step-N`` and point ``latest`` at it.

    ``config``: the knobs in force; ``changes``: the run's knob changes on resume so far;
    ``data``: the SHA-256 of its data files (all three go into ``trainer_state.json``, which
    a resume reads).
    """
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
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "config": config, "changes": changes,
                                                        "data": data}, indent=1))
    write_checksums(tmp)  # last: a checkpoint with checksums is a complete one
    old = ckpt_root / f".old-{final.name}-{os.getpid()}"
    if final.exists():  # the same step saved again (a resumed run): move the old one aside first
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    _replace_file(run_dir / "latest", f"checkpoints/{final.name}\n")
    # Rotation deletes only checkpoints older than this one, never the one `latest` names;
    # newer ones (from before a resume at an earlier checkpoint) are replaced as the run
    # reaches their step.
    for old in _checkpoints(run_dir, below=step)[keep_last - 1 :]:  # newest first
        shutil.rmtree(old)
    P.barrier(par)
    return final


# ----------------------------------------------------------------------------------------
# Finding and loading


def find_checkpoint(path) -> tuple[Path, list[str]]:
    """The checkpoint to resume from, and notes on what was passed over on the way there.

    ``path`` is a checkpoint directory, which must be intact, or a run directory: its
    ``latest`` checkpoint, or the newest intact one before it when that is missing or
    damaged (the notes say which, and why).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"--resume {path}: no such directory")
    if _is_checkpoint(path):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            run = run_of(path)
            intact = _newest_intact(run, below=_step_of(path)) if run is not None else None
            offer = (f"; the newest intact checkpoint before it is {intact}: --resume {intact}" if intact else
                     "; no intact checkpoint before it")
            raise CheckpointError(f"--resume {path}: {e}{offer}") from None
        return path, []
    if not ((path / "latest").is_file() or (path / "checkpoints").is_dir()):
        raise CheckpointError(f"--resume {path}: neither a checkpoint (trainer_state.pt) nor a run directory "
                              "(latest, checkpoints/)")
    latest, problem = _read_latest(path)
    notes = [problem] if problem else []
    if latest is not None and not latest.is_dir():
        notes.append(f"latest names {os.path.relpath(latest, path)}, which does not exist")
    below = _step_of(latest) if latest is not None and latest.is_dir() else None
    candidates = ([latest] if below is not None else []) + _checkpoints(path, below=below)
    for ckpt in candidates:
        try:
            verify_checkpoint(ckpt)
        except CheckpointError as e:
            notes.append(str(e))
            continue
        if notes:
            notes.append(f"resuming from {os.path.relpath(ckpt, path)}, the newest intact checkpoint")
        return ckpt, notes
    found = "; ".join(notes) or "no checkpoint was written"
    raise CheckpointError(f"--resume {path}: no intact checkpoint to resume from ({found})")


def _is_checkpoint(path: Path) -> bool:
    return any((path / name).is_file() for name in (CHECKSUMS, "trainer_state.pt", "trainer_state.json"))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names, if it exists."""
    latest = _read_latest(run_dir)[0]
    return latest if latest is not None and latest.is_dir() else None


def _read_latest(run_dir: Path) -> tuple[Path | None, str | None]:
    """The checkpoint ``latest`` names, and what is wrong with ``latest`` if anything.

    Only a ``checkpoints/step-N`` of this run counts: a ``latest`` edited to name another
    run's checkpoint would have this run continue, unseen, in that one.
    """
    path = run_dir / "latest"
    if not path.exists():
        return None, None
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{path}: unreadable ({type(e).__name__}); ignored"
    name = text[len("checkpoints/"):] if text.startswith("checkpoints/") else ""
    if not (name.startswith("step-") and name[5:].isdigit()):
        shown = text if len(text) < 80 else text[:77] + "..."
        return None, f"{path} holds {shown!r}, not a checkpoint of this run (checkpoints/step-N); ignored"
    return run_dir / "checkpoints" / name, None


def _checkpoints(run_dir: Path, below: int | None = None) -> list[Path]:
    """The run's ``step-N`` checkpoints, newest first; only those before step ``below`` if given."""
    found = [(_step_of(p), p) for p in (run_dir / "checkpoints").glob("step-*")]
    return [p for step, p in sorted(found, reverse=True) if step is not None and (below is None or step < below)]


def _newest_intact(run_dir: Path, below: int | None) -> Path | None:
    for ckpt in _checkpoints(run_dir, below):
        try:
            verify_checkpoint(ckpt)
            return ckpt
        except CheckpointError:
            continue
    return None


def clean_incomplete(run_dir: Path) -> list[str]:
    """Remove what a save killed halfway left behind (its temporary directory, a half-replaced file)."""
    leftovers = [*(run_dir / "checkpoints").glob(".tmp-step-*"), *(run_dir / "checkpoints").glob(".old-step-*"),
                 *run_dir.glob(".latest-*"), *run_dir.glob(".config.json-*")]
    for path in leftovers:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return sorted(p.name for p in leftovers)


# ----------------------------------------------------------------------------------------
# Checksums: one SHA-256 per file, written last, verified before a checkpoint is loaded.

CHECKSUMS = "checksums.sha256"
_verified: set[tuple] = set()  # checkpoints verified by this process, as (path, files' size and mtime)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(ckpt: Path) -> None:
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    lines = [f"{sha256_file(p)}  {p.relative_to(ckpt).as_posix()}\n" for p in files]
    (ckpt / CHECKSUMS).write_text("".join(lines))


def verify_checkpoint(ckpt: Path) -> None:
    """Raise :class:`CheckpointError` naming the first file of ``ckpt`` that is missing or damaged.

    A checkpoint written before checksums existed has only its required files checked
    here; its loaders name the file if one fails.
    """
    for name in ("trainer_state.pt", "trainer_state.json"):
        if not (ckpt / name).is_file():
            raise CheckpointError(f"{ckpt / name}: missing, so {ckpt} is incomplete")
    manifest = ckpt / CHECKSUMS
    if not manifest.is_file():
        return
    key = (str(ckpt.resolve()), *((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(ckpt.iterdir())))
    if key in _verified:  # hashing a large model twice (config, then training) costs seconds
        return
    try:
        entries = [line.split("  ", 1) for line in manifest.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{manifest}: unreadable ({e})") from None
    if not entries or any(len(entry) != 2 or len(entry[0]) != 64 for entry in entries):
        raise CheckpointError(f"{manifest}: damaged (not lines of '<sha256>  <file>')")
    for digest, name in entries:
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {manifest.name})")
        if sha256_file(path) != digest:
            raise CheckpointError(f"{path}: damaged (its SHA-256 differs from the one written with the checkpoint)")
    _verified.add(key)


# ----------------------------------------------------------------------------------------
# Loading


def saved_run(checkpoint: Path) -> dict:
    """``trainer_state.json``: the checkpoint's ``step``, the ``config`` it was trained with, the
    ``changes`` of knobs made on resume before it and the SHA-256 of its ``data`` files (empty
    for a checkpoint written before they were recorded)."""
    path = checkpoint / "trainer_state.json"
    try:
        saved = json.loads(path.read_text())
        return {"step": int(saved["step"]), "config": dict(saved["config"]), "changes": saved.get("changes", []),
                "data": dict(saved.get("data", {}))}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def saved_config(checkpoint: Path) -> dict:
    """The knob values the checkpoint's run was trained with."""
    return saved_run(checkpoint)["config"]


def load_trainer_state(checkpoint: Path) -> dict:
    path = checkpoint / "trainer_state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # whatever torch.load raises on a bad file: name the file
        raise CheckpointError(f"{path}: does not load ({type(e).__name__}: {e})") from e


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
