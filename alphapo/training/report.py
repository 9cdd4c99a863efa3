"""What a run tells: the metrics file, the progress on screen, the plot and the summary.

``metrics.jsonl`` gets one JSON record per ``--log-every`` steps (training metrics averaged
over the interval, TRL's names) and one per held-out evaluation (``eval_`` names); every
rank keeps the records in memory, rank 0 alone writes them. At the end the records become
``plot.png`` and ``summary.json``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch

from . import parallel as P

# ----------------------------------------------------------------------------------------
# The metrics file


class MetricsLog:
    """``metrics.jsonl`` and its records in memory (every rank keeps them, for its summary)."""

    def __init__(self, path: Path, par: P.Parallel, history: list[dict] | None = None):
        self.path, self.par = path, par
        self.history: list[dict] = history or []

    @classmethod
    def start(cls, run_dir: Path, par: P.Parallel, resumed: Path | None = None, step: int = 0,
              log=print) -> "MetricsLog":
        """A fresh file, or, resuming, the records up to ``step`` of the resumed run's.

        A crashed run may have logged past its last checkpoint: those records are dropped,
        and the resumed run logs them again. So are knob changes made at ``step`` by an
        earlier resume from the same checkpoint (this resume records its own), and a line
        that is not a record (a write cut short by the crash), with a warning.
        """
        path = run_dir / "metrics.jsonl"
        history = []
        if resumed is not None and (resumed / "metrics.jsonl").is_file():
            source = resumed / "metrics.jsonl"
            for line_no, line in enumerate(source.read_text().splitlines(), 1):
                try:
                    record = json.loads(line)
                    keep = record["step"] < step or (record["step"] == step and "config_change" not in record)
                except (ValueError, TypeError, KeyError):
                    log(f"warning: {source}: line {line_no} is not a JSON record (a write cut short?); dropped")
                    continue
                if keep:
                    history.append(record)
        P.barrier(par)  # every rank has read the records before rank 0 rewrites them
        if par.is_main:
            path.write_text("".join(json.dumps(r) + "\n" for r in history))
        return cls(path, par, history)

    def record(self, entry: dict) -> None:
        self.history.append(entry)
        if self.par.is_main:
            with self.path.open("a") as f:
                f.write(json.dumps(entry) + "\n")


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


# ----------------------------------------------------------------------------------------
# Progress on screen


class Progress:
    """What the run shows while it trains: a progress bar on a terminal, otherwise a plain line
    about every twentieth of the run (redrawn into a log file, a bar is hundreds of lines).

    Messages print through the bar while it is drawn, so that it stays on one line.
    """

    def __init__(self, cfg, step: int, log, par: P.Parallel):
        from tqdm.auto import tqdm

        self.log, self.max_steps, self.last = log, cfg.max_steps, step
        self.shown = cfg.progress and par.is_main
        # The bar writes to stderr and the messages to stdout: both must be a terminal.
        self.terminal = self.shown and log is print and sys.stdout.isatty() and sys.stderr.isatty()
        self.every = max(cfg.log_every, math.ceil(cfg.max_steps / 20))
        # A terminal that reports no size (a fresh pseudo-terminal is 0 x 0: CI runners,
        # `script`, Python's pty) gets a fixed 80 x 24: tqdm draws a bar sized 0 x 0 as nothing.
        sized = self.terminal and min(_size(sys.stderr)) > 0
        fixed = {} if sized else {"ncols": 80, "nrows": 24}
        self.bar = tqdm(total=cfg.max_steps, initial=step, disable=not self.terminal, dynamic_ncols=sized,
                        desc="train", **fixed)

    def step(self, entry: dict | None = None) -> None:
        """One step done; ``entry``: its training record, if one was logged."""
        self.bar.update(1)
        if entry is None or "loss" not in entry or not self.shown:
            return
        if self.terminal:
            self.bar.set_postfix(loss=f"{entry['loss']:.3f}", acc=f"{entry['rewards/accuracies']:.2f}",
                                 margin=f"{entry['rewards/margins']:.2f}")
        elif entry["step"] - self.last >= self.every or entry["step"] == self.max_steps:
            self.last = entry["step"]
            self.log(f"step {entry['step']}/{self.max_steps}: loss {entry['loss']:.3f}, reward accuracy "
                     f"{entry['rewards/accuracies']:.1%}, margin {entry['rewards/margins']:.2f}, "
                     f"{entry['tokens_per_s']:,.0f} tokens/s, lr {entry['lr']:.3g}")

    def say(self, message: str) -> None:
        self.bar.write(message) if self.terminal else self.log(message)

    def close(self) -> None:
        self.bar.close()


def _size(stream) -> tuple[int, int]:
    """(columns, rows) of the terminal ``stream`` writes to; 0 for what it does not report."""
    try:
        return tuple(os.get_terminal_size(stream.fileno()))
    except (OSError, ValueError, AttributeError):
        return 0, 0


# ----------------------------------------------------------------------------------------
# Plot and summary


def plot_metrics(history: list[dict], path, title: str = "") -> None:
    """Loss, reward margin and chosen/rejected log-probs over steps (train and held-out).

    The third panel is the likelihood-displacement picture: a preference loss only asks
    chosen to beat rejected, and the chosen log-prob may fall while it does.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in history if "loss" in r]
    held = [r for r in history if "eval_loss" in r]

    def series(rows, key):
        return [r["step"] for r in rows if key in r], [r[key] for r in rows if key in r]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("loss", "loss"), ("rewards/margins", "reward margin (β·Δf)"), (None, "log-prob per token"))
    for ax, (key, label) in zip(axes, panels):
        if key is None:
            for name, color in (("logps/chosen", "tab:green"), ("logps/rejected", "tab:red")):
                ax.plot(*series(train, name), color=color, alpha=0.35, lw=1, label=f"{name} (train)")
                ax.plot(*series(held, "eval_" + name), color=color, marker="o", ms=3, label=f"{name} (held-out)")
            if held:
                ax.axhline(held[0]["eval_logps/chosen"], color="gray", ls=":", lw=1, label="chosen at start")
        else:
            ax.plot(*series(train, key), color="tab:blue", alpha=0.6, lw=1, label="train")
            ax.plot(*series(held, "eval_" + key), color="tab:orange", marker="o", ms=3, label="held-out")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if held:
        before, after = held[0]["eval_rewards/accuracies"], held[-1]["eval_rewards/accuracies"]
        acc = f"held-out accuracy {before:.0%} → {after:.0%}"
        title = f"{title}   ({acc})" if title else acc
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_title(cfg, changes: list[dict]) -> str:
    """``AlphaPO, alpha = 0.25``, with each change of alpha on resume after it."""
    alphas = [c for c in changes if c["knob"] == "alpha"]
    first = alphas[0]["from"] if alphas else cfg.alpha
    return f"AlphaPO, alpha = {first}" + "".join(f", {c['to']} from step {c['step']}" for c in alphas)


def summarize(history: list[dict], run_dir: Path, cfg, seconds: float, changes: list[dict] = (),
              resumed_at: int | None = None) -> dict:
    """The run's figures (``summary.json``): ``steps`` in all, ``steps_this_run`` and ``seconds``
    of this invocation (``resumed_at``: the step it resumed at, None for a fresh run)."""
    held = [r for r in history if "eval_loss" in r]
    first, last = held[0], held[-1]
    peak = max(held, key=lambda r: r["eval_logps/chosen"])  # displacement shows as a fall from here
    latest = (run_dir / "latest").read_text().strip() if (run_dir / "latest").is_file() else None
    return {
        "run_dir": str(run_dir),
        "steps": last["step"],
        "steps_this_run": last["step"] - (resumed_at or 0),
        "resumed_at": resumed_at,
        "seconds": round(seconds, 1),
        "alpha": cfg.alpha,  # at the end: see "changes"
        "eval_pairs": last["eval_pairs"],
        "accuracy_before": first["eval_rewards/accuracies"],
        "accuracy_after": last["eval_rewards/accuracies"],
        "chosen_logps_before": first["eval_logps/chosen"],
        "chosen_logps_after": last["eval_logps/chosen"],
        "chosen_logps_drift": last["eval_logps/chosen"] - first["eval_logps/chosen"],
        "chosen_logps_peak": peak["eval_logps/chosen"],
        "chosen_logps_peak_step": peak["step"],
        "rejected_logps_before": first["eval_logps/rejected"],
        "rejected_logps_after": last["eval_logps/rejected"],
        "rejected_logps_drift": last["eval_logps/rejected"] - first["eval_logps/rejected"],
        "margin_after": last["eval_rewards/margins"],
        "checkpoint": str(run_dir / latest) if latest else None,
        "plot": str(run_dir / "plot.png") if cfg.plot else None,
        "changes": list(changes),  # knobs changed on resume: [{"step", "knob", "from", "to"}]
    }


def print_summary(s: dict, log=print) -> None:
    log("")
    if s["resumed_at"] is None:
        log(f"done: {s['steps']} steps in {s['seconds']:.0f} s")
    elif s["steps_this_run"]:
        log(f"done: {s['steps_this_run']} steps in this run (steps {s['resumed_at'] + 1}-{s['steps']}, resumed at "
            f"step {s['resumed_at']}; {s['steps']} in all) in {s['seconds']:.0f} s")
    else:
        log(f"done: nothing to train: the run is at step {s['steps']} of --max-steps {s['steps']} (raise "
            "--max-steps to go on)")
    log(f"  held-out reward accuracy  {s['accuracy_before']:6.1%} -> {s['accuracy_after']:6.1%}"
        f"   ({s['eval_pairs']} pairs; chance is 50%)")
    log(f"  chosen log-prob / token   {s['chosen_logps_before']:7.3f} -> {s['chosen_logps_after']:7.3f}"
        f"   (drift {s['chosen_logps_drift']:+.3f}; highest {s['chosen_logps_peak']:.3f} at step "
        f"{s['chosen_logps_peak_step']})")
    log(f"  rejected log-prob / token {s['rejected_logps_before']:7.3f} -> {s['rejected_logps_after']:7.3f}"
        f"   (drift {s['rejected_logps_drift']:+.3f})")
    if s["changes"]:
        log("  changed on resume         " + "; ".join(f"{c['knob']} {c['from']} -> {c['to']} from step {c['step']}"
                                                       for c in s["changes"]))
    outputs = ["metrics.jsonl", "summary.json"] + (["plot.png"] if s["plot"] else [])
    if s["checkpoint"]:
        outputs.append(os.path.relpath(s["checkpoint"], s["run_dir"]) + "/ (model, tokenizer, optimizer)")
    log(f"  outputs in {s['run_dir']}/: " + ", ".join(outputs))
