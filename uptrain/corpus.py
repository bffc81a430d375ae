"""A small real-text corpus and a tokenizer trained on it, offline: for benchmarks and tests.

The text is Python's own documentation (``pydoc_data.topics``, shipped with every
CPython): English prose with code, split by topic into disjoint train and eval files.
"""

from __future__ import annotations

import pydoc_data.topics
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

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
    """A byte-level BPE tokenizer of ``vocab_size`` entries trained on ``text_file``; EOS doubles as BOS and pad."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train([str(text_file)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS)
