"""Per-token log-probs (and entropy) of a HF causal LM on its response tokens, lm_head fused.

For a batch ``input_ids`` [B, L] and a ``response_mask`` [B, L] marking the tokens to score::

    h        = decoder(input_ids, attention_mask, position_ids = clamp(cumsum(attention_mask) - 1, 0))   [B, L, H]
    logp[b,t] = log pi(input_ids[b, t] | input_ids[b, :t]) = linear_logprobs(h[b, t-1], lm_head, input_ids[b, t])
                where response_mask[b, t], else 0 (entropy likewise)

Only the response positions go through the head (``rlhf_fast.ops.linear_logprobs``: the [tokens, vocab]
logits never exist). The head is ``model.get_output_embeddings()`` (tied embeddings included) with its bias if
any; the config's logit transforms are applied inside the fused op: ``logit_scale`` (Cohere, multiplies) and
``logits_scaling`` (Granite, divides) by scaling h and the bias, ``final_logit_softcapping`` (Gemma-2:
``c * tanh(z / c)``) as the op's ``softcap``. Position ids follow the attention mask, as HF ``generate`` does,
so left-padded batches score like unpadded ones. ``return_hidden=True`` also returns ``h`` itself, so a value
head on the same backbone (``critic="head"``) needs no second backbone forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rlhf_fast._validation import check_mask, check_same_device, check_tensor
from rlhf_fast.models.packing import mask_positions, packed_forward, supports_packing
from rlhf_fast.models.value_model import base_model
from rlhf_fast.ops.linear_logprob import linear_logprobs

__all__ = ["policy_logprobs", "decoder_hidden", "lm_head_inputs"]


def _decoder(model: nn.Module) -> nn.Module:
    """The backbone returning ``last_hidden_state`` (final norm included): ``get_decoder()``, else the base model."""
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    return decoder if isinstance(decoder, nn.Module) and decoder is not model else base_model(model)


def decoder_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, pack: bool = False
                   ) -> torch.Tensor:
    """The decoder's last hidden states ``[B, L, H]`` (final norm included), position ids from the attention mask;
    with ``pack``, from one padding-free sequence of the real tokens where the model supports it
    (:mod:`rlhf_fast.models.packing`; 0 at padding). No KV cache is built (a training/scoring forward)."""
    decoder = _decoder(model)
    if pack and supports_packing(model):
        return packed_forward(decoder, input_ids, attention_mask)
    return decoder(input_ids=input_ids, attention_mask=attention_mask.long(),
                   position_ids=mask_positions(attention_mask), use_cache=False).last_hidden_state


def lm_head_inputs(model: nn.Module, h: torch.Tensor):
    """``(h', weight, bias', softcap)`` with the config's logit transforms folded in, so that the model's logits
    are ``softcap(h' @ weight^T + bias')`` (``c tanh(z / c)``, or none): the inputs of the fused lm_head ops."""
    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    config = model.config
    scale = float(getattr(config, "logit_scale", None) or 1.0) / float(getattr(config, "logits_scaling", None) or 1.0)
    if scale != 1.0:
        h = h * scale
        bias = None if bias is None else bias * scale
    return h.to(weight.dtype), weight, bias, getattr(config, "final_logit_softcapping", None)


def policy_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    response_mask: torch.Tensor, temperature: float = 1.0, return_entropy: bool = False,
                    return_hidden: bool = False, backend: str = "auto", pack: bool = False
                    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``logp`` [B, L] fp32 aligned with ``input_ids`` (0 outside ``response_mask``), then the entropy and the
    last hidden states ``[B, L, H]`` (final norm included, the model's dtype) if asked, in that order.

    Args:
        model: a HF causal LM (``get_output_embeddings()`` and a decoder returning ``last_hidden_state``).
        input_ids: [B, L] integer token ids.
        attention_mask: [B, L] bool or {0,1}; left and right padding both work.
        response_mask: [B, L] bool or {0,1}: the tokens to score; position 0 cannot be scored (no context).
        temperature: positive; logits are divided by it (after the model's own logit transforms).
        return_entropy: also return the entropy of the next-token distribution at each scored token.
        return_hidden: also return the decoder's last hidden states (differentiable).
        backend: backend of :func:`rlhf_fast.ops.linear_logprobs`.
        pack: run the decoder padding-free where the model supports it (:func:`decoder_hidden`); same values.
    Gradients flow into the model's parameters.
    """
    check_tensor("input_ids", input_ids, ndim=2)
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    attention_mask = check_mask("attention_mask", attention_mask, input_ids.shape)
    response_mask = check_mask("response_mask", response_mask, input_ids.shape)
    check_same_device({"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask})
    if bool(response_mask[:, 0].any()):
        raise ValueError("response_mask[:, 0] must be False: the first position has no context to score it")
    if bool((response_mask & ~attention_mask).any()):
        raise ValueError("response_mask must lie inside attention_mask")

    hidden = decoder_hidden(model, input_ids, attention_mask, pack)                   # [B, L, H]
    scored = response_mask[:, 1:]                                                    # token t scored from h[t-1]
    h, weight, bias, softcap = lm_head_inputs(model, hidden[:, :-1][scored])        # [n, H]
    labels = input_ids[:, 1:][scored]
    out = linear_logprobs(h, weight, labels, bias=bias, temperature=temperature, return_entropy=return_entropy,
                          softcap=softcap, backend=backend)

    def _place(per_token: torch.Tensor) -> torch.Tensor:
        full = per_token.new_zeros(scored.shape).masked_scatter(scored, per_token)
        return F.pad(full, (1, 0))
    outs = (_place(out[0]), _place(out[1])) if return_entropy else (_place(out),)
    outs += (hidden,) if return_hidden else ()
    return outs if len(outs) > 1 else outs[0]
