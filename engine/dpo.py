"""DPO as plain functions of sequence log-probabilities (the published formulas), and the batches they need.

Sigmoid DPO (Rafailov et al. 2023):  L = -log sigmoid(beta * [(pi_c - ref_c) - (pi_r - ref_r)])
IPO (Azar et al. 2023):              L = ([(pi_c - ref_c) - (pi_r - ref_r)] - 1 / (2 beta))^2,
                                     with log-probs averaged over completion tokens, as TRL does.
Metrics carry TRL's names so runs can be read side by side with TRL's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from engine.data import Pair
from engine.errors import TsdpoError

LOSSES = ("sigmoid", "ipo")


def dpo_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
             beta: float = 0.1, loss_type: str = "sigmoid",
             lengths: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-batch loss and metrics from per-sequence *summed* log-probs of policy and reference.

    IPO averages over completion tokens inside its loss (``lengths``: token counts of chosen and rejected);
    the metrics are always computed from the sums, as TRL does."""
    if loss_type not in LOSSES:
        raise TsdpoError(f"loss must be one of {LOSSES}, not {loss_type!r}.")
    chosen_logratio = pi_c - ref_c
    rejected_logratio = pi_r - ref_r
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_logratio - rejected_logratio))
    else:
        if lengths is None:
            raise TsdpoError("The IPO loss needs the completion lengths to average the log-probs over tokens.")
        logits = chosen_logratio / lengths[0] - rejected_logratio / lengths[1]
        losses = (logits - 1.0 / (2.0 * beta)) ** 2
    chosen_rewards = beta * chosen_logratio.detach()
    rejected_rewards = beta * rejected_logratio.detach()
    metrics = {
        "loss": losses.detach().mean(),
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": pi_c.detach().mean(),
        "logps/rejected": pi_r.detach().mean(),
    }
    return losses.mean(), metrics


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) under each row of ``logits`` ([..., vocab] -> [...]), in float32: the one gather every
    completion log-prob in the engine goes through."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def completion_sums(token_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence sums of per-token values given at the completion positions ``mask`` selects ([rows, T])."""
    rows = mask.nonzero()[:, 0]
    return torch.zeros(mask.shape[0], dtype=token_values.dtype, device=token_values.device).index_add(0, rows, token_values)


@dataclass
class PairBatch:
    """Chosen rows then rejected rows, right-padded; ``targets`` are next-token labels at completion positions."""

    input_ids: torch.Tensor  # [2B, T]
    attention_mask: torch.Tensor  # [2B, T]
    position_ids: torch.Tensor  # [2B, T]
    targets: torch.Tensor  # [2B, T]: the token predicted at each position (shifted)
    target_mask: torch.Tensor  # [2B, T]: 1 where the predicted token belongs to the completion

    @property
    def n_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    def to(self, device) -> "PairBatch":
        return PairBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids,
                                                  self.targets, self.target_mask)))


def encode_pairs(lm, pairs: list[Pair], max_prompt_tokens: int = 192, max_response_tokens: int = 192) -> PairBatch:
    """Tokenize prompt (chat format) + completion for both sides; the completion ends with end-of-turn."""
    eos = lm.tokenizer.eos_token_id
    seqs, starts = [], []
    for side in ("chosen", "rejected"):
        for p in pairs:
            prompt = lm.prompt_ids(p.prompt, max_prompt_tokens)
            resp = lm.text_ids(getattr(p, side), max_response_tokens)
            if eos is not None and len(resp) < max_response_tokens:
                resp = resp + [eos]
            seqs.append(prompt + resp)
            starts.append(len(prompt))
    T = max(map(len, seqs))
    n = len(seqs)
    ids = torch.full((n, T), lm.pad_id, dtype=torch.long)
    attn = torch.zeros(n, T, dtype=torch.long)
    targets = torch.zeros(n, T, dtype=torch.long)
    tmask = torch.zeros(n, T)
    for i, (s, start) in enumerate(zip(seqs, starts)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        targets[i, : len(s) - 1] = torch.tensor(s[1:])
        tmask[i, start - 1: len(s) - 1] = 1  # position t predicts token t+1: completion tokens start at `start`
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    return PairBatch(ids, attn, pos, targets, tmask)
