"""RolloutBatch: what a rollout engine hands to the learner.

Layout, for B rows (prompts x n samples), P = longest prompt, R = longest response::

    input_ids      = [ pad .. pad p_0 .. p_k | r_0 .. r_m pad .. pad ]     [B, P+R]
                       prompt_ids (left-padded) | response_ids (right-padded)
    attention_mask = [  F  ..  F   T  ..  T  |  T  ..  T   F  ..  F  ]     [B, P+R] bool
    response_mask  =                           [ 1  ..  1   0  ..  0  ]     [B, R]

``pack`` builds this layout from token-id lists; it is the one packer (collators, engines, this batch).
Every real response token (EOS included, when the engine stopped on it) is in ``response_mask``;
``rollout_logprobs[b, t] = log π_τ(response_ids[b, t] | prefix)`` as the engine computed it
(0 where masked), π_τ being the temperature-scaled, top-k/top-p-filtered sampling distribution.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(prompt_ids [B, P], response_ids [B, R], attention_mask [B, P+R], response_mask [B, R])`` of the layout
    above: prompts left-padded to the longest (P), responses right-padded to the longest (R >= 1); ids int64,
    masks bool."""
    if len(prompts) != len(responses):
        raise ValueError(f"prompts and responses must have one entry each, got {len(prompts)} and {len(responses)}")
    B = len(prompts)
    P = max(len(p) for p in prompts)
    R = max(max((len(r) for r in responses), default=0), 1)
    prompt_ids = torch.full((B, P), pad_id, dtype=torch.long)
    response_ids = torch.full((B, R), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, P + R, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        prompt_ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        attention_mask[i, P - len(p):P + len(r)] = True
        if r:
            response_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return prompt_ids, response_ids, attention_mask, attention_mask[:, P:].clone()


@dataclass
class RolloutBatch:
    prompt_ids: torch.Tensor  # int64 [B, P], left-padded with the engine's pad id
    response_ids: torch.Tensor  # int64 [B, R], right-padded with the engine's pad id
    attention_mask: torch.Tensor  # bool [B, P+R], True on real prompt and response tokens
    response_mask: torch.Tensor  # bool [B, R], True on generated tokens (EOS/stop token included)
    rollout_logprobs: torch.Tensor  # fp32 [B, R], engine log-prob of each sampled token, 0 where masked
    finish_reasons: list[str]  # per row: "stop" (EOS / stop token) or "length" (hit max_new_tokens)
    truncated: torch.Tensor  # bool [B], True where the response hit max_new_tokens without stopping
    weight_version: int  # the engine's weight version that produced the batch
    prompt_index: torch.Tensor  # int64 [B], input prompt of each row; a prompt's n samples are consecutive

    @property
    def input_ids(self) -> torch.Tensor:
        """[B, P+R] prompt followed by response, the learner's forward input."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def response_mask_full(self) -> torch.Tensor:
        """bool [B, P+R]: ``response_mask`` in the ``input_ids`` layout (False on the prompt part)."""
        return torch.cat([torch.zeros_like(self.prompt_ids, dtype=torch.bool), self.response_mask], dim=1)

    @property
    def prompt_length(self) -> int:
        return self.prompt_ids.shape[1]

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def to(self, device) -> "RolloutBatch":
        """A copy with every tensor moved to ``device``."""
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            values[f.name] = v.to(device) if isinstance(v, torch.Tensor) else v
        return RolloutBatch(**values)
