"""The trainer's config: every knob with its default and meaning, the command line, config files.

One dataclass, :class:`TrainConfig`, holds every knob; its defaults are the main job. The
command line has one flag per knob (``--n-embd`` for ``n_embd``, ``--no-plot`` for a
boolean), generated from the dataclass, so the two cannot drift apart. Values come from,
lowest first: the defaults, the resumed run's saved config, a ``--config`` file, the flags.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from ..epilogue import AlphaPOConfig
from ..loss import BACKENDS, resolve_backend
from ..pair_losses import LOSS_TYPES
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
    label_smoothing: float = knob(0.0, "conservative sigmoid loss epsilon, in [0, 0.5] (sigmoid only)")
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
    progress: bool = knob(True, "show progress: a bar on a terminal, else a plain line every 1/20 of the run")


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
# metrics.jsonl, the checkpoints and the summary): the loss and optimisation knobs, and the
# precision and backend, which change the numerics. NOT_INHERITED: this invocation's alone,
# never taken from the saved config (--trust-remote-code runs code: only when asked for
# now). Every other knob (device, logging, checkpoint cadence) is inherited unless given.
FIXED = ("model", "tokenizer", "n_layer", "n_embd", "n_head", "disable_dropout", "train_file", "eval_file",
         "train_size", "eval_size", "max_length", "max_prompt_length", "truncation", "loss_type",
         "average_log_prob", "batch_size", "grad_accum", "seed", "param_dtype")
CHANGEABLE = ("alpha", "beta", "gamma", "label_smoothing", "nll_weight", "max_steps", "lr", "min_lr_ratio",
              "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2", "grad_clip", "precision", "backend")
NOT_INHERITED = ("trust_remote_code", "out_dir", "resume", "overwrite")


class ConfigError(ValueError):
    """A knob value or a config file that cannot be used."""


# The range of every numeric knob: a test and its words. Floats must be finite as well.
def _at_least(n):
    return (lambda v: v >= n), f">= {n}"


ANY, POSITIVE = ((lambda v: True), ""), ((lambda v: v > 0), "> 0")
RANGES = {
    "n_layer": _at_least(1), "n_embd": _at_least(1), "n_head": _at_least(1), "train_size": _at_least(1),
    "eval_size": _at_least(1), "max_length": _at_least(2), "max_prompt_length": _at_least(0),
    "alpha": ANY, "beta": POSITIVE, "gamma": ANY, "label_smoothing": ((lambda v: 0 <= v <= 0.5), "in [0, 0.5]"),
    "nll_weight": _at_least(0), "scratch_mb": _at_least(0),
    "batch_size": _at_least(1), "grad_accum": _at_least(1), "max_steps": _at_least(1), "lr": POSITIVE,
    "min_lr_ratio": ((lambda v: 0 <= v <= 1), "in [0, 1]"), "warmup_steps": _at_least(0),
    "weight_decay": _at_least(0), "adam_beta1": ((lambda v: 0 <= v < 1), "in [0, 1)"),
    "adam_beta2": ((lambda v: 0 <= v < 1), "in [0, 1)"), "grad_clip": _at_least(0),
    "seed": ((lambda v: 0 <= v < 2**63), "in [0, 2**63)"), "threads": _at_least(0),
    "eval_batch_size": _at_least(1), "log_every": _at_least(1), "eval_every": _at_least(1),
    "save_every": _at_least(0), "keep_last": _at_least(1), "max_nonfinite": _at_least(1),
}
TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool}


def check_config(cfg: TrainConfig) -> TrainConfig:
    """Every knob's type, choices and range, and the knobs that must agree; :class:`ConfigError`
    names the knob (and its flag) and what it may be. Cheap: it runs before any setup."""
    for f in fields(cfg):
        value, flag = getattr(cfg, f.name), f"{f.name} (--{f.name.replace('_', '-')})"
        if f.name in RANGES:
            _check_number(f.name, flag, f.type, value)
        elif not isinstance(value, TYPES[f.type]):
            raise ConfigError(f"{flag} must be a {f.type}, got {value!r}")
        if f.metadata["choices"] and value not in f.metadata["choices"]:
            raise ConfigError(f"{flag} must be one of {f.metadata['choices']}, got {value!r}")
    _check_together(cfg)
    return cfg


def _check_number(name: str, flag: str, kind: str, value) -> None:
    allowed, form = RANGES[name]
    number = isinstance(value, TYPES[kind]) and not isinstance(value, bool)
    if not number or (kind == "float" and not math.isfinite(value)) or not allowed(value):
        what = "an integer" if kind == "int" else "a finite number"
        raise ConfigError(f"{flag} must be {what}{' ' + form if form else ''}, got {value!r}")


def _check_together(cfg: TrainConfig) -> None:
    """Knobs that must agree with each other, and the paths that must exist."""
    if not cfg.model:  # the built-in Llama
        if cfg.n_embd % cfg.n_head:
            raise ConfigError(f"n_embd ({cfg.n_embd}) must be a multiple of n_head ({cfg.n_head}): --n-embd, --n-head")
        if (cfg.n_embd // cfg.n_head) % 2:
            raise ConfigError(f"n_embd / n_head = {cfg.n_embd // cfg.n_head}: rotary embeddings need an even head "
                              "size (--n-embd, --n-head)")
    if cfg.label_smoothing > 0 and LOSS_TYPES[cfg.loss_type].smoothing == "no":
        raise ConfigError(f"label_smoothing (--label-smoothing) {cfg.label_smoothing} has no effect on --loss-type "
                          f"{cfg.loss_type} (only sigmoid is smoothed): leave it at 0, or use --loss-type sigmoid")
    try:  # whatever else the loss would refuse, refused now rather than after seconds of loading
        AlphaPOConfig(alpha=cfg.alpha, beta=cfg.beta, gamma=cfg.gamma, label_smoothing=cfg.label_smoothing,
                      loss_type=cfg.loss_type, average_log_prob=cfg.average_log_prob, nll_weight=cfg.nll_weight)
    except ValueError as e:
        raise ConfigError(f"loss knobs (--alpha, --beta, --gamma, --label-smoothing, --loss-type, --nll-weight): "
                          f"{e}") from None
    if not cfg.train_file and cfg.batch_size > cfg.train_size:
        raise ConfigError(f"batch_size ({cfg.batch_size}) exceeds the built-in task's train_size "
                          f"({cfg.train_size}): lower --batch-size or raise --train-size")
    if cfg.max_prompt_length >= cfg.max_length:
        raise ConfigError(f"max_prompt_length ({cfg.max_prompt_length}) must be smaller than max_length "
                          f"({cfg.max_length}), leaving room for a completion")
    try:
        device_type = torch.device(cfg.device if cfg.device != "auto" else "cpu").type
    except RuntimeError:
        device_type = None
    if device_type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device (--device) must be auto, cpu, cuda, cuda:N or mps, got {cfg.device!r}")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device (--device) {cfg.device}: torch sees no MPS device here; use --device cpu or auto")
    _check_backend(cfg, device_type)
    for name, kind in (("model", "directory"), ("tokenizer", "directory"), ("train_file", "file"),
                       ("eval_file", "file")):
        path = getattr(cfg, name)
        if cfg.resume and name in ("model", "tokenizer"):
            continue  # a resumed run loads both from its checkpoint
        if path and not (Path(path).is_dir() if kind == "directory" else Path(path).is_file()):
            raise ConfigError(f"{name} (--{name.replace('_', '-')}) {path}: no such {kind}"
                              + (" (a local Hugging Face model; nothing is downloaded)" if name == "model" else ""))


def _check_backend(cfg: TrainConfig, device_type: str) -> None:
    """The loss backend can run on the run's device, in its precision (else: a raw error after the
    data and model have loaded, from the first loss call)."""
    if cfg.device == "auto" and torch.cuda.is_available():
        device_type = "cuda"
    try:
        backend = resolve_backend(cfg.backend, torch.device(device_type))
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"backend (--backend) {cfg.backend} cannot run here: {e}") from None
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device_type == "cuda") or cfg.param_dtype == "bf16"
    if backend == "triton" and bf16 and os.environ.get("TRITON_INTERPRET") == "1":
        raise ConfigError("backend (--backend) triton under TRITON_INTERPRET=1 cannot compute bfloat16 (the "
                          "interpreter's bf16 tl.dot is wrong): pass --precision fp32 --param-dtype fp32, or "
                          "--backend torch")


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
    parser.add_argument("--config", metavar="FILE", help="YAML, JSON or TOML file of knob values (flags override it)")
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
    """Knob values from a YAML, JSON or TOML file, by its extension (keys with ``_`` or ``-``), type-checked."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path}: no such file")
    values = _read_mapping(path)
    known = {f.name: f for f in fields(TrainConfig)}
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"config file {path}: unknown knob {key!r} (see alphapo-train --help)")
        kind = known[name].type
        if kind == "float" and isinstance(value, str) and path.suffix.lower() in (".yaml", ".yml"):
            # YAML 1.1 reads 1e-6 (no dot) as a string; a float knob takes it as the number it spells.
            with contextlib.suppress(ValueError):
                value = float(value)
        if not isinstance(value, TYPES[kind]) or (kind != "bool" and isinstance(value, bool)):
            raise ConfigError(f"config file {path}: {key} must be {kind}, got {value!r}")
        out[name] = float(value) if kind == "float" else value
    return out


def _read_mapping(path: Path) -> dict:
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json", ".toml"):
        raise ConfigError(f"config file {path}: unknown format {suffix!r}; use .yaml, .yml, .json or .toml")
    if suffix == ".json":
        loads = json.loads
    elif suffix == ".toml":
        loads = _toml().loads
    else:
        import yaml

        loads = yaml.safe_load
    try:
        values = loads(path.read_text(encoding="utf-8"))
    except Exception as e:  # json's and tomllib's errors are ValueErrors, yaml's a YAMLError
        kind = {".json": "JSON", ".toml": "TOML"}.get(suffix, "YAML")
        raise ConfigError(f"config file {path}: not valid {kind} ({e})") from None
    values = {} if values is None else values  # an empty YAML file
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path}: expected a mapping of knob names to values")
    return values


def _toml():
    try:
        import tomllib  # Python 3.11+
    except ImportError:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError("a .toml config file needs Python 3.11+ or the tomli package") from None
    return tomllib


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

    Raises :class:`ConfigError` on a FIXED knob that differs, and on a ``max_steps`` below
    ``step``: those steps are trained already, and a shorter run would be recorded but never run.
    """
    if cfg.max_steps < step:
        raise ConfigError(f"--resume: max_steps (--max-steps) {cfg.max_steps} is below step {step}, where the run "
                          f"resumes: its steps up to {step} are trained already; give --max-steps {step} or more "
                          "(or resume an earlier checkpoint)")
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

