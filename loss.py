"""The training loss of a collated micro-batch: the sum of the cross-entropy over its trained tokens, the output layer
run in chunks on the positions that predict one."""

from __future__ import annotations

import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from architecture import LOSS_CHUNK_TOKENS


def hidden_states(model, batch, use_mask: bool = True, per_example: bool = False):
    """The decoder's last hidden states for a collated micro-batch (B, L, hidden): packed examples kept apart
    by the 4D mask in attention layers, and by their spans in the layers it does not reach (`per_example`: the
    model has linear-attention layers run per example, architecture.isolate_packed_examples)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    spans = {"packed_examples": batch["per_example"]} if per_example else {}
    return causal_lm.base_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                attention_mask=batch["attention_mask"] if use_mask else None, **spans).last_hidden_state


def _chunk_cross_entropy(lm_head, hidden, targets):
    return F.cross_entropy(lm_head(hidden).float(), targets, reduction="sum")


def loss_sum(model, batch, use_mask: bool = True, per_example: bool = False):
    """Sum of the cross-entropy over the trained tokens of one micro-batch. The output layer runs only on the
    positions that predict a trained token (found by `collate`), LOSS_CHUNK_TOKENS at a time, each chunk recomputed
    in backward: the full logits (Qwen's 152k vocabulary: the largest activation) never exist. `use_mask=False`
    (flash-attention 2) leaves the separation of packed examples to position_ids."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = hidden_states(model, batch, use_mask, per_example)
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["loss_index"])
    targets, lm_head = batch["loss_targets"], causal_lm.get_output_embeddings()
    total = hidden.new_zeros((), dtype=hidden.dtype).float()
    for start in range(0, targets.numel(), LOSS_CHUNK_TOKENS):
        end = start + LOSS_CHUNK_TOKENS
        total = total + checkpoint(_chunk_cross_entropy, lm_head, hidden[start:end], targets[start:end],
                                   use_reentrant=False)
    return total
