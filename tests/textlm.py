"""A tiny language model with a real (trained here) tokenizer, for the uptraining tests.

The corpus and tokenizer live in the library (``uptrain.corpus``) so that the benchmarks use them too.
"""

from __future__ import annotations

from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from uptrain.corpus import EOS, train_tokenizer, write_corpus  # noqa: F401  (re-exported for the tests)


def make_lm(directory: Path, tokenizer: PreTrainedTokenizerFast, kv_heads: int = 4, seed: int = 0) -> Path:
    """A tiny random Llama (4 query heads) with the tokenizer saved beside it."""
    import torch

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=128,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
