"""What a run is made of, built from its config: device and precision, data, model and loss, optimizer.

Each function takes the :class:`~alphapo.training.config.TrainConfig` and returns one part;
:func:`alphapo.training.loop.train` puts them together.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path

import torch

from ..loss import AlphaPOLoss
from . import checkpoint as C
from . import data as D
from .checkpoint import CheckpointError
from .config import ConfigError, TrainConfig
from .modeling import AlphaPOModel, attention_implementation, load_causal_lm, tiny_llama
from .tokenizer import load_tokenizer

# ----------------------------------------------------------------------------------------
# Device and precision


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


# ----------------------------------------------------------------------------------------
# Data, model, optimizer


def load_data(cfg: TrainConfig, tokenizer, log):
    """Tokenised ``(train_pairs, eval_pairs)``; data warnings go to ``log``, not a traceback.

    Each record keeps its place in its file (``line 7``) through the held-out split, so a
    warning or an error names the line a user can open.
    """
    if cfg.train_file:
        train = D.read_preference_file(cfg.train_file)
        if cfg.eval_file:
            held = D.read_preference_file(cfg.eval_file)
        else:
            # A seeded, fixed hold-out: the same pairs on every resume.
            n = len(train[0])
            n_eval = min(cfg.eval_size, n // 10)
            if n_eval < 1:
                raise D.DataError(f"{cfg.train_file}: too few records ({n}) to hold out an eval split (at most 10%); "
                                  "pass --eval-file")
            order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
            held = tuple([part[i] for i in order[:n_eval]] for part in train)
            train = tuple([part[i] for i in order[n_eval:]] for part in train)
            log(f"data: held out {n_eval} of {n} pairs of {cfg.train_file} for evaluation")
        sources = (cfg.train_file, cfg.eval_file or f"{cfg.train_file} (held out)")
    else:
        train_records, eval_records = D.builtin_task(cfg.train_size, cfg.eval_size, seed=cfg.seed)
        train, held = (train_records, None), (eval_records, None)
        sources = ("built-in sorting task (train)", "built-in sorting task (held out)")
    out = []
    for (records, where), source in zip((train, held), sources):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pairs, _ = D.tokenize_pairs(records, tokenizer, cfg.max_length, cfg.max_prompt_length or None,
                                        cfg.truncation, source, where)
        for w in caught:
            log(f"warning: {w.message}")
        out.append(pairs)
    return out


def data_digests(cfg: TrainConfig) -> dict[str, str]:
    """The SHA-256 of each data file (``train_file``, ``eval_file``): a run's data by content.

    A resumed run must see the pairs it trained on; the same path is not enough, since a
    file edited in place (preferences flipped, rows added) would train on other pairs
    unseen. (One read of each file, at SHA-256's 1-2 GB/s.)
    """
    return {name: C.sha256_file(Path(getattr(cfg, name))) for name in ("train_file", "eval_file")
            if getattr(cfg, name)}


def check_same_data(saved: dict, data: dict, checkpoint: Path) -> None:
    """Refuse to resume on data files whose content differs from the run's (``saved["data"]``)."""
    for name, digest in saved["data"].items():
        if data.get(name, digest) != digest:
            path = saved["config"].get(name)
            raise D.DataError(
                f"--resume: {path} ({name}) has changed since the run trained on it (its SHA-256 differs from the "
                f"one in {checkpoint / 'trainer_state.json'}): a resumed run keeps its data; restore the file, or "
                "start a new run to train on the new one")


def build_tokenizer(cfg: TrainConfig, checkpoint: Path | None):
    """The checkpoint's tokenizer when resuming (the same token ids), else --tokenizer's, --model's or the built-in."""
    source = str(checkpoint) if checkpoint is not None else (cfg.tokenizer or cfg.model)
    try:
        return load_tokenizer(source, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # transformers raises many kinds (OSError, ValueError, ...): name the path
        error = CheckpointError if checkpoint is not None else ConfigError
        raise error(f"tokenizer {source}: does not load ({type(e).__name__}: {e})") from e


def load_lm(cfg: TrainConfig, tokenizer, device, checkpoint: Path | None):
    """The causal LM: the checkpoint's weights when resuming (whatever the source was), --model's, or
    the built-in tiny Llama (random init). Loaded weights must be finite: NaN weights would only
    show up as steps of NaN loss later."""
    attn = attention_implementation(device)
    dtype = torch.bfloat16 if cfg.param_dtype == "bf16" else torch.float32
    if checkpoint is None and not cfg.model:
        torch.manual_seed(cfg.seed)
        return tiny_llama(len(tokenizer), tokenizer, cfg.n_layer, cfg.n_embd, cfg.n_head,
                          max_positions=max(cfg.max_length, 64), attn_implementation=attn).to(dtype)
    source, error = (checkpoint, CheckpointError) if checkpoint is not None else (cfg.model, ConfigError)
    try:
        lm = load_causal_lm(str(source), attn, dtype, cfg.trust_remote_code)
    except Exception as e:  # transformers raises many kinds (OSError, ValueError, ...): name the path
        raise error(f"{source}: the model does not load ({type(e).__name__}: {e})") from e
    for name, param in lm.named_parameters():
        if not torch.isfinite(param).all():
            raise error(f"{source}: parameter {name} is not finite (NaN or inf): these weights cannot train")
    return lm


def build_model(cfg: TrainConfig, tokenizer, device, checkpoint: Path | None):
    """The LM with the AlphaPO loss inside its forward (:class:`AlphaPOModel`), on ``device``."""
    lm = load_lm(cfg, tokenizer, device, checkpoint)
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


def build_optimizer(cfg: TrainConfig, params: list) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``params`` (weight decay on matrices only) and its warm-up + cosine schedule."""
    decay = [p for p in params if p.dim() >= 2]  # no weight decay on norms and biases
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def follow_config(cfg: TrainConfig, optimizer: torch.optim.Optimizer, scheduler) -> None:
    """Make a restored optimizer and schedule follow ``cfg``: a resume that changed lr, betas or decay.

    ``optimizer.load_state_dict`` puts back each group's saved lr, betas and weight decay,
    and the scheduler's its saved base lr, so without this a new ``--lr`` on resume would
    change nothing. (The schedule's shape, warm-up, floor and ``max_steps``, is the function
    ``lr_lambda(cfg)``, which a scheduler's state does not hold: it follows ``cfg`` already.)
    """
    decay, no_decay = optimizer.param_groups
    decay["weight_decay"], no_decay["weight_decay"] = cfg.weight_decay, 0.0
    factor = lr_lambda(cfg)(scheduler.last_epoch)
    for group in optimizer.param_groups:
        group["betas"] = (cfg.adam_beta1, cfg.adam_beta2)
        group["initial_lr"], group["lr"] = cfg.lr, cfg.lr * factor
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
