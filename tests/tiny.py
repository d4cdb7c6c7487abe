"""Tiny random chat models and a tokenizer, built in-process, for exact tests of the maths."""

from __future__ import annotations

from typing import Any

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
FAMILIES = ("llama", "qwen2", "mistral", "gemma", "gemma2", "gemma3_text", "phi3")  # text-only, exportable
# Every model_type `tiny_model` builds: the test matrix that each arch.ARCH_SPECS entry must be in.
ARCH_MATRIX = (*FAMILIES, "gemma3")


def tiny_tokenizer() -> Any:
    """Return a byte-level BPE tokenizer (vocab 256+specials) with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>", unk_token="<unk>", bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(family: str, vocab_size: int = 300) -> Any:
    """Return a small random config of `family`, with grouped-query attention (4 heads, 2 kv heads)."""
    from transformers import AutoConfig

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    if family.startswith("gemma"):
        common["head_dim"] = 16
    if family == "phi3":
        common["pad_token_id"] = 0
    if family == "gemma3":  # multimodal: the text stack is a sub-config, beside a one-layer vision tower
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14)
        return AutoConfig.for_model(family, text_config=common, vision_config=vision, mm_tokens_per_image=4,
                                    tie_word_embeddings=common["tie_word_embeddings"])
    return AutoConfig.for_model(family, **common)


def tiny_model(family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """Return a seeded random causal LM of `family` in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=dtype)
    model.eval()
    # Random init puts most weights near zero; scale them up so heads differ and logits are not flat.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return model
