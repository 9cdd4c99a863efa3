"""The AlphaPO loss in plain PyTorch, with materialised logits: the specification.

Readable first, fast never. Every other backend is tested against it. It computes the
logits in the inputs' dtype (as a ``nn.Linear`` would), upcasts them to float32 (float64
inputs stay float64) for the log-softmax, and hands the per-sequence sums to the shared
epilogue (:mod:`alphapo.epilogue`). Peak memory is O(2B·T·V): use it on small problems.
"""

from __future__ import annotations

import torch

from ._tokens import accumulation_dtype, plan_tokens, with_ld_weights
from ._validation import check_inputs, scan_inputs
from .epilogue import AlphaPOConfig, AlphaPOOutput, SequenceSums, make_output, preference_loss


def logits_reference(weight, hidden, bias=None):
    """``z = hidden @ weight.T + bias`` in the inputs' dtype, then float32 or wider."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return logits if logits.dtype == torch.float64 else logits.float()


def _gather_logprobs(logits, target, ignore_index):
    """Per-token ``z[y] - logsumexp(z)`` from materialised logits; 0 where ignored."""
    valid = target != ignore_index
    safe_target = torch.where(valid, target, 0).long()
    logps = torch.log_softmax(logits, dim=-1).gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, logps, torch.zeros_like(logps))


def _zero_ignored(hidden, valid):
    """hidden with ignored positions zeroed: their logits are never part of the loss, and a
    NaN there must not reach ``grad_weight`` through ``0 * NaN`` (the fused backends never
    read those rows)."""
    return torch.where(valid.unsqueeze(-1), hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))


def token_logprobs_reference(weight, hidden, target, bias=None, ignore_index=-100):
    """Per-token ``z[y] - logsumexp(z)``, shape (2B, T); 0 where target == ignore_index."""
    hidden = _zero_ignored(hidden, target != ignore_index)
    return _gather_logprobs(logits_reference(weight, hidden, bias), target, ignore_index)


def sequence_logprobs_reference(weight, hidden, target, bias=None, average=True, ignore_index=-100, check_finite=True):
    """Per-sequence log-probs (2B,): summed, or divided by the valid-token count."""
    check_inputs(weight, hidden, target, bias, paired=False)
    n_tokens = scan_inputs(weight, hidden, target, bias, weight.shape[0], ignore_index, (), check_finite).n_tokens
    summed = token_logprobs_reference(weight, hidden, target, bias, ignore_index).sum(-1)
    return summed / n_tokens if average else summed


def alphapo_loss_reference(
    weight,
    hidden,
    target,
    bias=None,
    ref_chosen_logps=None,
    ref_rejected_logps=None,
    config: AlphaPOConfig | None = None,
    nll_tokens=None,
    check_finite: bool = True,
    **options,
) -> tuple[torch.Tensor, AlphaPOOutput]:
    """AlphaPO loss from materialised logits. ``options`` are :class:`AlphaPOConfig` fields;
    ``nll_tokens`` the NLL term's normaliser (see ``nll_num_tokens`` of :class:`AlphaPOLoss`)."""
    cfg = config if config is not None else AlphaPOConfig(**options)
    check_inputs(weight, hidden, target, bias, ref_chosen_logps, ref_rejected_logps)
    refs = (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps))
    scan = scan_inputs(weight, hidden, target, bias, weight.shape[0], cfg.ignore_index, refs, check_finite,
                       averaged=cfg.average_log_prob)
    valid = target != cfg.ignore_index
    logits = logits_reference(weight, _zero_ignored(hidden, valid), bias)
    token_logps = _gather_logprobs(logits, target, cfg.ignore_index)
    seq_sum = token_logps.sum(-1)
    raw = None
    if cfg.ld_alpha is not None:  # LD-DPO: the tail past the shorter answer of a pair counts ld_alpha
        plan = with_ld_weights(plan_tokens(target, cfg.ignore_index, scan.n_tokens, scan.n_host), cfg.ld_alpha)
        weights = torch.zeros_like(token_logps).reshape(-1)
        weights[plan.flat_idx] = plan.weights[:, 1].to(weights.dtype)
        raw, seq_sum = seq_sum, (token_logps * weights.view_as(token_logps)).sum(-1)
    with torch.no_grad():
        logp_all = torch.log_softmax(logits, dim=-1)
        p = logp_all.exp()
        entropy = torch.where(valid, -(p * logp_all).sum(-1), 0).sum(-1)
        safe = torch.where(valid, target, 0).long()
        hits = torch.where(valid, logits.argmax(-1) == safe, False).sum(-1)
        wpo = None
        if cfg.use_weighting:  # Σ_t log p(y_t) - log Σ_v p_v²
            lsq = torch.logsumexp(2 * logp_all, dim=-1)
            wpo = torch.where(valid, token_logps.detach() - lsq, 0).sum(-1)
        logit_sums = torch.where(valid, logits.sum(-1), 0).sum(-1).double()
    sums = SequenceSums(seq_sum, scan.n_tokens, raw, wpo, entropy, hits)
    epi = preference_loss(sums, None, cfg, ref_chosen_logps, ref_rejected_logps, nll_tokens=nll_tokens)
    out = make_output(epi, sums, logit_sums, weight.shape[0])
    return epi.loss.to(accumulation_dtype(hidden.dtype)), out  # float32, or float64 for float64 inputs
