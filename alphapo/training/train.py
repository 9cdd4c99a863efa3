"""alphapo-train: a slim AlphaPO trainer whose loss never builds the logits.

With no arguments it trains a tiny random-init Llama on the built-in digit-sorting
preference task (CPU, about two minutes on two cores) and reports how the held-out reward
accuracy and the chosen/rejected log-probs moved. Given a local Hugging Face model and a
TRL-format preference file it trains that instead (a GPU, bf16 autocast, Triton loss)::

    alphapo-train                                           # the main job
    alphapo-train --alpha 0 --max-steps 200                 # SimPO, shorter
    alphapo-train --model ./Qwen2.5-0.5B-Instruct --train-file prefs.jsonl \\
        --batch-size 4 --grad-accum 8 --lr 5e-7 --max-length 1024
    alphapo-train --config run.yaml --lr 1e-6               # file, then flags on top
    alphapo-train --resume runs/alphapo-20250101-120000     # continue exactly

The file reads top to bottom: config, command line, setup, checkpoints, evaluation, the
training loop, the plot and summary. One step is ``wrapper(batch) -> (loss, aux)``
(:class:`alphapo.training.modeling.AlphaPOModel`): the loss is computed inside the model's
forward from the final hidden states and the ``lm_head`` weight.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from ..loss import BACKENDS, AlphaPOLoss
from . import data as D
from . import parallel as P
from .modeling import AlphaPOModel, attention_implementation, load_causal_lm, tiny_llama
from .tokenizer import load_tokenizer

# ----------------------------------------------------------------------------------------
# Config: every knob, its default and what it does. The defaults are the main job.


def knob(default, help: str, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    # model and tokenizer
    model: str = knob("", "local path of a Hugging Face causal LM; empty: the built-in tiny Llama, random init")
    tokenizer: str = knob("", "local tokenizer path; empty: the model's own, or the built-in character tokenizer")
    trust_remote_code: bool = knob(False, "allow custom modelling code shipped with --model (runs that code)")
    n_layer: int = knob(2, "built-in model: decoder layers")
    n_embd: int = knob(64, "built-in model: hidden size H")
    n_head: int = knob(4, "built-in model: attention heads")
    gradient_checkpointing: bool = knob(False, "recompute activations in backward (less memory, ~30%% slower)")
    disable_dropout: bool = knob(True, "zero every dropout probability (as TRL does for preference training)")
    # data
    train_file: str = knob("", "TRL preference file (.jsonl/.json/.parquet with prompt, chosen, rejected); "
                           "empty: the built-in task")
    eval_file: str = knob("", "held-out preference file; empty: split --eval-size pairs off the training data")
    train_size: int = knob(20000, "built-in task: training pairs to generate")
    eval_size: int = knob(512, "held-out pairs (built-in split, or taken from --train-file, at most 10%% of it)")
    max_length: int = knob(1024, "tokens per sequence (prompt + completion), at most")
    max_prompt_length: int = knob(0, "tokens per prompt, at most (its end is kept); 0: no separate limit")
    truncation: str = knob("truncate", "pairs that do not fit: truncate (drop if no completion token is left), "
                           "drop, or error", D.TRUNCATION_POLICIES)
    # loss
    alpha: float = knob(0.25, "reward shape f(s) = (1 - exp(-alpha s)) / alpha; 0 is SimPO")
    beta: float = knob(2.5, "reward scale")
    gamma: float = knob(1.375, "target reward margin")
    label_smoothing: float = knob(0.0, "conservative sigmoid loss epsilon, in [0, 0.5]")
    loss_type: str = knob("sigmoid", "pair loss", ("sigmoid", "hinge", "ipo"))
    nll_weight: float = knob(0.0, "weight of the chosen-token NLL added to the loss (CPO's alpha)")
    average_log_prob: bool = knob(True, "length-normalised sequence log-probs (SimPO/AlphaPO); off: summed")
    backend: str = knob("auto", "loss backend: auto is triton on CUDA, torch on CPU", BACKENDS)
    scratch_mb: int = knob(0, "extra-memory budget of the fused loss in MiB; 0: the backend's default")
    # optimisation
    batch_size: int = knob(64, "preference pairs per micro-batch (2 sequences each), over all ranks")
    grad_accum: int = knob(1, "micro-batches per optimizer step")
    max_steps: int = knob(800, "optimizer steps")
    lr: float = knob(3e-3, "peak learning rate (AdamW); real models want ~1e-6 to 1e-5")
    min_lr_ratio: float = knob(0.1, "final learning rate of the cosine decay, as a fraction of --lr")
    warmup_steps: int = knob(40, "linear warm-up steps")
    weight_decay: float = knob(0.0, "AdamW decoupled weight decay")
    adam_beta1: float = knob(0.9, "AdamW beta1")
    adam_beta2: float = knob(0.95, "AdamW beta2")
    grad_clip: float = knob(1.0, "clip the global gradient norm to this; 0: no clipping")
    # system
    device: str = knob("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    parallel: str = knob("auto", "data parallelism over torchrun's processes: ddp, fsdp (FSDP2: parameters, "
                         "gradients and AdamW state sharded), none; auto: ddp under torchrun", P.MODES)
    precision: str = knob("auto", "auto: bf16 autocast on CUDA, fp32 on CPU", ("auto", "bf16", "fp32"))
    param_dtype: str = knob("fp32", "dtype of the weights and AdamW state; bf16 halves their memory but "
                            "rounds away updates much smaller than a weight (lr ~1e-6)", ("fp32", "bf16"))
    seed: int = knob(0, "seed of model init, data generation and data order")
    threads: int = knob(0, "CPU threads for torch; 0: one for the built-in model on CPU (its matrices are "
                        "too small to share: more threads only add contention), torch's default otherwise")
    # outputs and checkpoints
    out_dir: str = knob("", "run directory; empty: a fresh runs/alphapo-<date>-<time>")
    resume: str = knob("", "continue from a run directory (its latest checkpoint) or a checkpoint directory")
    eval_batch_size: int = knob(64, "pairs per evaluation batch")
    log_every: int = knob(10, "steps between metrics.jsonl records (averaged over the interval)")
    eval_every: int = knob(100, "steps between held-out evaluations (also at the start and the end)")
    save_every: int = knob(200, "steps between checkpoints (also at the end); 0: only at the end")
    keep_last: int = knob(2, "checkpoints kept on disk")
    max_nonfinite: int = knob(10, "abort once this many steps had a non-finite loss or gradient (each is skipped)")
    plot: bool = knob(True, "write plot.png at the end")
    progress: bool = knob(True, "show a progress bar")


# The first knob of each section, for --help.
SECTIONS = {
    "model": "model and tokenizer",
    "train_file": "data",
    "alpha": "loss",
    "batch_size": "optimisation",
    "device": "system",
    "out_dir": "outputs and checkpoints",
}
PARSERS = {"int": int, "float": float, "str": str}


class ConfigError(ValueError):
    """A knob value or a config file that cannot be used."""


def check_config(cfg: TrainConfig) -> TrainConfig:
    for f in fields(cfg):
        choices = f.metadata["choices"]
        if choices and getattr(cfg, f.name) not in choices:
            raise ConfigError(f"{f.name} must be one of {choices}, got {getattr(cfg, f.name)!r}")
    positive = ("batch_size", "grad_accum", "max_steps", "max_length", "eval_batch_size", "log_every",
                "eval_every", "keep_last", "max_nonfinite", "n_layer", "n_embd", "n_head", "train_size", "lr")
    for name in positive:
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"{name} must be > 0, got {getattr(cfg, name)}")
    for name in ("warmup_steps", "save_every", "scratch_mb", "max_prompt_length", "threads", "weight_decay",
                 "grad_clip", "eval_size"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise ConfigError(f"min_lr_ratio must lie in [0, 1], got {cfg.min_lr_ratio}")
    return cfg


# ----------------------------------------------------------------------------------------
# Command line: one flag per knob, then --config FILE; flags beat the file beats defaults.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alphapo-train",
        usage="%(prog)s [-h] [--config FILE] [--KNOB VALUE ...]",
        description=__doc__.split("The file reads")[0].replace("::", ":").rstrip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Outputs (in the run directory): config.json, metrics.jsonl (TRL's metric names), "
        "plot.png, summary.json, checkpoints/step-NNNNNN/ (safetensors model, tokenizer, optimizer).",
        argument_default=argparse.SUPPRESS,  # only flags actually given override the file
    )
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of knob values (flags override it)")
    group = parser
    for f in fields(TrainConfig):
        if f.name in SECTIONS:
            group = parser.add_argument_group(SECTIONS[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f"(default: {f.default!r})" if f.default != "" else "(default: empty)"
        kwargs = {"help": f"{f.metadata['help']} {default}", "dest": f.name}
        if f.type == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = PARSERS[f.type]
            kwargs["metavar"] = f.name.upper() if not f.metadata["choices"] else None
            if f.metadata["choices"]:
                kwargs["choices"] = f.metadata["choices"]
        group.add_argument(flag, **kwargs)
    return parser


def load_config_file(path) -> dict:
    """Knob values from a YAML or JSON file (keys with ``_`` or ``-``), type-checked."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path}: expected a mapping of knob names to values")
    known = {f.name: f for f in fields(TrainConfig)}
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"config file {path}: unknown knob {key!r} (see alphapo-train --help)")
        want = {"int": int, "float": (int, float), "str": str, "bool": bool}[known[name].type]
        if not isinstance(value, want) or (known[name].type != "bool" and isinstance(value, bool)):
            raise ConfigError(f"config file {path}: {key} must be {known[name].type}, got {value!r}")
        out[name] = float(value) if known[name].type == "float" else value
    return out


def parse_config(argv=None) -> TrainConfig:
    """Defaults < the resumed run's config < ``--config`` file < flags."""
    args = vars(build_parser().parse_args(argv))
    file_values = load_config_file(args.pop("config")) if "config" in args else {}
    values = {**file_values, **args}
    base = {}
    if values.get("resume"):
        saved = find_checkpoint(values["resume"]) / "trainer_state.json"
        base = json.loads(saved.read_text())["config"]
        base = {k: v for k, v in base.items() if k in {f.name for f in fields(TrainConfig)}}
        base.pop("out_dir", None)
    return check_config(TrainConfig(**{**base, **values}))


# ----------------------------------------------------------------------------------------
# Setup: device, precision, tokenizer, data, model.


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda asked for, but torch sees no CUDA device")
    return device


def autocast_context(cfg: TrainConfig, device: torch.device):
    """bf16 autocast on CUDA by default; fp32 (no autocast) on CPU unless asked."""
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("precision bf16: this GPU does not support bfloat16; use --precision fp32")
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def fresh_run_dir(root: str = "runs") -> Path:
    stamp = time.strftime("alphapo-%Y%m%d-%H%M%S")
    path, n = Path(root) / stamp, 1
    while path.exists():
        path, n = Path(root) / f"{stamp}-{n}", n + 1
    return path


def load_data(cfg: TrainConfig, tokenizer, log):
    """Tokenised ``(train_pairs, eval_pairs)``; data warnings go to ``log``, not a traceback."""
    if cfg.train_file:
        train_records = D.load_preference_file(cfg.train_file)
        if cfg.eval_file:
            eval_records = D.load_preference_file(cfg.eval_file)
        else:
            # A seeded, fixed hold-out: the same pairs on every resume.
            n_eval = min(cfg.eval_size, len(train_records) // 10)
            if n_eval < 1:
                raise D.DataError(f"{cfg.train_file}: too few records ({len(train_records)}) to hold out an eval "
                                  "split; pass --eval-file")
            order = torch.randperm(len(train_records), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
            eval_records = [train_records[i] for i in order[:n_eval]]
            train_records = [train_records[i] for i in order[n_eval:]]
            log(f"data: held out {n_eval} of {len(order)} pairs of {cfg.train_file} for evaluation")
        sources = (cfg.train_file, cfg.eval_file or f"{cfg.train_file} (held out)")
    else:
        train_records, eval_records = D.builtin_task(cfg.train_size, cfg.eval_size, seed=cfg.seed)
        sources = ("built-in sorting task (train)", "built-in sorting task (held out)")
    out = []
    for records, source in zip((train_records, eval_records), sources):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pairs, _ = D.tokenize_pairs(records, tokenizer, cfg.max_length, cfg.max_prompt_length or None,
                                        cfg.truncation, source)
        for w in caught:
            log(f"warning: {w.message}")
        out.append(pairs)
    return out


def build_model(cfg: TrainConfig, tokenizer, device, checkpoint: Path | None):
    attn = attention_implementation(device)
    dtype = torch.bfloat16 if cfg.param_dtype == "bf16" else torch.float32
    if checkpoint is not None:  # resume: the weights of the checkpoint, whatever the source was
        lm = load_causal_lm(str(checkpoint), attn, dtype, cfg.trust_remote_code)
    elif cfg.model:
        lm = load_causal_lm(cfg.model, attn, dtype, cfg.trust_remote_code)
    else:
        torch.manual_seed(cfg.seed)
        lm = tiny_llama(len(tokenizer), tokenizer, cfg.n_layer, cfg.n_embd, cfg.n_head,
                        max_positions=max(cfg.max_length, 64), attn_implementation=attn).to(dtype)
    if len(tokenizer) > lm.get_output_embeddings().weight.shape[0]:
        raise ConfigError(f"tokenizer has {len(tokenizer)} tokens but the model's lm_head only "
                          f"{lm.get_output_embeddings().weight.shape[0]} rows")
    if cfg.disable_dropout:
        for module in lm.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "attn_pdrop", "embd_pdrop"):
            if isinstance(getattr(lm.config, key, None), float):
                setattr(lm.config, key, 0.0)
    lm.config.use_cache = False
    if cfg.gradient_checkpointing:  # renamed activation checkpointing in recent transformers
        if hasattr(lm, "activation_checkpointing_enable"):
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_fn = AlphaPOLoss(
        alpha=cfg.alpha, beta=cfg.beta, gamma=cfg.gamma, label_smoothing=cfg.label_smoothing,
        loss_type=cfg.loss_type, average_log_prob=cfg.average_log_prob, nll_weight=cfg.nll_weight,
        backend=cfg.backend, scratch_bytes=cfg.scratch_mb * 2**20 or None,
    )
    return AlphaPOModel(lm, loss_fn).to(device)


def lr_lambda(cfg: TrainConfig):
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``max_steps``."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine

    return factor


# ----------------------------------------------------------------------------------------
# Checkpoints: model (safetensors) + tokenizer + optimizer, scheduler, RNG, step; atomic.
#
# Each checkpoint is written into a temporary directory and renamed into place (a rename
# is atomic on one filesystem), then the one-line file ``latest`` is replaced the same
# way: a crash at any point leaves the previous checkpoint whole and ``latest`` pointing
# at a complete one. The trainer state holds only tensors, numbers and strings, so it
# loads with ``torch.load(weights_only=True)``: no pickled code runs on resume. Under
# data parallelism every rank joins in (FSDP gathers the full model and optimizer state
# onto rank 0), rank 0 alone writes, and nobody goes on until the checkpoint is complete.


def save_checkpoint(run_dir: Path, wrapper, tokenizer, optimizer, scheduler, step: int, nonfinite: int,
                    cfg: TrainConfig, keep_last: int, par: P.Parallel) -> Path:
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


def find_checkpoint(path) -> Path:
    """A checkpoint directory, or a run directory's latest checkpoint."""
    path = Path(path)
    if (path / "trainer_state.pt").is_file():
        return path
    if (path / "latest").is_file():
        ckpt = path / (path / "latest").read_text().strip()
        if (ckpt / "trainer_state.pt").is_file():
            return ckpt
    raise ConfigError(f"--resume {path}: neither a checkpoint (trainer_state.pt) nor a run directory (latest)")


def load_trainer_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------
# Evaluation on the held-out pairs.


@torch.no_grad()
def evaluate(wrapper, batches, device, autocast, par: P.Parallel) -> dict[str, float]:
    """Metrics over every held-out pair, TRL's names with an ``eval_`` prefix.

    Under data parallelism each rank evaluates its share of every batch and the sums are
    added over ranks; a rank left without a pair of the last batch runs a stand-in with
    weight 0 (under FSDP the forward is a collective every rank must join).
    """
    was_training = wrapper.training
    wrapper.eval()
    per_pair = {k: [] for k in ("chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards",
                                "reward_accuracy", "reward_margin")}
    weighted = dict.fromkeys(("loss", "chosen_logits_mean", "rejected_logits_mean", "nll_loss"), 0.0)
    counts = dict.fromkeys(("pairs", "chosen_tokens", "rejected_tokens"), 0)
    for batch in batches:
        batch, B = P.local_batch(batch, par, even=False)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            loss, aux = wrapper(**batch)
        for k in per_pair:
            per_pair[k].append(getattr(aux, k)[:B])
        # Pair means are weighted by pairs, token means (logits, NLL) by their target
        # tokens: the totals do not depend on how the pairs are batched or sharded.
        valid = batch["labels"][:, 1:] != -100  # the targets (collate's ignore index)
        n_chosen, n_rejected = valid[:B].sum(), valid[valid.shape[0] // 2 :][:B].sum()
        weighted["loss"] += loss.double() * B
        weighted["chosen_logits_mean"] += aux.chosen_logits_mean.double() * n_chosen
        weighted["rejected_logits_mean"] += aux.rejected_logits_mean.double() * n_rejected
        weighted["nll_loss"] += aux.nll_loss.double() * n_chosen
        counts["pairs"] += B
        counts["chosen_tokens"] += n_chosen
        counts["rejected_tokens"] += n_rejected
    wrapper.train(was_training)
    sums = {k: torch.cat(v).double().sum() for k, v in per_pair.items()} | weighted | counts
    sums = P.all_reduce(sums, par)  # over ranks
    n_pairs = int(sums["pairs"])
    pair = {k: sums[k] / n_pairs for k in per_pair}
    means = {"loss": sums["loss"] / n_pairs, "nll_loss": sums["nll_loss"] / sums["chosen_tokens"],
             "chosen_logits_mean": sums["chosen_logits_mean"] / sums["chosen_tokens"],
             "rejected_logits_mean": sums["rejected_logits_mean"] / sums["rejected_tokens"]}
    metrics = {
        "loss": means["loss"],
        "rewards/chosen": pair["chosen_rewards"],
        "rewards/rejected": pair["rejected_rewards"],
        "rewards/accuracies": pair["reward_accuracy"],
        "rewards/margins": pair["reward_margin"],
        "logps/chosen": pair["chosen_logps"],
        "logps/rejected": pair["rejected_logps"],
        "logits/chosen": means["chosen_logits_mean"],
        "logits/rejected": means["rejected_logits_mean"],
        "nll_loss": means["nll_loss"],
    }
    return {f"eval_{k}": float(v) for k, v in metrics.items()} | {"eval_pairs": n_pairs}


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


# ----------------------------------------------------------------------------------------
# The training loop.


class NonFiniteLossError(RuntimeError):
    """Too many steps had a non-finite loss or gradient."""


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
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's shard bar would break our progress bar
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif not cfg.model and pick_device(cfg.device).type == "cpu":
        torch.set_num_threads(1)
    # One process per device under torchrun (see alphapo/training/parallel.py); rank 0 alone logs
    # and writes files, every rank computes.
    par = P.setup(cfg.parallel, pick_device(cfg.device))
    device = par.device
    if not par.is_main:
        log = lambda *args: None  # noqa: E731
    autocast = autocast_context(cfg, device)
    checkpoint = find_checkpoint(cfg.resume) if cfg.resume else None
    if cfg.out_dir:
        run_dir = Path(cfg.out_dir)
    elif checkpoint is not None:
        run_dir = checkpoint.parent.parent
    else:
        run_dir = Path(P.broadcast(str(fresh_run_dir()), par))  # rank 0's clock names the run

    # Tokenizer, data and model. A resumed run takes all three from the checkpoint's
    # directory and the same files, so it sees the same token ids and the same batches.
    tokenizer = load_tokenizer(str(checkpoint) if checkpoint else (cfg.tokenizer or cfg.model),
                               trust_remote_code=cfg.trust_remote_code)
    train_pairs, eval_pairs = load_data(cfg, tokenizer, log)
    pad_id = tokenizer.pad_token_id
    # Global micro-batches, the same on every rank; each rank takes its B / R pairs of one.
    train_batches = D.PairBatches(train_pairs, cfg.batch_size, pad_id, seed=cfg.seed)
    eval_batches = D.PairBatches(eval_pairs, cfg.eval_batch_size, pad_id, shuffle=False)
    P.pair_range(cfg.batch_size, par)  # fail now if the batch does not split evenly over the ranks
    wrapper = P.wrap(build_model(cfg, tokenizer, device, checkpoint), par)
    wrapper.train()
    # Only now, with data and model in hand, does the run get a directory: a bad data file
    # or model path leaves nothing behind.
    if par.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    n_params = sum(p.numel() for p in wrapper.parameters())

    params = [p for p in wrapper.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]  # no weight decay on norms and biases
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    step, nonfinite = 0, 0
    metrics_path = run_dir / "metrics.jsonl"
    history: list[dict] = []
    if checkpoint is not None:
        state = load_trainer_state(checkpoint)
        P.load_optimizer_state(wrapper, optimizer, state["optimizer"], par)
        scheduler.load_state_dict(state["scheduler"])
        rng = state.get("rng_ranks", [state["rng"]])  # each rank's own, if saved by as many ranks
        rng = rng[par.rank] if len(rng) == par.world_size else state["rng"]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        step, nonfinite = state["step"], state["nonfinite"]
        # Keep the records up to the checkpoint (a crashed run may have logged past it).
        source = checkpoint.parent.parent / "metrics.jsonl"
        if source.is_file():
            history = [r for r in map(json.loads, source.read_text().splitlines()) if r["step"] <= step]
        P.barrier(par)  # every rank has read the records before rank 0 rewrites them
        if par.is_main:
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history))
        log(f"resumed from {checkpoint} at step {step}")
    elif metrics_path.exists() and par.is_main:
        metrics_path.unlink()

    def record(entry: dict):  # every rank keeps the history (for its summary), rank 0 writes it
        history.append(entry)
        if par.is_main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    log(f"alphapo-train: {'built-in tiny Llama' if not cfg.model else cfg.model} ({n_params / 1e6:.2f}M params), "
        f"{len(train_pairs)} train / {len(eval_pairs)} held-out pairs, {cfg.max_steps} steps of "
        f"{cfg.batch_size * cfg.grad_accum} pairs on {device}"
        f"{f' x {par.world_size} ({par.mode})' if par.world_size > 1 else ''}, alpha={cfg.alpha} -> {run_dir}")
    if step == 0:
        before = evaluate(wrapper, eval_batches, device, autocast, par)
        record({"step": 0, **before})
        log(f"step 0: held-out reward accuracy {before['eval_rewards/accuracies']:.1%}, "
            f"chosen log-prob {before['eval_logps/chosen']:.3f}")

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (cfg.progress and par.is_main), dynamic_ncols=True,
               desc="train")

    def say(message: str):  # through the bar while it is drawn, so it stays on one line
        bar.write(message) if cfg.progress and log is print else log(message)

    sums: dict[str, torch.Tensor] = {}
    n_logged, tokens, t_log = 0, 0, time.time()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    while step < cfg.max_steps:
        # Forward and backward over grad_accum micro-batches; micro-batch k of the whole
        # run is a pure function of k, which is what makes --resume exact.
        step_loss = torch.zeros((), device=device, dtype=torch.float64)
        step_metrics: dict[str, torch.Tensor] = {}
        step_tokens = torch.zeros((), device=device, dtype=torch.long)
        for micro in range(cfg.grad_accum):
            batch, _ = P.local_batch(train_batches.batch(step * cfg.grad_accum + micro), par)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            # DDP averages the ranks' gradients in the last micro-batch's backward; each
            # rank's loss is the mean over its B / R pairs, so the average is the whole
            # micro-batch's mean (alphapo/training/parallel.py).
            with P.grad_sync(wrapper, par, sync=micro == cfg.grad_accum - 1):
                with autocast():
                    loss, aux = wrapper(**batch)
                (loss / cfg.grad_accum).backward()
            step_loss += loss.detach().double() / cfg.grad_accum
            for k, v in aux.to_dict().items():
                step_metrics[k] = step_metrics.get(k, 0) + v.double() / cfg.grad_accum
            step_tokens += batch["attention_mask"].sum()
        grad_norm = P.clip_grad_norm(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        # The mean over ranks: the whole batch's loss, and one skip decision for every rank.
        step_loss = P.all_reduce({"loss": step_loss}, par, op="mean")["loss"]
        # The one host sync per step: skip an update whose loss or gradient is not finite.
        finite = bool(torch.isfinite(step_loss) & torch.isfinite(grad_norm))
        if finite:
            optimizer.step()
        else:
            nonfinite += 1
            say(f"warning: step {step + 1}: non-finite loss ({step_loss.item()}) or gradient norm "
                f"({grad_norm.item()}); update skipped ({nonfinite}/{cfg.max_nonfinite})")
            if nonfinite >= cfg.max_nonfinite:
                bar.close()
                raise NonFiniteLossError(
                    f"{nonfinite} steps had a non-finite loss or gradient (--max-nonfinite {cfg.max_nonfinite}); "
                    f"stopped at step {step + 1}. Lower --lr or check the data, then --resume {run_dir} "
                    "(its last checkpoint predates the failures)"
                )
        optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # torch warns when a skipped first step precedes this
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            scheduler.step()  # the schedule follows the step count, skipped steps included
        step += 1
        bar.update(1)
        tokens += step_tokens
        if finite:
            for k, v in {"loss": step_loss, "grad_norm": grad_norm.double(), **step_metrics}.items():
                sums[k] = sums.get(k, 0) + v
            n_logged += 1

        # A checkpoint step closes the log window too, so a resumed run logs the same records.
        saving = (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps
        if step % cfg.log_every == 0 or saving:
            elapsed = time.time() - t_log
            sums = P.all_reduce(sums, par, op="mean")  # each rank's metrics are over its own pairs
            tokens = P.all_reduce({"tokens": tokens}, par)["tokens"]
            entry = {"step": step, "lr": scheduler.get_last_lr()[0]}
            entry |= {k: float(v / max(n_logged, 1)) for k, v in sums.items()}
            entry |= {"tokens_per_s": float(tokens) / max(elapsed, 1e-9), "peak_mem_mb": peak_memory_mb(device),
                      "nonfinite_steps": nonfinite, "time_s": time.time() - t_start}
            record(entry)
            if "loss" in entry:
                bar.set_postfix(loss=f"{entry['loss']:.3f}", acc=f"{entry['rewards/accuracies']:.2f}",
                                margin=f"{entry['rewards/margins']:.2f}")
            sums, n_logged, tokens, t_log = {}, 0, 0, time.time()

        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            result = evaluate(wrapper, eval_batches, device, autocast, par)
            record({"step": step, **result})
            say(f"step {step}: held-out reward accuracy {result['eval_rewards/accuracies']:.1%}, "
                f"margin {result['eval_rewards/margins']:.2f}, chosen log-prob {result['eval_logps/chosen']:.3f}, "
                f"rejected {result['eval_logps/rejected']:.3f}")

        if saving:
            save_checkpoint(run_dir, wrapper, tokenizer, optimizer, scheduler, step, nonfinite, cfg, cfg.keep_last,
                            par)
    bar.close()

    summary = summarize(history, run_dir, cfg, time.time() - t_start)
    if par.is_main:
        if cfg.plot:
            plot_metrics(history, run_dir / "plot.png", title=f"AlphaPO, alpha = {cfg.alpha}")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print_summary(summary, log)
    P.teardown(par)
    return summary


# ----------------------------------------------------------------------------------------
# Plot and summary.


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


def summarize(history: list[dict], run_dir: Path, cfg: TrainConfig, seconds: float) -> dict:
    held = [r for r in history if "eval_loss" in r]
    first, last = held[0], held[-1]
    peak = max(held, key=lambda r: r["eval_logps/chosen"])  # displacement shows as a fall from here
    latest = (run_dir / "latest").read_text().strip() if (run_dir / "latest").is_file() else None
    return {
        "run_dir": str(run_dir),
        "steps": last["step"],
        "seconds": round(seconds, 1),
        "alpha": cfg.alpha,
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
    }


def print_summary(s: dict, log=print) -> None:
    log("")
    log(f"done: {s['steps']} steps in {s['seconds']:.0f} s")
    log(f"  held-out reward accuracy  {s['accuracy_before']:6.1%} -> {s['accuracy_after']:6.1%}"
        f"   ({s['eval_pairs']} pairs; chance is 50%)")
    log(f"  chosen log-prob / token   {s['chosen_logps_before']:7.3f} -> {s['chosen_logps_after']:7.3f}"
        f"   (drift {s['chosen_logps_drift']:+.3f}; highest {s['chosen_logps_peak']:.3f} at step "
        f"{s['chosen_logps_peak_step']})")
    log(f"  rejected log-prob / token {s['rejected_logps_before']:7.3f} -> {s['rejected_logps_after']:7.3f}"
        f"   (drift {s['rejected_logps_drift']:+.3f})")
    outputs = ["metrics.jsonl", "summary.json"] + (["plot.png"] if s["plot"] else [])
    if s["checkpoint"]:
        outputs.append(os.path.relpath(s["checkpoint"], s["run_dir"]) + "/ (model, tokenizer, optimizer)")
    log(f"  outputs in {s['run_dir']}/: " + ", ".join(outputs))


def main(argv=None) -> int:
    try:
        cfg = parse_config(argv)
        train(cfg)
    except (ConfigError, D.DataError, NonFiniteLossError, P.ParallelError) as e:
        print(f"alphapo-train: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("alphapo-train: interrupted; continue with --resume <run dir>", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
