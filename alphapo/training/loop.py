"""The training loop and the held-out evaluation.

One optimizer step, with the loss inside the model's forward
(:class:`alphapo.training.modeling.AlphaPOModel` hands the final hidden states and the
``lm_head`` weight to the fused loss: no logits are built)::

    batches = micro-batches step * grad_accum ... + grad_accum - 1   # each a pure function of its index
    n = chosen tokens of all of them, all ranks / (grad_accum * R)      # the NLL term's normaliser
    for batch in batches:
        loss, aux = wrapper(**batch, nll_num_tokens=n)                  # (2B, T) ids, mask, labels
        (loss / grad_accum).backward()          # DDP averages the ranks' gradients on the last
    clip the gradient norm; skip the update if the loss or the norm is not finite
    optimizer.step(); scheduler.step()
    every --log-every steps a metrics record, every --eval-every the held-out set,
    every --save-every a checkpoint

:func:`start` builds a :class:`Run` (everything a step needs) from the config, or from a
checkpoint with ``--resume``; :func:`train` runs it to ``max_steps`` and returns the summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import build as B
from . import checkpoint as C
from . import data as D
from . import parallel as P
from . import report as R
from .config import TrainConfig, check_config, resume_changes


class NonFiniteLossError(RuntimeError):
    """Too many steps had a non-finite loss or gradient."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C while the run trained; the message says what there is to continue from."""


@dataclass
class Run:
    """A run in progress: its parts, and where it stands (``step``, ``nonfinite``)."""

    cfg: TrainConfig
    par: P.Parallel
    log: Callable[[str], None]  # rank 0's messages (the other ranks' go nowhere)
    autocast: Callable
    run_dir: Path
    tokenizer: object
    train_batches: D.PairBatches
    eval_batches: D.PairBatches
    wrapper: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    metrics: R.MetricsLog | None  # set once the run knows its step
    step: int = 0
    nonfinite: int = 0
    changes: list[dict] = field(default_factory=list)  # knobs changed on resume, at their step
    data: dict = field(default_factory=dict)  # SHA-256 of the data files, saved with each checkpoint
    resumed_at: int | None = None  # the step this invocation resumed at; None: a fresh run

    @property
    def device(self) -> torch.device:
        return self.par.device


@dataclass
class Window:
    """The training metrics of the steps since the last record (summed), and their tokens."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: int = 0
    tokens: torch.Tensor | int = 0
    since: float = field(default_factory=time.time)

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0) + v
        self.steps += 1


# ----------------------------------------------------------------------------------------
# Setup


def start(cfg: TrainConfig, log, held: contextlib.ExitStack | None = None) -> Run:
    """Process group, tokenizer, data, model, optimizer; with ``--resume``, their saved state.

    ``held``: takes the run directory's lock (:func:`~alphapo.training.checkpoint.lock_run_dir`),
    released when it closes; None: when the process ends.
    """
    held = held if held is not None else contextlib.ExitStack()
    par = init_process(cfg)
    if not par.is_main:
        log = lambda *args: None  # noqa: E731
    autocast = B.autocast_context(cfg, par.device)
    checkpoint, saved, changes = None, None, []
    if cfg.resume:
        checkpoint, notes = C.find_checkpoint(cfg.resume)
        for note in notes:  # a missing or damaged latest checkpoint, and the one used instead
            log(f"warning: {note}")
        saved = C.saved_run(checkpoint)
        changes = resume_changes(saved["config"], cfg, saved["step"])  # refuses another model or data
    data = B.data_digests(cfg)
    if saved is not None:
        B.check_same_data(saved, data, checkpoint)  # the same files, and the same content in them
    resumed = C.run_of(checkpoint) if checkpoint is not None else None
    # The run continues in the directory it resumes (unless --out-dir says otherwise);
    # None: a fresh one, named when it is claimed.
    run_dir = Path(cfg.out_dir) if cfg.out_dir else resumed
    C.check_run_dir(run_dir, resumed, cfg.overwrite)  # before seconds of loading, not after
    locked = par.is_main and run_dir is not None and run_dir.is_dir()
    if locked:  # before loading, too: no other run may rotate away the checkpoint this one loads
        held.enter_context(C.lock_run_dir(run_dir) or contextlib.nullcontext())

    # Tokenizer, data and model. A resumed run takes all three from the checkpoint's
    # directory and the same files, so it sees the same token ids and the same batches.
    tokenizer = B.build_tokenizer(cfg, checkpoint)
    train_pairs, eval_pairs = B.load_data(cfg, tokenizer, log)
    pad_id = tokenizer.pad_token_id
    # Global micro-batches, the same on every rank; each rank takes its B / R pairs of one.
    train_batches = D.PairBatches(train_pairs, cfg.batch_size, pad_id, seed=cfg.seed)
    eval_batches = D.PairBatches(eval_pairs, cfg.eval_batch_size, pad_id, shuffle=False)
    P.pair_range(cfg.batch_size, par)  # fail now if the batch does not split evenly over the ranks
    wrapper = P.wrap(B.build_model(cfg, tokenizer, par.device, checkpoint), par)
    wrapper.train()
    # Only now, with data and model in hand, does the run claim its directory: a bad data
    # file or model path leaves nothing behind. Rank 0 claims it, every rank learns where.
    if par.is_main:
        run_dir = C.claim_run_dir(run_dir, resumed, cfg.overwrite, dataclasses.asdict(cfg))
        if not locked:  # a directory this run created: no other run can have claimed it
            held.enter_context(C.lock_run_dir(run_dir) or contextlib.nullcontext())
        for name in C.clean_incomplete(run_dir):
            log(f"removed {name}: left behind by a save that was interrupted")
    run_dir = Path(P.broadcast(str(run_dir), par))

    params = [p for p in wrapper.parameters() if p.requires_grad]
    optimizer, scheduler = B.build_optimizer(cfg, params)
    run = Run(cfg, par, log, autocast, run_dir, tokenizer, train_batches, eval_batches, wrapper, params,
              optimizer, scheduler, metrics=None, data=data)
    if checkpoint is not None:
        run.step, run.nonfinite = C.restore(checkpoint, wrapper, optimizer, scheduler, par)
        run.resumed_at = run.step
        if changes:  # the restored optimizer and schedule hold the saved lr, betas, decay
            B.follow_config(cfg, optimizer, scheduler)
        run.changes = saved["changes"] + changes
    run.metrics = R.MetricsLog.start(run_dir, par, resumed, run.step, log)
    if checkpoint is not None:
        say_resumed(run, checkpoint, changes)
    n_params = sum(p.numel() for p in wrapper.parameters())
    log(f"alphapo-train: {'built-in tiny Llama' if not cfg.model else cfg.model} ({n_params / 1e6:.2f}M params), "
        f"{len(train_pairs)} train / {len(eval_pairs)} held-out pairs, {cfg.max_steps} steps of "
        f"{cfg.batch_size * cfg.grad_accum} pairs on {par.device}"
        f"{f' x {par.world_size} ({par.mode})' if par.world_size > 1 else ''}, alpha={cfg.alpha} -> {run_dir}")
    return run


def init_process(cfg: TrainConfig) -> P.Parallel:
    """Threads, logging and this process's place in the process group (torchrun's, if launched so)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's shard bar would break our progress bar
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif not cfg.model and B.pick_device(cfg.device).type == "cpu":
        torch.set_num_threads(1)
    # One process per device under torchrun (see alphapo/training/parallel.py); rank 0 alone logs
    # and writes files, every rank computes.
    return P.setup(cfg.parallel, B.pick_device(cfg.device))


def say_resumed(run: Run, checkpoint: Path, changes: list[dict]) -> None:
    """Log where the run resumed and what this invocation changed (a change is a metrics record too)."""
    run.log(f"resumed from {checkpoint} at step {run.step}")
    newer = C.newer_checkpoints(run.run_dir, run.step)
    if newer:
        run.log(f"note: {', '.join(newer)} in {run.run_dir / 'checkpoints'} {'is' if len(newer) == 1 else 'are'} "
                f"past step {run.step}, which this run continues from (left by an earlier resume at an earlier "
                "checkpoint, or by a save stopped before it could update latest); replaced as this run reaches "
                "that step")
    if changes:
        run.log("changed on resume: " + ", ".join(f"{c['knob']} {c['from']} -> {c['to']}" for c in changes)
                + f" from step {run.step} (recorded in metrics.jsonl and the summary)")
        run.metrics.record({"step": run.step, "config_change": {c["knob"]: {"from": c["from"], "to": c["to"]}
                                                                 for c in changes}})


# ----------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig, log=print) -> dict:
    """Run one training job; returns the summary (also written to ``summary.json``).

    Called as a library function (the tests, the alpha sweep), it leaves torch's CPU
    thread count as it found it.
    """
    threads = torch.get_num_threads()
    try:
        return _train(cfg, log)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, log) -> dict:
    t_start = time.time()
    check_config(cfg)
    with contextlib.ExitStack() as held:  # the run directory's lock, released however the run ends
        run = start(cfg, log, held)
        progress = R.Progress(cfg, run.step, run.log, run.par)
        window = Window()
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)
        try:
            if not any("eval_loss" in r for r in run.metrics.history):  # the summary's "before"
                before = evaluate(run)
                run.metrics.record({"step": run.step, **before})
                progress.say(f"step {run.step}: held-out reward accuracy {before['eval_rewards/accuracies']:.1%}, "
                             f"chosen log-prob {before['eval_logps/chosen']:.3f}")
            while run.step < cfg.max_steps:
                loss, grad_norm, step_metrics, tokens = train_step(run)
                finite = update(run, loss, grad_norm, progress)
                run.step += 1
                window.tokens += tokens
                if finite:
                    window.add({"loss": loss, "grad_norm": grad_norm.double(), **step_metrics})
                window = after_step(run, window, progress, t_start)
        except KeyboardInterrupt:
            raise Interrupted(interrupted_at(run)) from None
        finally:
            progress.close()
        return finish(run, time.time() - t_start)


def train_step(run: Run):
    """Forward and backward over ``grad_accum`` micro-batches: ``(loss, grad_norm, metrics, tokens)``.

    Micro-batch k of the whole run is a pure function of k, which is what makes
    ``--resume`` exact. The loss and metrics are means over the step's pairs (this rank's).
    """
    cfg, device = run.cfg, run.device
    batches = [P.local_batch(run.train_batches.batch(run.step * cfg.grad_accum + micro), run.par)[0]
               for micro in range(cfg.grad_accum)]
    batches = [{k: v.to(device, non_blocking=True) for k, v in batch.items()} for batch in batches]
    nll_tokens = nll_tokens_per_call(batches, run.par) if cfg.nll_weight > 0 else None
    step_loss = torch.zeros((), device=device, dtype=torch.float64)
    step_metrics: dict[str, torch.Tensor] = {}
    step_tokens = torch.zeros((), device=device, dtype=torch.long)
    for micro, batch in enumerate(batches):
        # DDP averages the ranks' gradients in the last micro-batch's backward; each
        # rank's loss is the mean over its B / R pairs, so the average is the whole
        # micro-batch's mean (alphapo/training/parallel.py).
        with P.grad_sync(run.wrapper, run.par, sync=micro == cfg.grad_accum - 1):
            with run.autocast():
                loss, aux = run.wrapper(**batch, nll_num_tokens=nll_tokens)
            (loss / cfg.grad_accum).backward()
        step_loss += loss.detach().double() / cfg.grad_accum
        for k, v in aux.to_dict().items():  # detached: a metric must not keep the step's graph alive
            step_metrics[k] = step_metrics.get(k, 0) + v.detach().double() / cfg.grad_accum
        step_tokens += batch["attention_mask"].sum()
    grad_norm = P.clip_grad_norm(run.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    # The mean over ranks: the whole batch's loss, and one skip decision for every rank.
    step_loss = P.all_reduce({"loss": step_loss}, run.par, op="mean")["loss"]
    return step_loss, grad_norm, step_metrics, step_tokens


def nll_tokens_per_call(batches: list[dict], par: P.Parallel) -> torch.Tensor:
    """The step's chosen target tokens, over every micro-batch and rank, per loss call.

    Each call's NLL term is its chosen tokens' summed NLL over this count; the calls' losses
    are divided by ``grad_accum`` and DDP averages them over R ranks, so the step's NLL is
    the sum over all its chosen tokens divided by their total, as one whole batch's would
    be. (Each call's own token mean would weight the tokens of a short micro-batch, or of a
    rank with short pairs, more.) Chosen rows come first in each (2B, T) batch.
    """
    count = sum((b["labels"][: b["labels"].shape[0] // 2, 1:] != -100).sum() for b in batches)
    total = P.all_reduce({"chosen_tokens": count}, par)["chosen_tokens"]
    return total / (len(batches) * par.world_size)


def update(run: Run, loss: torch.Tensor, grad_norm: torch.Tensor, progress: R.Progress) -> bool:
    """The optimizer step, unless the loss or gradient is not finite (then skipped, counted)."""
    cfg = run.cfg
    # The one host sync per step: skip an update whose loss or gradient is not finite.
    finite = bool(torch.isfinite(loss) & torch.isfinite(grad_norm))
    if finite:
        run.optimizer.step()
    else:
        run.nonfinite += 1
        progress.say(f"warning: step {run.step + 1}: non-finite loss ({loss.item()}) or gradient norm "
                     f"({grad_norm.item()}); update skipped ({run.nonfinite}/{cfg.max_nonfinite})")
        if run.nonfinite >= cfg.max_nonfinite:
            raise NonFiniteLossError(
                f"{run.nonfinite} steps had a non-finite loss or gradient (--max-nonfinite {cfg.max_nonfinite}); "
                f"stopped at step {run.step + 1}. Check the data, or {retry_advice(run)}")
    run.optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # torch warns when a skipped first step precedes this
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
        run.scheduler.step()  # the schedule follows the step count, skipped steps included
    return finite


def retry_advice(run: Run) -> str:
    """How to go on after too many non-finite steps: from the last checkpoint, with a lower rate."""
    lower = f"--lr {run.cfg.lr / 10:g}"
    latest = C.latest_checkpoint(run.run_dir)
    if latest is None:
        return f"start again with a lower learning rate ({lower}): no checkpoint was written"
    # Skipped steps do not update the weights, so every checkpoint holds finite ones.
    return (f"resume from the last checkpoint ({latest}) with a lower learning rate: "
            f"--resume {run.run_dir} {lower}")


def interrupted_at(run: Run) -> str:
    """Where an interrupted run stands, and what to continue it from."""
    latest = C.latest_checkpoint(run.run_dir)
    if latest is not None:
        return (f"interrupted at step {run.step}; continue with --resume {run.run_dir} (from its checkpoint "
                f"{latest.name})")
    if run.cfg.resume:
        return (f"interrupted at step {run.step}, before this run's first checkpoint; continue with --resume "
                f"{run.cfg.resume}")
    return (f"interrupted at step {run.step}, before the first checkpoint: nothing to resume; start again "
            f"(--out-dir {run.run_dir} --overwrite reuses its directory)")


def after_step(run: Run, window: Window, progress: R.Progress, t_start: float) -> Window:
    """The record of the log window, the held-out evaluation and the checkpoint that are due.

    Returns the log window to go on with: a new one once a record closed this one.
    """
    cfg, step = run.cfg, run.step
    # A checkpoint step closes the log window too, so a resumed run logs the same records.
    saving = (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps
    entry = None
    if step % cfg.log_every == 0 or saving:
        elapsed = time.time() - window.since
        sums = P.all_reduce(window.sums, run.par, op="mean")  # each rank's metrics are over its own pairs
        tokens = P.all_reduce({"tokens": window.tokens}, run.par)["tokens"]
        entry = {"step": step, "lr": run.scheduler.get_last_lr()[0]}
        entry |= {k: float(v / max(window.steps, 1)) for k, v in sums.items()}
        entry |= {"tokens_per_s": float(tokens) / max(elapsed, 1e-9), "peak_mem_mb": R.peak_memory_mb(run.device),
                  "nonfinite_steps": run.nonfinite, "time_s": time.time() - t_start}
        run.metrics.record(entry)
        window = Window()
    progress.step(entry)

    if step % cfg.eval_every == 0 or step == cfg.max_steps:
        result = evaluate(run)
        run.metrics.record({"step": step, **result})
        progress.say(f"step {step}: held-out reward accuracy {result['eval_rewards/accuracies']:.1%}, "
                     f"margin {result['eval_rewards/margins']:.2f}, chosen log-prob {result['eval_logps/chosen']:.3f}, "
                     f"rejected {result['eval_logps/rejected']:.3f}")

    if saving:
        C.save_checkpoint(run.run_dir, run.wrapper, run.tokenizer, run.optimizer, run.scheduler, run.par, step=step,
                          nonfinite=run.nonfinite, config=dataclasses.asdict(cfg), changes=run.changes,
                          data=run.data, keep_last=cfg.keep_last)
    return window


def finish(run: Run, seconds: float) -> dict:
    """The summary (printed, and with the plot written by rank 0); the process group is torn down."""
    summary = R.summarize(run.metrics.history, run.run_dir, run.cfg, seconds, run.changes, run.resumed_at)
    if run.par.is_main:
        if run.cfg.plot:
            R.plot_metrics(run.metrics.history, run.run_dir / "plot.png", title=R.plot_title(run.cfg, run.changes))
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    R.print_summary(summary, run.log)
    P.teardown(run.par)
    return summary


# ----------------------------------------------------------------------------------------
# Evaluation on the held-out pairs


@torch.no_grad()
def evaluate(run: Run) -> dict[str, float]:
    """Metrics over every held-out pair, TRL's names with an ``eval_`` prefix.

    Under data parallelism each rank evaluates its share of every batch and the sums are
    added over ranks; a rank left without a pair of the last batch runs a stand-in with
    weight 0 (under FSDP the forward is a collective every rank must join).
    """
    wrapper, par = run.wrapper, run.par
    was_training = wrapper.training
    wrapper.eval()
    per_pair = {k: [] for k in ("chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards",
                                "reward_accuracy", "reward_margin")}
    weighted = dict.fromkeys(("loss", "chosen_logits_mean", "rejected_logits_mean", "nll_loss"), 0.0)
    counts = dict.fromkeys(("pairs", "chosen_tokens", "rejected_tokens"), 0)
    for batch in run.eval_batches:
        batch, n_pairs = P.local_batch(batch, par, even=False)
        batch = {k: v.to(run.device) for k, v in batch.items()}
        with run.autocast():
            loss, aux = wrapper(**batch)
        for k in per_pair:
            per_pair[k].append(getattr(aux, k)[:n_pairs])
        # Pair means are weighted by pairs, token means (logits, NLL) by their target
        # tokens: the totals do not depend on how the pairs are batched or sharded.
        valid = batch["labels"][:, 1:] != -100  # the targets (collate's ignore index)
        n_chosen, n_rejected = valid[:n_pairs].sum(), valid[valid.shape[0] // 2 :][:n_pairs].sum()
        weighted["loss"] += loss.double() * n_pairs
        weighted["chosen_logits_mean"] += aux.chosen_logits_mean.double() * n_chosen
        weighted["rejected_logits_mean"] += aux.rejected_logits_mean.double() * n_rejected
        weighted["nll_loss"] += aux.nll_loss.double() * n_chosen
        counts["pairs"] += n_pairs
        counts["chosen_tokens"] += n_chosen
        counts["rejected_tokens"] += n_rejected
    wrapper.train(was_training)
    sums = {k: torch.cat(v).double().sum() for k, v in per_pair.items()} | weighted | counts
    sums = P.all_reduce(sums, par)  # over ranks
    return eval_metrics(sums, list(per_pair))


def eval_metrics(sums: dict, per_pair: list[str]) -> dict[str, float]:
    """The held-out sums over every pair and token turned into means, under TRL's names."""
    n_pairs = int(sums["pairs"])
    pair = {k: sums[k] / n_pairs for k in per_pair}
    metrics = {
        "loss": sums["loss"] / n_pairs,
        "rewards/chosen": pair["chosen_rewards"],
        "rewards/rejected": pair["rejected_rewards"],
        "rewards/accuracies": pair["reward_accuracy"],
        "rewards/margins": pair["reward_margin"],
        "logps/chosen": pair["chosen_logps"],
        "logps/rejected": pair["rejected_logps"],
        "logits/chosen": sums["chosen_logits_mean"] / sums["chosen_tokens"],
        "logits/rejected": sums["rejected_logits_mean"] / sums["rejected_tokens"],
        "nll_loss": sums["nll_loss"] / sums["chosen_tokens"],
    }
    return {f"eval_{k}": float(v) for k, v in metrics.items()} | {"eval_pairs": n_pairs}
