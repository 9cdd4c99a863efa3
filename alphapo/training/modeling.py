"""Models for the trainer, and the wrapper that computes the loss inside the forward pass.

:class:`AlphaPOModel` holds a Hugging Face causal LM and an :class:`alphapo.AlphaPOLoss`.
Its forward runs the LM's decoder to the final hidden states and hands them, with the
LM's own ``lm_head`` weight, to the fused loss: the ``lm_head`` module is never called,
so the (2B, T, V) logits never exist. The loss lives *inside* ``forward`` so that a
sharded-parameter wrapper around the whole module (FSDP, as with Liger's and Cut
Cross-Entropy's integrations) has gathered the ``lm_head`` weight when the loss reads
it; ``wrapper(input_ids, attention_mask, labels) -> (loss, aux)`` is the whole interface
a training step needs, so DDP/FSDP can wrap it unchanged.

Equivalent PyTorch, with logits::

    logits = lm(input_ids, attention_mask).logits                # (2B, T, V)
    logp = log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:, None])
    ... AlphaPO on the length-averaged logp of each row

The built-in model is a tiny Llama with random initialisation (no download).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from ..loss import AlphaPOLoss

# Final-layer transforms of the logits that a loss computed from ``lm_head.weight`` alone
# would silently skip (Gemma-2 soft-capping; Cohere, Granite, MiniCPM3, Falcon-H1 and Muse
# scaling — the names TRL's fused head reads too): refuse such models.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale",
                     "output_multiplier", "lm_head_multiplier")


def attention_implementation(device: torch.device) -> str:
    """``"flash_attention_2"`` on CUDA when flash-attn is installed, else PyTorch's SDPA."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def tiny_llama(vocab_size: int, tokenizer=None, n_layer: int = 2, n_embd: int = 64, n_head: int = 4,
               max_positions: int = 256, attn_implementation: str = "sdpa"):
    """A randomly initialised Llama-architecture causal LM built from a config (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if n_embd % n_head:
        raise ValueError(f"n_embd={n_embd} must be a multiple of n_head={n_head}")
    special = {}
    if tokenizer is not None:
        special = {k: getattr(tokenizer, k) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=n_embd,
        intermediate_size=4 * n_embd,
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        num_key_value_heads=n_head,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        use_cache=False,
        **special,
    )
    config._attn_implementation = attn_implementation
    return LlamaForCausalLM(config)


def load_causal_lm(path: str, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
                   trust_remote_code: bool = False):
    """A causal LM from a local directory (safetensors preferred by ``from_pretrained``)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
        )
    except (ImportError, ValueError) as e:
        if attn_implementation == "sdpa":
            raise
        # A model class without flash-attention support: fall back to SDPA, say so.
        print(f"note: {attn_implementation} unavailable for {path} ({e}); using sdpa")
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation="sdpa", trust_remote_code=trust_remote_code
        )


def decoder_and_head(lm: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The LM's decoder (to the final norm) and its ``lm_head``, with the checks the fused path needs."""
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    decoder = getattr(lm, "base_model", None)
    if not isinstance(head, nn.Linear) or decoder is None or decoder is lm:
        raise TypeError(
            f"{type(lm).__name__} does not look like a causal LM with a decoder (``base_model``) and a "
            "linear ``lm_head`` (``get_output_embeddings()``): the fused loss needs both"
        )
    config = getattr(lm, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _LOGIT_TRANSFORMS:
        value = getattr(text_config, name, None)
        if value not in (None, 1, 1.0, 0, 0.0, False):
            raise NotImplementedError(
                f"{type(lm).__name__} applies {name}={value} to its logits, which the fused loss "
                "(computed from lm_head.weight) does not reproduce"
            )
    if getattr(config, "is_encoder_decoder", False):
        raise NotImplementedError("encoder-decoder models are not supported: the loss needs a decoder-only LM")
    return decoder, head


class AlphaPOModel(nn.Module):
    """A causal LM whose forward returns the AlphaPO loss, never building logits.

    ``forward(input_ids, attention_mask, labels) -> (loss, aux)``: all three are (2B, T),
    chosen rows first; ``labels`` hold -100 on prompt and padding, unshifted (position
    ``t`` of the hidden states predicts ``labels[t + 1]``, as in Hugging Face models).
    ``nll_num_tokens`` (optional) is the loss's: the count its NLL term divides by, which
    makes gradient accumulation exact (see :func:`alphapo.training.loop.nll_tokens_per_call`).
    Under autocast the loss runs in the autocast dtype (hidden states and a cast of the
    ``lm_head`` weight, as the ``nn.Linear`` would), with autocast itself switched off
    inside the fused kernels.
    """

    def __init__(self, lm: nn.Module, loss_fn: AlphaPOLoss):
        super().__init__()
        self.lm = lm
        self.loss_fn = loss_fn
        decoder_and_head(lm)  # fail at construction, not at the first step

    def forward(self, input_ids, attention_mask, labels, nll_num_tokens=None):
        return fused_forward(self.lm, self.loss_fn, input_ids, attention_mask, labels, nll_num_tokens=nll_num_tokens)


def last_hidden_state(lm: nn.Module, input_ids, attention_mask) -> torch.Tensor:
    """The decoder's final hidden states (2B, T, H), after its final norm; no ``lm_head`` call."""
    decoder, _ = decoder_and_head(lm)
    return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def fused_forward(lm: nn.Module, loss_fn: AlphaPOLoss, input_ids, attention_mask, labels, *, nll_num_tokens=None,
                  ref_logps=None, ref_hidden=None, ref_weight=None, ref_bias=None):
    """The body of :meth:`AlphaPOModel.forward`, for integrations that patch a model's forward.

    A reference model enters either as its per-sequence log-probs ``ref_logps = (chosen
    (B,), rejected (B,))`` or as its final hidden states ``ref_hidden`` (2B, T, H, from
    :func:`last_hidden_state` under ``no_grad``) with its head ``ref_weight``/``ref_bias``;
    ``ref_weight=None`` with ``ref_hidden`` given means this model's own head (a PEFT
    policy with its adapters disabled), read here, where a sharding wrapper has gathered it.
    """
    decoder, head = decoder_and_head(lm)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    # Shift by padding the targets, not by slicing hidden: hidden[:, t] predicts
    # labels[:, t + 1], the last position predicts nothing. No copy of hidden.
    ignore = loss_fn.config.ignore_index
    target = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore)], dim=1)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = head.weight.dtype
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    refs = {}
    if ref_logps is not None:
        refs = dict(ref_chosen_logps=ref_logps[0], ref_rejected_logps=ref_logps[1])
    elif ref_hidden is not None:
        if ref_weight is None:
            ref_weight, ref_bias = head.weight, head.bias
        refs = dict(ref_hidden=cast(ref_hidden.detach()), ref_weight=cast(ref_weight.detach()),
                    ref_bias=cast(None if ref_bias is None else ref_bias.detach()))
    with torch.autocast(device_type, enabled=False):
        return loss_fn(head.weight.to(dtype), hidden.to(dtype), target, bias=cast(head.bias),
                       nll_num_tokens=nll_num_tokens, **refs)
