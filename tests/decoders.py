"""Small random-init Hugging Face decoders for the language-model tests (scale, restore replay)."""

from __future__ import annotations

import pytest
import torch

DECODERS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}


def decoder(family: str, layers: int = 2, tie: bool = False) -> torch.nn.Module:
    """A random-init decoder of width 256 with grouped-query attention (8 query heads, 2 key/value heads)."""
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls = (getattr(transformers, n) for n in DECODERS[family])
    config = config_cls(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=384,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return model_cls(config).eval()
