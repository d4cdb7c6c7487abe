"""Reading every attention head's output (o_proj's input) at chosen token positions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..arch import head_geometry, o_proj, unwrap
from ..errors import SafetylockError
from .artifact import DEFAULT_POSITIONS, Item
from .positions import encode_item, parse_positions, select_positions, template_token_count


class _StopForward(Exception):
    """Raised by a capture hook once the deepest needed layer is read, to skip the rest of the model."""


@dataclass
class Activations:
    """Head outputs at chosen positions: `values` (samples, layers, heads, head_dim) float32, `owner` item index."""

    values: torch.Tensor
    owner: torch.Tensor
    layers: list[int]
    positions: str


def run_until_stopped(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """Run a forward pass that a hook may cut short by raising `StopForward` (nothing after it is computed)."""
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass


_run_quietly = run_until_stopped
StopForward = _StopForward


@torch.no_grad()
def head_activations(
    model: Any,
    tokenizer: Any,
    items: Sequence[Item],
    positions: str = DEFAULT_POSITIONS,
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> Activations:
    """Return every head's output at the `positions` of each (prompt, reply) item, as float32 on the CPU.

    Items are teacher-forced (chat template, then the reply's tokens) with right padding, so positions are
    absolute. Each selected position is one sample; `owner[i]` says which item sample i came from.
    """
    terms = parse_positions(positions)
    geometry = head_geometry(unwrap(model).config)
    wanted = sorted(set(range(geometry.num_layers) if layers is None else (int(x) for x in layers)))
    n_template = template_token_count(tokenizer)
    encoded = [encode_item(tokenizer, p, r) for p, r in items]
    picks = [select_positions(terms, n_head, n_template, len(ids) - n_head) for ids, n_head in encoded]
    empty = [i for i, p in enumerate(picks) if not p]
    if empty:
        raise SafetylockError(
            f"positions '{positions}' select no token of item {empty[0]} (prompt: {items[empty[0]][0][:60]!r}); "
            "check the spec against the replies"
        )
    device = model.get_input_embeddings().weight.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    store: dict[int, list[torch.Tensor]] = {layer: [] for layer in wanted}
    state: dict[str, torch.Tensor] = {}
    deepest = wanted[-1]

    def make_hook(layer: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            store[layer].append(x[state["rows"], state["cols"]].float().cpu())
            if layer == deepest:
                raise _StopForward

        return hook

    handles = [o_proj(model, layer).register_forward_pre_hook(make_hook(layer)) for layer in wanted]
    owner: list[int] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc="activations", unit="text", leave=False)
    try:
        for start in range(0, len(items), max(1, batch_size)):
            batch = list(range(start, min(len(items), start + batch_size)))
            width = max(len(encoded[i][0]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            rows, cols = [], []
            for r, i in enumerate(batch):
                seq = encoded[i][0]
                ids[r, : len(seq)] = torch.tensor(seq)
                mask[r, : len(seq)] = 1
                rows += [r] * len(picks[i])
                cols += picks[i]
                owner += [i] * len(picks[i])
            state["rows"] = torch.tensor(rows, device=device)
            state["cols"] = torch.tensor(cols, device=device)
            _run_quietly(model, ids.to(device), mask.to(device))
            if bar is not None:
                bar.update(len(batch))
    finally:
        for handle in handles:
            handle.remove()
        if bar is not None:
            bar.close()
    per_layer = [torch.cat(store[layer]) for layer in wanted]
    values = torch.stack(per_layer, dim=1).view(len(owner), len(wanted), geometry.num_heads, geometry.head_dim)
    return Activations(values, torch.tensor(owner, dtype=torch.long), wanted, positions)
