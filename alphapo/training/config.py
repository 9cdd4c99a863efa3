"""The trainer's config: every knob with its default and meaning, the command line, config files.

One dataclass, :class:`TrainConfig`, holds every knob; its defaults are the main job. The
command line has one flag per knob (``--n-embd`` for ``n_embd``, ``--no-plot`` for a
boolean), generated from the dataclass, so the two cannot drift apart. Values come from,
lowest first: the defaults, the resumed run's saved config, a ``--config`` file, the flags.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..loss import BACKENDS
from . import checkpoint as C
from . import data as D
from . import parallel as P

# What ``alphapo-train --help`` says first.
DESCRIPTION = """\
alphapo-train: a slim AlphaPO trainer whose loss never builds the logits.

With no arguments it trains a tiny random-init Llama on the built-in digit-sorting
preference task (CPU, about two minutes on two cores) and reports how the held-out reward
accuracy and the chosen/rejected log-probs moved. Given a local Hugging Face model and a
TRL-format preference file it trains that instead (a GPU, bf16 autocast, Triton loss):

    alphapo-train                                           # the main job
    alphapo-train --alpha 0 --max-steps 200                 # SimPO, shorter
    alphapo-train --model ./Qwen2.5-0.5B-Instruct --train-file prefs.jsonl \\
        --batch-size 4 --grad-accum 8 --lr 5e-7 --max-length 1024
    alphapo-train --config run.yaml --lr 1e-6               # file, then flags on top
    alphapo-train --resume runs/alphapo-20250101-120000     # continue exactly"""

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
    overwrite: bool = knob(False, "replace the run that --out-dir holds (its checkpoints and metrics are deleted) "
                           "instead of refusing the directory")
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

# On --resume the run's saved config is the base, and a knob given with a different value
# does one of three things. FIXED: refused, since the model, the data and the batches of
# a run are its identity (the weights come from the checkpoint whatever --n-embd says).
# CHANGEABLE: applied from the resume step on and recorded as a change at that step (in
# metrics.jsonl, the checkpoints and the summary). NOT_INHERITED: this invocation's alone,
# never taken from the saved config (--trust-remote-code runs code: only when asked for
# now). Every other knob (device, logging, checkpoint cadence) is inherited unless given.
FIXED = ("model", "tokenizer", "n_layer", "n_embd", "n_head", "disable_dropout", "train_file", "eval_file",
         "train_size", "eval_size", "max_length", "max_prompt_length", "truncation", "loss_type",
         "average_log_prob", "batch_size", "grad_accum", "seed", "param_dtype")
CHANGEABLE = ("alpha", "beta", "gamma", "label_smoothing", "nll_weight", "max_steps", "lr", "min_lr_ratio",
              "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2", "grad_clip")
NOT_INHERITED = ("trust_remote_code", "out_dir", "resume", "overwrite")


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
        description=DESCRIPTION,
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
        base = C.saved_config(C.find_checkpoint(values["resume"])[0])
        base = {k: v for k, v in base.items() if k in {f.name for f in fields(TrainConfig)} - set(NOT_INHERITED)}
    return check_config(TrainConfig(**{**base, **values}))


def resume_changes(saved: dict, cfg: TrainConfig, step: int) -> list[dict]:
    """What ``cfg`` changes of the saved run's config at ``step``: ``[{"step", "knob", "from", "to"}]``.

    Raises :class:`ConfigError` on a FIXED knob that differs.
    """
    changes = []
    for f in fields(cfg):
        if f.name not in saved or saved[f.name] == getattr(cfg, f.name):
            continue
        was, now = saved[f.name], getattr(cfg, f.name)
        if f.name in FIXED:
            raise ConfigError(
                f"--resume: {f.name} is {was!r} in the run and {now!r} here; a resumed run keeps its model, data "
                f"and batches (start a new run to change {f.name}, or leave it out to resume)")
        if f.name in CHANGEABLE:
            changes.append({"step": step, "knob": f.name, "from": was, "to": now})
    return changes

