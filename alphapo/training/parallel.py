"""Data parallelism for the trainer: one process per device under ``torchrun``, DDP or FSDP2.

Every rank holds a model replica (DDP) or a shard of every parameter, gradient and AdamW
state (FSDP2, ``torch.distributed.fsdp.fully_shard``), and each optimizer step's global
micro-batch of B pairs is split into R equal parts, B / R pairs per rank::

    rank r:  loss_r = (1 / (B/R)) Σ_{j in pairs of r} ℓ_j          (its local pair mean)
    DDP/FSDP: grad  = (1 / R) Σ_r ∇ loss_r                         (gradients averaged)
                    = (1 / B) Σ_j ∇ ℓ_j                            (the whole batch's mean)

The last line holds because every rank has the same pair count, which
:func:`local_batch` enforces for training (``batch_size % world_size == 0``). The
optional NLL term (``nll_weight > 0``) is a sum over chosen *tokens*, whose counts differ
between ranks: each call divides it by the step's chosen tokens over all ranks and
micro-batches per call (``nll_num_tokens``, :func:`alphapo.training.loop.nll_tokens_per_call`),
so its averaged gradient is the whole batch's token mean too.

The loss is computed inside the wrapped module's forward (:class:`alphapo.training.modeling.AlphaPOModel`),
so under FSDP2 the root module's pre-forward all-gather has unsharded ``lm_head.weight``
(which, with the embeddings and the final norm, belongs to the root's parameter group)
when the fused loss reads it, and its gradient is reduce-scattered after the backward
like any other. Each decoder layer is its own group, gathered only while it runs.

Checkpoints keep the single-process format (a ``save_pretrained`` model directory and an
ordinary ``optimizer.state_dict()``): under FSDP every rank joins a gather of the full
model and optimizer state onto rank 0's CPU, and rank 0 writes it; on resume every rank
loads the full state and keeps its shard. So a run saved with any world size and mode
resumes with any other.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from torch import nn

MODES = ("auto", "none", "ddp", "fsdp")


class ParallelError(ValueError):
    """A parallel setup that cannot run (mode, launch and device disagree)."""


@dataclass(frozen=True)
class Parallel:
    """Where this process stands: ``mode`` is "none", "ddp" or "fsdp"; ranks of the default group."""

    mode: str
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # this module initialised the process group, and destroys it in teardown

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs and writes files."""
        return self.rank == 0


def setup(mode: str, device: torch.device) -> Parallel:
    """The process group from torchrun's environment (or the caller's), and this rank's device.

    ``mode="auto"`` is DDP when more than one process runs, else none. A process group the
    caller already initialised (``torch.distributed.init_process_group``) is used as is;
    otherwise torchrun's ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT`` name it, with NCCL on CUDA and gloo on the CPU. On CUDA rank r uses
    GPU ``LOCAL_RANK``.
    """
    import torch.distributed as dist

    if mode not in MODES:
        raise ParallelError(f"parallel must be one of {MODES}, got {mode!r}")
    initialised = dist.is_available() and dist.is_initialized()
    launched = initialised or "WORLD_SIZE" in os.environ
    world_size = dist.get_world_size() if initialised else int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "auto":
        mode = "ddp" if world_size > 1 else "none"
    if mode == "none":
        if world_size > 1:
            raise ParallelError(f"{world_size} processes were launched but parallel is 'none': each would train "
                                "alone and write the same files; use --parallel ddp or fsdp (or one process)")
        return Parallel("none", 0, 1, device, owns_group=False)
    if not launched:
        raise ParallelError(f"parallel {mode!r} needs one process per device: launch with torchrun "
                            "(torchrun --nproc_per_node=N -m alphapo.training ...), or use --parallel none")
    if device.type == "cuda":
        if device.index is not None and world_size > 1:
            raise ParallelError(f"device {device} names one GPU for every rank; use --device cuda (rank r "
                                "takes GPU LOCAL_RANK)")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ParallelError(f"parallel {mode!r} runs on cuda (NCCL) or cpu (gloo), not {device}")
    if not initialised:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return Parallel(mode, dist.get_rank(), dist.get_world_size(), device, owns_group=not initialised)


def teardown(par: Parallel) -> None:
    """Destroy the process group if :func:`setup` created it."""
    if par.owns_group:
        import torch.distributed as dist

        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------
# Wrapping the model.


def decoder_layers(lm: nn.Module) -> list[nn.Module]:
    """The LM's repeated blocks: modules whose class the model names in ``_no_split_modules``
    (Hugging Face's list of blocks that must stay whole: the decoder layers)."""
    names = set(getattr(lm, "_no_split_modules", None) or ())
    layers = [m for m in lm.modules() if type(m).__name__ in names]
    if not layers:
        raise ParallelError(f"{type(lm).__name__} names no decoder layer class (_no_split_modules): "
                            "FSDP needs one group per layer")
    return layers


def wrap(model: nn.Module, par: Parallel) -> nn.Module:
    """``model`` (an :class:`~alphapo.training.modeling.AlphaPOModel` on ``par.device``) made data-parallel.

    DDP: a replica per rank whose gradients are all-reduced (averaged) in the backward.
    No buffer broadcast before each forward: the only buffers are rotary-embedding
    constants, and without it a forward issues no collective (evaluation under ``no_grad``).

    FSDP2: ``fully_shard`` on every decoder layer, then on the root ``model``, whose group
    holds what the layers do not: embeddings, final norm and ``lm_head``. The root's
    parameters are all-gathered before ``model.forward`` runs, so the loss inside it reads
    the whole (V, H) ``lm_head.weight``; the root stays unsharded until its backward.
    The optimizer must be built after this call (it holds the sharded parameters).
    """
    if par.mode == "none":
        return model
    if par.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [par.device.index] if par.device.type == "cuda" else None
        # torch 2.13 renamed the switch (and deprecated the old name); older torch knows only the old one.
        import inspect

        renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        no_buffer_sync = {"forward_sync_buffers" if renamed else "broadcast_buffers": False}
        return DistributedDataParallel(model, device_ids=device_ids, **no_buffer_sync)
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model.lm):
        fully_shard(layer)
    fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The :class:`~alphapo.training.modeling.AlphaPOModel` inside a DDP wrapper (FSDP2 keeps the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def grad_sync(model: nn.Module, par: Parallel, sync: bool):
    """Context for one micro-batch's forward *and* backward (DDP decides in the forward).

    Under DDP, ``sync=False`` skips the gradient all-reduce (``no_sync``) for all but the
    last micro-batch of a step: the gradients accumulate locally and the last backward
    averages the total, the same result (the sum is linear) for one all-reduce per step.
    FSDP reduce-scatters every micro-batch: skipping it would hold unsharded gradients,
    the memory FSDP is there to save.
    """
    if par.mode == "ddp" and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------
# Data: this rank's pairs of a global micro-batch.


def pair_range(B: int, par: Parallel, even: bool = True) -> tuple[int, int]:
    """``(start, stop)``: the pairs of a B-pair batch this rank takes (contiguous, rank order).

    ``even``: every rank must get B / R pairs (training: equal counts make the averaged
    gradient the whole batch's mean). Otherwise the first ``B % R`` ranks take one more,
    and a rank may get none (the last, short batch of an evaluation).
    """
    R, r = par.world_size, par.rank
    if even and B % R:
        raise ParallelError(f"a batch of {B} pairs does not split evenly over {R} ranks: make --batch-size a "
                            f"multiple of {R}")
    base, extra = divmod(B, R)
    start = r * base + min(r, extra)
    return start, start + base + (r < extra)


def local_batch(batch: dict[str, torch.Tensor], par: Parallel, even: bool = True):
    """``(rank_batch, n_pairs)``: this rank's pairs of a collated (2B, T) batch, chosen rows first.

    Chosen row j and rejected row B + j travel together. Columns past the rank's longest
    row are dropped (its own right padding). A rank with no pairs (only with
    ``even=False``) gets pair 0 with ``n_pairs = 0``: it still runs the forward, which
    under FSDP is a collective, and the caller gives that pair weight 0.
    """
    if par.world_size == 1:
        return batch, batch["input_ids"].shape[0] // 2
    B = batch["input_ids"].shape[0] // 2
    start, stop = pair_range(B, par, even)
    pairs = torch.arange(start, stop) if stop > start else torch.zeros(1, dtype=torch.long)
    rows = torch.cat([pairs, B + pairs])
    mask = batch["attention_mask"][rows]
    T = int(mask.sum(1).max())  # right padding: every row's tokens are its first ones
    return {k: v[rows, :T] for k, v in batch.items()}, stop - start


# ----------------------------------------------------------------------------------------
# Collectives for metrics and control flow (no-ops in one process).


def all_reduce(values: dict[str, torch.Tensor], par: Parallel, op: str = "sum") -> dict[str, torch.Tensor]:
    """The same keys, each the sum (or mean, ``op="mean"``) over ranks, in one all-reduce.

    Every rank must pass the same keys in the same order. Values are stacked as float64 on
    the rank's device (exact for the integer counts, and gloo and NCCL both sum float64).
    """
    if par.world_size == 1 or not values:
        return values
    import torch.distributed as dist

    flat = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=par.device).reshape(())
                        for v in values.values()])
    dist.all_reduce(flat)  # SUM (gloo has no AVG)
    if op == "mean":
        flat = flat / par.world_size
    return dict(zip(values, flat.unbind()))


def barrier(par: Parallel) -> None:
    if par.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def broadcast(obj, par: Parallel):
    """Rank 0's ``obj`` (picklable) on every rank."""
    if par.world_size == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj, par: Parallel) -> list | None:
    """Every rank's ``obj`` (picklable), in rank order, on rank 0; None elsewhere."""
    if par.world_size == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * par.world_size if par.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_``, returning a plain tensor: the global norm.

    Under DDP every rank holds the same averaged gradients, hence the same norm. Under
    FSDP the gradients are shards (DTensors) and torch reduces the norm over ranks; its
    result is a replicated DTensor, taken here as the local (full) value.
    """
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


# ----------------------------------------------------------------------------------------
# Checkpoints: the full state on rank 0 (FSDP gathers it), loaded whole on every rank.


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module, par: Parallel) -> dict[str, torch.Tensor] | None:
    """Under FSDP, the LM's whole state dict (CPU, keys as ``lm.state_dict()``) on rank 0,
    an empty dict elsewhere; every rank must call it. None otherwise: the model is whole."""
    if par.mode != "fsdp":
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_full_options())
    return {k.removeprefix("lm."): v for k, v in state.items() if k.startswith("lm.")}


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The fully qualified name of every optimizer parameter, in ``state_dict()`` index order."""
    names = {p: n for n, p in model.named_parameters()}
    return [names[p] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, par: Parallel) -> dict | None:
    """``optimizer.state_dict()`` of the whole model, on rank 0 (None on the others).

    Under FSDP every rank joins the gather of the sharded AdamW state (keyed by parameter
    name), which is turned back into the ordinary index-keyed form, so the file reads the
    same as a single-process one.
    """
    if par.mode != "fsdp":
        return optimizer.state_dict() if par.is_main else None
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    named = get_optimizer_state_dict(model, optimizer, options=_full_options())
    if not par.is_main:
        return None
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    return {
        "state": {index[name]: value for name, value in named["state"].items()},
        "param_groups": [{**g, "params": [index[name] for name in g["params"]]} for g in named["param_groups"]],
    }


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, par: Parallel) -> None:
    """Load an index-keyed ``optimizer.state_dict()`` (from any mode); under FSDP each rank keeps its shards."""
    if par.mode != "fsdp":
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _param_names(model, optimizer)
    named = {
        "state": {names[i]: value for i, value in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, named, options=_full_options())
