"""TRL's ``DPOTrainer`` (trl 1.16) with the fused loss: its LM head and loss replaced by alphapo's.

TRL's ``DPOTrainer`` already keeps no logits: its fused LM head (``trl.kernels``) returns
per-token log-probs, and its ``_compute_loss`` turns them into the loss of each
``loss_type``. Its backward recomputes the logits (8·N·H·V FLOPs) and it scores every
position on a CPU. The subclass here keeps everything else of TRL (data processing,
collator, ``DPOConfig``, the reference model or PEFT adapter, ``precompute_ref_log_probs``,
logging, evaluation, saving) and replaces ``_compute_loss``: the policy runs to its final
hidden states and :class:`alphapo.AlphaPOLoss` takes them with the ``lm_head`` weight
inside the model's forward, on the pair-chunked path (6·N·H·V; 4·N·H·V with a frozen head,
as under LoRA) over valid tokens only. The reference model's trunk runs under ``no_grad``
and its hidden states go to the same call (``ref_hidden``/``ref_weight``), so no reference
logits exist either. ``alphapo_alpha`` (default 0: TRL exactly) shapes every reward with
the AlphaPO α, ``f(x) = (1 - e^{-αx})/α`` of the log-ratio.

The ``DPOConfig`` knobs keep their names and meaning: ``beta``, ``loss_type`` (one name or
a list, MPO) with ``loss_weights``, ``label_smoothing``, ``f_divergence_type``,
``f_alpha_divergence_coef``, ``discopop_tau``, ``use_weighting`` (WPO), ``ld_alpha``
(LD-DPO) and ``precompute_ref_log_probs``; logged metrics carry TRL's names and formulas
(``rewards/*``, ``logps/*``, ``logits/*``, ``entropy``, ``mean_token_accuracy``,
``num_tokens``; ``eval_`` in evaluation). Where alphapo and TRL 1.16 differ:

* ``label_smoothing`` is read by TRL only for ``exo_pair``, ``robust``, ``aot`` and
  ``aot_unpaired``; its ``sigmoid`` ignores it, where alphapo's applies it (cDPO). So ε
  goes to the loss only when one of those four is listed; a list with one of them *and*
  ``sigmoid`` cannot be reproduced and is refused; ε with none of them is dropped with a
  warning, as TRL ignores it.
* IPO and ``sigmoid_norm`` divide by the sequence's scored tokens; TRL divides by its
  completion-mask count, one more when the prompt is empty (the first token is never
  scored). The values differ only for such rows; a warning says when one is seen.
* ``use_weighting`` with ``"sft"``: TRL raises (an in-place product on an expanded
  tensor); here the pair losses are weighted and the ``sft`` term is not. With ``"hinge"``
  TRL raises too (the product overwrites ReLU's output); here it is TRL's formula.
* Gradient accumulation: the ``"sft"`` NLL term averages over the chosen tokens of the
  whole optimizer step (all micro-batches and ranks), as one big batch would
  (``alphapo_exact_accumulation=True``, the default); TRL averages it per micro-batch.
  They agree with one micro-batch per step on one process.
* ``robust`` needs ``label_smoothing < 0.5`` (TRL only warns: it divides by 1 - 2ε).
* A sequence with no scored token (an empty prompt and a one-token completion) is refused
  with a message naming it; TRL counts its log-prob as 0.

Refused, with a message, because the fused path cannot reproduce them: encoder-decoder
and vision-language models (and any model input beyond ``input_ids``/``attention_mask``),
MoE router auxiliary losses, logit soft-capping and logit scaling, prompt-learning PEFT
adapters (they prepend virtual tokens), and an explicit reference model sharded by FSDP
or DeepSpeed ZeRO-3 (its head is read outside its forward; use PEFT or
``precompute_ref_log_probs=True`` there).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from ..loss import AlphaPOLoss
from ..training.modeling import decoder_and_head
from ._common import ExactNLLAccumulation, causal_lm, patch_forward

try:
    from accelerate.utils import is_peft_model
    from trl import DPOTrainer
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import use_adapter
except ImportError as e:  # pragma: no cover - exercised only without trl
    raise ImportError("AlphaPODPOTrainer needs TRL >= 1.16 (trl.DPOTrainer with a fused LM head): pip install trl") from e

TRL_SMOOTHED = ("exo_pair", "robust", "aot", "aot_unpaired")
"""The loss types TRL 1.16's DPOTrainer reads ``label_smoothing`` for."""

_BATCH_KEYS = ("input_ids", "attention_mask", "completion_mask", "ref_chosen_logps", "ref_rejected_logps")


def loss_from_dpo_args(args, alpha: float = 0.0, backend: str = "auto", scratch_bytes: int | None = None) -> AlphaPOLoss:
    """The :class:`AlphaPOLoss` that computes what ``DPOTrainer`` computes for ``args`` (a
    ``DPOConfig``) at ``alpha = 0``: γ = 0, summed log-probs, TRL's names for the rest."""
    types = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
    eps = args.label_smoothing
    if eps and not any(t in TRL_SMOOTHED for t in types):
        warnings.warn(
            f"label_smoothing={eps} has no effect on loss_type {types} in TRL's DPOTrainer (its sigmoid is not "
            f"cDPO; only {list(TRL_SMOOTHED)} read it), nor here",
            UserWarning, stacklevel=3,
        )
        eps = 0.0
    elif eps and "sigmoid" in types:
        raise ValueError(
            f"loss_type {types} with label_smoothing={eps}: TRL applies ε to {[t for t in types if t in TRL_SMOOTHED]} "
            "but not to sigmoid, and the fused loss has one ε for every type (its sigmoid is cDPO); list the "
            "smoothed types without sigmoid, or set label_smoothing=0"
        )
    return AlphaPOLoss(
        alpha=alpha,
        beta=args.beta,
        gamma=0.0,
        label_smoothing=eps,
        loss_type=types[0] if len(types) == 1 else types,
        average_log_prob=False,
        backend=backend,
        scratch_bytes=scratch_bytes,
        loss_weights=args.loss_weights,
        f_divergence_type=args.f_divergence_type,
        f_alpha_divergence_coef=args.f_alpha_divergence_coef,
        discopop_tau=args.discopop_tau,
        use_weighting=args.use_weighting,
        ld_alpha=args.ld_alpha,
    )


def _refuse_prompt_learning(model, peft_config=None):
    configs = [peft_config] if peft_config is not None else []
    if is_peft_model(model):
        configs.append(model.active_peft_config)
    if any(getattr(c, "is_prompt_learning", False) for c in configs):
        raise NotImplementedError(
            "prompt-learning PEFT adapters (prefix/prompt tuning) prepend virtual tokens the fused forward does "
            "not see; use LoRA-style adapters, or DPOTrainer"
        )


class AlphaPODPOTrainer(ExactNLLAccumulation, DPOTrainer):
    """``trl.DPOTrainer`` with its LM head and loss replaced by :class:`alphapo.AlphaPOLoss`.

    Takes every ``DPOTrainer`` argument, plus:

    * ``alphapo_alpha`` (0.0): the AlphaPO α of every reward; 0 computes TRL's losses;
    * ``alphapo_backend`` ("auto": Triton on CUDA, torch elsewhere) and
      ``alphapo_scratch_bytes`` (the fused loss's extra-memory budget);
    * ``alphapo_exact_accumulation`` (True): the ``"sft"`` term averages over the chosen
      tokens of the optimizer step; False averages per micro-batch, as TRL.

    ``self.alphapo_loss.last_path`` names the path the last policy call ran.
    """

    def __init__(self, model, ref_model=None, args=None, *more, alphapo_alpha: float = 0.0,
                 alphapo_backend: str = "auto", alphapo_scratch_bytes: int | None = None,
                 alphapo_exact_accumulation: bool = True, **kwargs):
        self._alphapo_options = (alphapo_alpha, alphapo_backend, alphapo_scratch_bytes)
        self.alphapo_exact_accumulation = bool(alphapo_exact_accumulation)
        self.alphapo_loss = self.alphapo_ref_loss = None
        self._alphapo_warned_empty_prompt = False
        # Refuse what cannot be reproduced before TRL tokenizes the dataset (or precomputes).
        if args is not None:
            self._alphapo_build_losses(args)
        for m in (model, ref_model):
            if isinstance(m, nn.Module):
                decoder_and_head(causal_lm(m))
        if isinstance(model, nn.Module):
            _refuse_prompt_learning(model, kwargs.get("peft_config"))
        super().__init__(model, ref_model, args, *more, **kwargs)
        self._alphapo_build_losses(self.args)
        self._alphapo_refuse_unsupported()
        patch_forward(self._alphapo_lm(self.model), self.alphapo_loss)
        if self.ref_model is not None:
            patch_forward(self._alphapo_lm(self.ref_model))

    # -- setup --------------------------------------------------------------------------

    def _alphapo_build_losses(self, args):
        if self.alphapo_loss is not None:
            return
        alpha, backend, scratch = self._alphapo_options
        self.alphapo_loss = loss_from_dpo_args(args, alpha, backend, scratch)
        # The reference's summed (LD-weighted) log-probs, for precompute_ref_log_probs: the
        # same loss machinery with no gradient wanted runs only its forward (2·N·H·V).
        self.alphapo_ref_loss = AlphaPOLoss(alpha=0.0, beta=1.0, gamma=0.0, average_log_prob=False,
                                            ld_alpha=args.ld_alpha, backend=backend, scratch_bytes=scratch)

    def _alphapo_refuse_unsupported(self):
        if self.aux_loss_enabled:
            raise NotImplementedError(
                "the model is a Mixture-of-Experts with a router auxiliary loss (router_aux_loss_coef != 0), which "
                "the fused forward does not compute; set router_aux_loss_coef=0 or use DPOTrainer"
            )
        if getattr(self, "_is_vlm", False) or getattr(self, "_is_vision_dataset", False):
            raise NotImplementedError("vision-language models are not supported by the fused forward; use DPOTrainer")
        _refuse_prompt_learning(self.model)
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        zero3 = self.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3
        if self.ref_model is not None and (self.is_fsdp_enabled or zero3):
            raise NotImplementedError(
                "an explicit ref_model under FSDP or DeepSpeed ZeRO-3: its lm_head would be read sharded; train a "
                "PEFT adapter (the reference is the policy with adapters disabled) or set "
                "precompute_ref_log_probs=True"
            )

    def _alphapo_lm(self, model):
        """The causal LM inside whatever wraps ``model`` (DDP, DeepSpeed, PEFT), patched."""
        lm = causal_lm(self.accelerator.unwrap_model(model))
        return patch_forward(lm)  # a no-op once patched; precompute runs before __init__ patches

    def _alphapo_has_nll(self) -> bool:
        return self.alphapo_loss.config.nll_total != 0

    def _alphapo_chosen_tokens(self, batch) -> torch.Tensor:
        mask = batch["completion_mask"]
        return mask[: mask.shape[0] // 2, 1:].sum()

    # -- the forward --------------------------------------------------------------------

    @staticmethod
    def _alphapo_text(inputs):
        extra = sorted(set(inputs) - set(_BATCH_KEYS))
        if extra:
            raise NotImplementedError(
                f"AlphaPODPOTrainer takes text batches only (input_ids, attention_mask); this batch also has {extra}"
            )
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        return dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]), labels

    def _alphapo_reference_adapter(self):
        """Under PEFT without a ref_model, the reference is the policy with its adapters
        disabled (or its frozen "ref" adapter, TRL's copy of a pretrained one)."""
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        return contextlib.nullcontext()

    def _alphapo_reference(self, inputs, text):
        """The reference, as the fused call's keyword arguments."""
        if self.precompute_ref_logps:
            return dict(alphapo_ref_logps=(inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]))
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if self.ref_model is None:  # PEFT; the head is the policy's own, read inside its forward
                self._alphapo_lm(self.model)
                with self._alphapo_reference_adapter():
                    return dict(alphapo_ref_hidden=self.model(**text, alphapo_hidden=True))
            head = self._alphapo_lm(self.ref_model).get_output_embeddings()
            hidden = self.ref_model(**text, alphapo_hidden=True)
        return dict(alphapo_ref_hidden=hidden, alphapo_ref_weight=head.weight, alphapo_ref_bias=head.bias)

    def compute_ref_log_probs(self, model, inputs):
        """The reference's summed (LD-weighted) log-probs of one batch, ``(chosen (B,), rejected (B,))``;
        TRL calls it for ``precompute_ref_log_probs``, inside ``DPOTrainer.__init__``."""
        self._alphapo_build_losses(self.args)
        self._alphapo_lm(model)
        text, labels = self._alphapo_text(inputs)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self._alphapo_reference_adapter(),
            self.accelerator.autocast(),
        ):
            _, aux = model(**text, alphapo_labels=labels, alphapo_loss=self.alphapo_ref_loss)
        return aux.chosen_logps, aux.rejected_logps

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        text, labels = self._alphapo_text(inputs)
        self._alphapo_check_prompts(inputs)
        self._alphapo_lm(model)
        reference = self._alphapo_reference(inputs, text)
        loss, aux = model(**text, alphapo_labels=labels, alphapo_nll_tokens=self._alphapo_nll_tokens(), **reference)
        self._alphapo_log(mode, aux, inputs)
        if return_outputs:
            # compute_metrics wants logits: TRL recomputes them with a plain forward, and so does this.
            warnings.warn("return_outputs=True builds the logits with an extra forward pass (as DPOTrainer does)",
                          UserWarning, stacklevel=2)
            with torch.no_grad():
                return loss, model(**text)
        return loss

    def _alphapo_check_prompts(self, inputs):
        if self._alphapo_warned_empty_prompt or not {"ipo", "sigmoid_norm"} & set(self.alphapo_loss.config.loss_types):
            return
        if bool(inputs["completion_mask"][:, 0].any()):
            self._alphapo_warned_empty_prompt = True
            warnings.warn(
                "a batch holds an empty prompt: its first completion token is never scored; ipo/sigmoid_norm divide "
                "by the scored tokens here, by one more in TRL's DPOTrainer (so values differ for such rows)",
                UserWarning, stacklevel=3,
            )

    # -- metrics: TRL's names and formulas, from the loss's aux -------------------------

    def _alphapo_log(self, mode, aux, inputs):
        acc = self.accelerator
        metrics = self._metrics[mode]
        scored = inputs["completion_mask"][:, 1:]
        n_chosen, n_rejected = (half.sum() for half in scored.chunk(2, dim=0))

        def token_mean(mean, count):
            """A mean over tokens across ranks, weighted by each rank's token count (TRL's)."""
            total = acc.gather_for_metrics(count).sum()
            if total == 0:
                return 0.0
            return (acc.gather_for_metrics(mean.detach() * count).sum() / total).item()

        metrics["entropy"].append(token_mean(aux.entropy, n_chosen + n_rejected))
        if mode == "train":
            self._total_train_tokens += acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        metrics["logits/chosen"].append(token_mean(aux.chosen_logits_mean, n_chosen))
        metrics["logits/rejected"].append(token_mean(aux.rejected_logits_mean, n_rejected))
        metrics["mean_token_accuracy"].append(token_mean(aux.mean_token_accuracy, n_chosen))
        for name, value in (("rewards/chosen", aux.chosen_rewards), ("rewards/rejected", aux.rejected_rewards),
                            ("rewards/accuracies", aux.reward_accuracy), ("rewards/margins", aux.reward_margin),
                            ("logps/chosen", aux.chosen_logps), ("logps/rejected", aux.rejected_logps)):
            metrics[name].append(acc.gather(value).mean().item())
        if self.alphapo_loss.config.alpha != 0:
            for name in ("tangent_fraction", "saturated_fraction"):
                value = getattr(aux, name).reshape(1)
                metrics[f"rewards/{name}"].append(acc.gather(value).mean().item())
