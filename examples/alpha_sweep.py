"""Reward shape at toy scale: train the built-in task for several alpha, plot what moves.

AlphaPO's reward is ``f(s) = (1 - exp(-alpha s)) / alpha`` of the length-averaged
log-prob ``s`` (alpha = 0: ``f(s) = s``, SimPO). Its slope ``f'(s) = exp(-alpha s)`` is
the weight that each sequence's log-prob gradient gets, so alpha decides how the update
is shared between the chosen and the rejected answer: with alpha > 0 the sequence with
the *lower* log-prob (usually the rejected one) is pushed hardest, and harder as it falls;
with alpha < 0 the push on a low-probability sequence fades and the update concentrates
on the chosen one. On the built-in task a near-miss rejected answer shares most tokens
with the chosen one, so what pushes the rejected answer down also pulls the chosen one
down: likelihood displacement, the effect the paper controls with alpha.

This script trains the main job's model, data and schedule once per alpha, from two
starting points, and plots the held-out chosen and rejected log-probs and the held-out
reward accuracy over steps:

* ``scratch``: the random-init model of the main job (accuracy rises from chance);
* ``sft``: that model first fine-tuned on the chosen answers (NLL, ``--sft-steps``),
  the paper's setting: preference training starts from an SFT model whose chosen
  answers are already likely, so a fall of their log-prob is displacement.

    python examples/alpha_sweep.py                        # alpha in -0.5 0 0.25 1, both starts
    python examples/alpha_sweep.py --alphas 0 0.25 --starts sft --max-steps 300 --out /tmp/sweep

Writes ``alpha_sweep.png`` and ``alpha_sweep.json`` (per run: the summary and the
held-out curves) to ``--out`` (default ``examples/results``); the runs themselves go to
``--runs`` (default a temporary directory).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from alphapo import sequence_logprobs
from alphapo.training import TrainConfig, train
from alphapo.training.build import build_model, load_data
from alphapo.training.data import PairBatches
from alphapo.training.tokenizer import load_tokenizer

CURVES = ("step", "eval_rewards/accuracies", "eval_logps/chosen", "eval_logps/rejected", "eval_rewards/margins")


def quiet(*args):
    pass


def sft_warm_start(out: Path, steps: int, seed: int, lr: float) -> Path:
    """Supervised fine-tuning of the built-in model on the chosen answers; saved for ``--model``.

    The loss is the NLL of the chosen completion tokens, ``-sum(log p) / N``, through the
    fused :func:`alphapo.sequence_logprobs` (no logits here either).
    """
    cfg = TrainConfig(seed=seed, lr=lr)
    tokenizer = load_tokenizer()
    train_pairs, _ = load_data(cfg, tokenizer, quiet)
    lm = build_model(cfg, tokenizer, torch.device("cpu"), None).lm
    batches = PairBatches(train_pairs, cfg.batch_size, tokenizer.pad_token_id, seed=seed + 10_000)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
    for k in range(steps):
        batch = batches.batch(k)
        B = batch["input_ids"].shape[0] // 2  # the chosen rows
        labels = batch["labels"][:B]
        target = torch.cat([labels[:, 1:], labels.new_full((B, 1), -100)], dim=1)  # shift left
        hidden = lm.base_model(input_ids=batch["input_ids"][:B], attention_mask=batch["attention_mask"][:B])
        summed = sequence_logprobs(hidden.last_hidden_state, lm.lm_head.weight, target, average=False)
        loss = -summed.sum() / (target != -100).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), cfg.grad_clip)
        for group in optimizer.param_groups:  # linear warm-up over the first tenth
            group["lr"] = lr * min(1.0, (k + 1) / max(1, steps // 10))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    lm.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run_sweep(alphas, seeds, starts, runs_dir: Path, sft_steps: int, **overrides) -> list[dict]:
    results = []
    for start in starts:
        for seed in seeds:
            model = ""
            if start == "sft":
                model = str(sft_warm_start(runs_dir / f"sft-seed{seed}", sft_steps, seed, overrides["lr"]))
            for alpha in alphas:
                out = runs_dir / f"{start}-alpha{alpha:+g}-seed{seed}"
                cfg = TrainConfig(alpha=alpha, seed=seed, model=model, out_dir=str(out), progress=False,
                                  save_every=0, keep_last=1, **overrides)
                t0 = time.time()
                summary = train(cfg, log=quiet)
                history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                held = [r for r in history if "eval_loss" in r]
                results.append({
                    "start": start,
                    "alpha": alpha,
                    "seed": seed,
                    "summary": summary,
                    "curve": {k: [r[k] for r in held] for k in CURVES},
                })
                print(f"{start:7s} alpha {alpha:+5g} seed {seed}: accuracy {summary['accuracy_before']:.1%} -> "
                      f"{summary['accuracy_after']:.1%}, chosen log-prob {summary['chosen_logps_before']:.2f} -> "
                      f"{summary['chosen_logps_after']:.2f} ({summary['chosen_logps_drift']:+.2f}), rejected "
                      f"{summary['rejected_logps_drift']:+.2f}  ({time.time() - t0:.0f} s)", flush=True)
    return results


def plot_sweep(results: list[dict], path: Path, title: str, sft_steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    starts = list(dict.fromkeys(r["start"] for r in results))
    alphas = sorted({r["alpha"] for r in results})
    colors = dict(zip(alphas, plt.cm.viridis([i / max(1, len(alphas) - 1) * 0.9 for i in range(len(alphas))])))
    fig, axes = plt.subplots(len(starts), 3, figsize=(16, 4.3 * len(starts)), squeeze=False)
    names = {"scratch": "from random init", "sft": f"from an SFT model ({sft_steps} NLL steps on chosen)"}
    for row, start in zip(axes, starts):
        runs = [r for r in results if r["start"] == start]
        for alpha in alphas:
            # The mean over seeds, with the range of the seeds as a band.
            curves = [r["curve"] for r in runs if r["alpha"] == alpha]
            steps = curves[0]["step"]
            label = f"α = {alpha:g}" + (f" ({len(curves)} seeds)" if len(curves) > 1 else "")
            for ax, key in zip(row, ("eval_logps/chosen", "eval_logps/rejected", "eval_rewards/accuracies")):
                values = torch.tensor([c[key] for c in curves], dtype=torch.float64)
                ax.plot(steps, values.mean(0), color=colors[alpha], marker="o", ms=3, label=label)
                if len(curves) > 1:
                    ax.fill_between(steps, values.min(0).values, values.max(0).values, color=colors[alpha], alpha=0.15)
        for ax, key in zip(row, ("eval_logps/chosen", "eval_logps/rejected")):
            start_value = sum(r["curve"][key][0] for r in runs) / len(runs)
            ax.axhline(start_value, color="gray", ls=":", lw=1, label="at start")
        row[2].axhline(0.5, color="gray", ls=":", lw=1, label="chance")
        for ax, label in zip(row, ("held-out chosen log-prob / token", "held-out rejected log-prob / token",
                                   "held-out reward accuracy")):
            ax.set_title(f"{label}, {names[start]}", fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alphas", type=float, nargs="+", default=[-0.5, 0.0, 0.25, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per (start, alpha, seed)")
    parser.add_argument("--starts", nargs="+", choices=("scratch", "sft"), default=["scratch", "sft"])
    parser.add_argument("--sft-steps", type=int, default=100, help="NLL steps of the SFT warm start")
    parser.add_argument("--max-steps", type=int, default=TrainConfig.max_steps)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr, help="peak learning rate of every run")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--runs", type=Path, default=None, help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    overrides = dict(max_steps=args.max_steps, eval_every=args.eval_every, lr=args.lr)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        results = run_sweep(args.alphas, args.seeds, args.starts, args.runs or Path(tmp), args.sft_steps, **overrides)
    cfg = TrainConfig(**overrides)
    title = (f"AlphaPO reward shape on the built-in sorting task: tiny Llama, {cfg.max_steps} steps of "
             f"{cfg.batch_size} pairs, lr {cfg.lr:g}, β = {cfg.beta}, γ = {cfg.gamma}")
    plot_sweep(results, args.out / "alpha_sweep.png", title, args.sft_steps)
    meta = {
        "command": "python examples/alpha_sweep.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "seconds": round(time.time() - t0),
        "torch": torch.__version__,
        "config": {k: v for k, v in vars(cfg).items() if k not in ("alpha", "seed", "out_dir", "model")},
        "sft_steps": args.sft_steps,
        "results": results,
    }
    (args.out / "alpha_sweep.json").write_text(json.dumps(meta, indent=1))
    print(f"wrote {args.out / 'alpha_sweep.png'} and {args.out / 'alpha_sweep.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
