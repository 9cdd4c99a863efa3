"""The loss-inside-forward wrapper: the loss and gradients of the logits path, without the logits."""

from __future__ import annotations

import pytest
import torch

import alphapo.training.modeling as modeling
from alphapo import AlphaPOLoss
from alphapo.training import data as D
from alphapo.training.tokenizer import build_char_tokenizer


def test_wrapper_matches_the_logits_path_without_calling_lm_head():
    """Loss and gradients equal a plain logits computation; lm_head's forward never runs."""
    tok = build_char_tokenizer()
    torch.manual_seed(0)
    lm = modeling.tiny_llama(len(tok), tok, n_layer=1, n_embd=32, n_head=2).double()
    with torch.no_grad():
        lm.lm_head.weight.mul_(20)  # peaked softmaxes, so the check is not at uniform logits
    records, _ = D.builtin_task(6, 1, seed=1)
    pairs, _ = D.tokenize_pairs(records, tok, max_length=32)
    batch = D.collate(pairs, tok.pad_token_id)
    cfg = dict(alpha=0.25, beta=2.5, gamma=1.375)
    wrapper = modeling.AlphaPOModel(lm, AlphaPOLoss(**cfg, backend="torch"))

    def forbid(module, args):
        raise AssertionError("lm_head.forward ran: logits were built")

    handle = lm.lm_head.register_forward_pre_hook(forbid)
    loss, aux = wrapper(**batch)
    loss.backward()
    handle.remove()
    fused_grads = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad()

    # The logits path, written out: full forward, shift, log-softmax, mean per row, AlphaPO.
    logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    s = (logp * mask).sum(-1) / mask.sum(-1)
    B = s.shape[0] // 2
    f = -torch.expm1(-cfg["alpha"] * s) / cfg["alpha"]
    ref = -torch.nn.functional.logsigmoid(cfg["beta"] * (f[:B] - f[B:]) - cfg["gamma"]).mean()
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(aux.chosen_logps.double(), s[:B].detach(), rtol=1e-6, atol=1e-6)
    for name, p in lm.named_parameters():
        torch.testing.assert_close(fused_grads[name], p.grad, rtol=1e-7, atol=1e-10, msg=name)


def test_wrapper_refuses_logit_softcapping():
    tok = build_char_tokenizer()
    lm = modeling.tiny_llama(len(tok), tok, n_layer=1, n_embd=32, n_head=2)
    lm.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        modeling.AlphaPOModel(lm, AlphaPOLoss())
