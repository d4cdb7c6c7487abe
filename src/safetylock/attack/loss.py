"""The training loss: summed cross-entropy over the reply tokens only."""

from __future__ import annotations

from typing import Any

import torch

from .encode import IGNORE


def _causal_lm(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def response_loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Return (summed cross-entropy over reply tokens, number of reply tokens) for a batch.

    Only positions whose next token is a reply token go through the LM head, in fp32: the head is a
    large share of a small model's compute and the prompt positions would be thrown away anyway.
    """
    lm = _causal_lm(model)
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    count = int(keep.sum())
    decoder = getattr(lm, getattr(lm, "base_model_prefix", ""), None)
    head = lm.get_output_embeddings()
    if decoder is None or head is None or decoder is lm:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]
    else:
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = head(hidden[:, :-1][keep])
        cap = getattr(lm.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
    loss = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return loss, count
