"""What the TRL trainers share: the patched forward, and exact accumulation of an NLL term.

**The patched forward.** An integration never calls the ``lm_head``: it patches the
``forward`` of the causal LM *instance* so that the loss runs inside the model's own
forward, where a DDP/FSDP wrapper around the model has done its work (FSDP has gathered
the ``lm_head`` weight), as the Liger and Cut Cross-Entropy integrations do. The patched
forward answers three kinds of call::

    lm(input_ids=ids, attention_mask=mask, alphapo_labels=labels, ...)  -> (loss, aux)
    lm(input_ids=ids, attention_mask=mask, alphapo_hidden=True)         -> final hidden states
    lm(anything else)                                                   -> the model's own forward

The keyword arguments travel through the wrappers unchanged (PEFT's ``PeftModel`` and
TRL's own patched forward pass unknown keywords down), so the same call works on the
wrapped model.

**Exact accumulation of an NLL term.** A loss with an NLL term (DPO's ``"sft"``, CPO's
``cpo_alpha``) averages it over one micro-batch's chosen tokens; under gradient
accumulation over k micro-batches and data parallelism over R ranks the step's gradient
is then a mean of k·R per-micro-batch means, not the mean over the step's tokens (TRL
itself computes it so). The mixin counts the step's chosen tokens when the trainer
fetches its micro-batches (``Trainer.get_batch_samples``, once per optimizer step, on
every rank) and hands each micro-batch ``nll_num_tokens = total / (k·R)``: divided by k
by the trainer and averaged over ranks by DDP, every chosen token then weighs
``1 / total``, as in one big batch.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

from torch import nn

from ..loss import AlphaPOLoss
from ..training.modeling import decoder_and_head, fused_forward, last_hidden_state

# Keywords a wrapper may pass down with a value that changes nothing for the fused call.
_HARMLESS = ("use_cache", "return_dict", "output_attentions", "output_hidden_states")


@dataclass
class _Patch:
    original_forward: object
    loss_fn: AlphaPOLoss | None


def causal_lm(model: nn.Module) -> nn.Module:
    """The causal LM inside a PEFT wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _text_inputs(args, kwargs):
    """``(input_ids, attention_mask)`` of a fused call; anything else it cannot honour raises."""
    input_ids = kwargs.pop("input_ids", args[0] if args else None)
    attention_mask = kwargs.pop("attention_mask", args[1] if len(args) > 1 else None)
    extra = sorted(k for k, v in kwargs.items() if v is not None and k not in _HARMLESS)
    if len(args) > 2 or extra or input_ids is None:
        raise NotImplementedError(
            "the fused forward takes text inputs only (input_ids and attention_mask); got "
            f"{extra or 'no input_ids'} (vision-language inputs, inputs_embeds and prompt-learning PEFT "
            "adapters are not supported)"
        )
    return input_ids, attention_mask


def _forward(self, *args, alphapo_labels=None, alphapo_hidden=False, alphapo_loss=None, alphapo_nll_tokens=None,
             alphapo_ref_logps=None, alphapo_ref_hidden=None, alphapo_ref_weight=None, alphapo_ref_bias=None,
             **kwargs):
    patch = self._alphapo_patch
    if alphapo_labels is None and not alphapo_hidden:
        return patch.original_forward(*args, **kwargs)
    input_ids, attention_mask = _text_inputs(args, kwargs)
    if alphapo_hidden:
        return last_hidden_state(self, input_ids, attention_mask)
    loss_fn = alphapo_loss if alphapo_loss is not None else patch.loss_fn
    if loss_fn is None:
        raise RuntimeError("this model was patched for hidden states only: pass alphapo_loss=")
    return fused_forward(self, loss_fn, input_ids, attention_mask, alphapo_labels, nll_num_tokens=alphapo_nll_tokens,
                         ref_logps=alphapo_ref_logps, ref_hidden=alphapo_ref_hidden, ref_weight=alphapo_ref_weight,
                         ref_bias=alphapo_ref_bias)


def patch_forward(lm: nn.Module, loss_fn: AlphaPOLoss | None = None) -> nn.Module:
    """Make ``lm``'s forward answer the fused calls (module docstring); returns ``lm``.

    The patch is on this instance only and checks now that the fused path can reproduce
    the model (:func:`~alphapo.training.modeling.decoder_and_head`). Patching a patched
    model only replaces its loss (when one is given): a patch another library put on top
    of ours in between (TRL's fused LM head) stays in place. :func:`unpatch_forward`
    removes it.
    """
    decoder_and_head(lm)
    patch = getattr(lm, "_alphapo_patch", None)
    if patch is not None:
        if loss_fn is not None:
            patch.loss_fn = loss_fn
        return lm
    # A plain attribute holder, not the nn.Module itself: the loss must not become a submodule.
    lm._alphapo_patch = _Patch(lm.forward, loss_fn)
    lm.forward = types.MethodType(_forward, lm)
    return lm


def unpatch_forward(lm: nn.Module) -> nn.Module:
    """Remove every instance-level ``forward`` of ``lm`` (ours and any patch above it)."""
    if getattr(lm, "_alphapo_patch", None) is not None:
        if "forward" in vars(lm):
            del lm.forward  # the instance attribute; the class's forward shows through again
        del lm._alphapo_patch
    return lm


class ExactNLLAccumulation:
    """Mixin for a ``transformers.Trainer`` subclass: exact accumulation of an NLL term.

    The subclass sets ``alphapo_exact_accumulation`` (bool) and defines
    ``_alphapo_has_nll()`` (whether its loss has an NLL term) and
    ``_alphapo_chosen_tokens(batch)`` (the chosen tokens the NLL term averages over, a
    0-dim tensor); each training micro-batch's loss call takes ``self._alphapo_nll_tokens()``.
    """

    alphapo_exact_accumulation: bool = True
    _alphapo_step_tokens: list | None = None  # [nll_num_tokens, micro-batches left], during a step

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._alphapo_step_tokens = None
        if self.alphapo_exact_accumulation and batches and self._alphapo_has_nll():
            total = sum(self._alphapo_chosen_tokens(b).to(device) for b in batches)
            ranks = self.accelerator.num_processes
            if ranks > 1:  # every rank fetches its micro-batches here, in step: a safe collective
                total = self.accelerator.gather(total.reshape(1)).sum()
            self._alphapo_step_tokens = [total.double() / (len(batches) * ranks), len(batches)]
        return batches, num_items

    def _alphapo_nll_tokens(self):
        """``nll_num_tokens`` for this training micro-batch, or None (its own count: evaluation,
        a call outside the training loop, or exact accumulation turned off)."""
        step = self._alphapo_step_tokens
        if step is None or not self.model.training:
            return None
        step[1] -= 1
        if step[1] == 0:
            self._alphapo_step_tokens = None
        return step[0]
