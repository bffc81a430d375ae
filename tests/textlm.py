"""Real text and a tiny language model with a real (trained here) tokenizer, for the uptraining tests.

The text is Python's own documentation (``pydoc_data.topics``, shipped with every
CPython): English prose with code, split by topic into disjoint train and eval files.
"""

from __future__ import annotations

from pathlib import Path

import pydoc_data.topics
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

EOS = "<|endoftext|>"


def write_corpus(directory: Path) -> tuple[Path, Path]:
    """train.txt and eval.txt: documentation topics, every fifth topic held out for eval."""
    topics = [text.strip() for _, text in sorted(pydoc_data.topics.topics.items())]
    train = "\n\n".join(t for i, t in enumerate(topics) if i % 5)
    held = "\n\n".join(t for i, t in enumerate(topics) if i % 5 == 0)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "train.txt").write_text(train)
    (directory / "eval.txt").write_text(held)
    return directory / "train.txt", directory / "eval.txt"


def train_tokenizer(text_file: Path, vocab_size: int = 384) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(text_file)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def make_lm(directory: Path, tokenizer: PreTrainedTokenizerFast, kv_heads: int = 4, seed: int = 0) -> Path:
    """A tiny random Llama (4 query heads) with the tokenizer saved beside it."""
    import torch

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=kv_heads, vocab_size=len(tokenizer), max_position_embeddings=128,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
