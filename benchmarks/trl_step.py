"""One DPO training step: TRL's DPOTrainer against AlphaPODPOTrainer, side by side in one process.

Both trainers hold copies of the same randomly initialised Llama (a large head on a small
trunk, so the loss side dominates, as it does at real vocabularies) and its reference
copy, and run ``trainer.training_step`` (policy and reference forward, loss, backward; no
optimizer step) on the same hand-made batch, alternately, ``--repeats`` times. Reported:
the minimum time of a step and the minimum peak RSS above the RSS before it
(:func:`benchmarks.harness.cpu_peak_bytes`), and their ratios. CPU only: TRL's fused head
scores every position on a CPU (its Triton path, which skips prompt and padding, needs
CUDA), so on a GPU the time ratio will be smaller than here; the memory figures carry over
in kind, not in size::

    python -m benchmarks.trl_step                    # prints a table, writes --out (JSON)
    python -m benchmarks.trl_step --vocab 65536 --loss-type sigmoid sft
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from .harness import cpu_peak_bytes  # noqa: E402


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=2 * args.seq, tie_word_embeddings=False, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config)


def batch(args):
    """``(2B, T)`` chosen rows first: a prompt of ``--prompt`` tokens, completions of random
    length in [T/4, T - prompt], right padding (what TRL's collator makes); with ``--full``
    every completion runs to T (no padding)."""
    g = torch.Generator().manual_seed(1)
    rows, T = 2 * args.pairs, args.seq
    ids = torch.randint(3, args.vocab, (rows, T), generator=g)
    ends = torch.full((rows,), T) if args.full else torch.randint(T // 4 + args.prompt, T + 1, (rows,), generator=g)
    pos = torch.arange(T)
    attention = (pos < ends[:, None]).long()
    completion = ((pos >= args.prompt) & (pos < ends[:, None])).long()
    return dict(input_ids=ids.masked_fill(attention == 0, 0), attention_mask=attention, completion_mask=completion)


def trainers(args, lm):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from alphapo.integrations.trl import AlphaPODPOTrainer
    from alphapo.training.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    data = Dataset.from_list([{"prompt": "sort 321=", "chosen": "123", "rejected": "132"}] * 2)
    out = []
    for cls in (DPOTrainer, AlphaPODPOTrainer):
        config = DPOConfig(output_dir=tempfile.mkdtemp(), report_to="none", use_cpu=True, bf16=False,
                           gradient_checkpointing=False, loss_type=args.loss_type, beta=0.1, disable_tqdm=True,
                           per_device_train_batch_size=args.pairs, save_strategy="no")
        trainer = cls(model=copy.deepcopy(lm), ref_model=copy.deepcopy(lm), args=config, train_dataset=data,
                      processing_class=tok)
        trainer.current_gradient_accumulation_steps = 1  # what train() sets before each step
        out.append(trainer)
    return out


def step(trainer, inputs):
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.training_step(trainer.model, inputs)
    return float(loss)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--full", action="store_true", help="no padding: every completion runs to --seq")
    p.add_argument("--loss-type", nargs="+", default=["sigmoid"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    lm = build(args)
    inputs = batch(args)
    named = dict(zip(("trl", "alphapo"), trainers(args, lm)))
    times = {k: [] for k in named}
    peaks = {k: [] for k in named}
    losses = {}
    for name, trainer in named.items():  # warm-up: allocator, first-call paths
        losses[name] = step(trainer, inputs)
    for _ in range(args.repeats):
        for name, trainer in named.items():
            start = time.perf_counter()
            step(trainer, inputs)
            times[name].append(time.perf_counter() - start)
            _, peak = cpu_peak_bytes(lambda: step(trainer, inputs))
            peaks[name].append(peak)
    n_valid = int(inputs["completion_mask"][:, 1:].sum())
    record = {
        "what": "one DPOTrainer.training_step (policy + reference forward, loss, backward), CPU",
        "date": _dt.date.today().isoformat(), "cpu": platform.processor() or platform.machine(),
        "threads": args.threads, "torch": torch.__version__,
        "trl": __import__("trl").__version__, "transformers": __import__("transformers").__version__,
        "shape": dict(V=args.vocab, H=args.hidden, layers=args.layers, pairs=args.pairs, T=args.seq,
                      prompt=args.prompt, full=args.full, valid_tokens=n_valid, positions=2 * args.pairs * (args.seq - 1)),
        "loss_type": args.loss_type, "repeats": args.repeats, "loss": losses,
        "path": named["alphapo"].alphapo_loss.last_path,
        "step_s_min": {k: min(v) for k, v in times.items()},
        "peak_mb_min": {k: min(v) / 2**20 for k, v in peaks.items()},
    }
    record["time_ratio"] = record["step_s_min"]["alphapo"] / record["step_s_min"]["trl"]
    record["memory_ratio"] = record["peak_mb_min"]["alphapo"] / max(record["peak_mb_min"]["trl"], 1e-9)
    print(json.dumps(record, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
