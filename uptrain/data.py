"""Text in, fixed-length token blocks out, through `datasets` (tokenized once, cached on disk).

Documents are tokenized, each followed by EOS, joined into one stream, and cut
into ``seq_len`` blocks (only the stream's final remainder is dropped). Held-out
eval documents are chosen by a hash of their index, so the split is the same in
streaming and in-memory mode and for every run.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from kvshrink_base.text import load_documents
from uptrain.errors import RecipeError

if TYPE_CHECKING:
    import datasets
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

    from kvshrink_base.text import HFDataset
    from uptrain.recipe import Recipe


def _is_eval(index: int, fraction: float, seed: int) -> bool:
    return ((index * 2654435761 + seed * 97) % 2**32) / 2**32 < fraction


def split_documents(docs: HFDataset, fraction: float, seed: int) -> tuple[HFDataset, HFDataset]:
    """(train, eval) documents: each document goes to eval with probability `fraction`, by its index."""
    train = docs.filter(lambda _, i: not _is_eval(i, fraction, seed), with_indices=True)
    held = docs.filter(lambda _, i: _is_eval(i, fraction, seed), with_indices=True)
    return train, held


def pack(
    docs: HFDataset, tokenizer: PreTrainedTokenizerBase, text_field: str, seq_len: int, batch_size: int = 1000
) -> HFDataset:
    """Documents -> ``input_ids`` blocks of exactly seq_len tokens, EOS after each document.

    The token stream is packed whole: what does not fill a block at the end of one map batch of
    ``batch_size`` documents is carried into the next, so only the final remainder (< seq_len tokens) is
    dropped. The carry restarts whenever a pass over the documents does (index 0), so a stream packs the
    same way every epoch.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise RecipeError("the tokenizer has no EOS token to join documents with")

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch[text_field], add_special_tokens=False)["input_ids"]
        return {"ids": [x + [eos] for x in ids]}

    carry: list[int] = []

    def blocks(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        if indices and indices[0] == 0:
            carry.clear()
        flat = carry + list(itertools.chain.from_iterable(batch["ids"]))
        usable = len(flat) // seq_len * seq_len
        carry[:] = flat[usable:]
        return {"input_ids": [flat[i : i + seq_len] for i in range(0, usable, seq_len)]}

    tokenized = docs.map(tokenize, batched=True, remove_columns=[text_field])
    return tokenized.map(blocks, batched=True, batch_size=batch_size, with_indices=True, remove_columns=["ids"])


def build_datasets(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> tuple[HFDataset, HFDataset]:
    """(train blocks, eval blocks) for a recipe; eval is capped at eval.max_tokens."""
    d = recipe.data
    docs = load_documents(d.train, d.text_field, d.streaming, d.hub_config, d.hub_split)
    if d.eval:
        train_docs = docs
        eval_docs = load_documents(d.eval, d.text_field, d.streaming, d.hub_config, d.hub_split)
    else:
        train_docs, eval_docs = split_documents(docs, d.eval_fraction, recipe.train.seed)
    train = pack(train_docs, tokenizer, d.text_field, d.seq_len)
    evals = pack(eval_docs, tokenizer, d.text_field, d.seq_len)
    eval_blocks = max(1, recipe.eval.max_tokens // d.seq_len)
    if d.streaming:
        evals = evals.take(eval_blocks)
    else:
        evals = evals.select(range(min(eval_blocks, len(evals))))
        if len(train) == 0:
            raise RecipeError(
                f"data.train gives no block of {d.seq_len} tokens: the data is empty or shorter than data.seq_len"
            )
        if len(evals) == 0:
            raise RecipeError(f"the eval data gives no block of {d.seq_len} tokens; add data or lower data.seq_len")
    return train.with_format("torch"), evals.with_format("torch")


def collate(rows: list[dict[str, torch.Tensor | int]]) -> dict[str, torch.Tensor]:
    """Blocks stacked into ``input_ids`` (B, T); their dataset indices as ``index`` (B,) where they have one."""
    batch = {"input_ids": torch.stack([torch.as_tensor(r["input_ids"]) for r in rows])}
    if all("index" in r for r in rows):
        batch["index"] = torch.tensor([int(r["index"]) for r in rows])
    return batch


class Indexed(torch.utils.data.Dataset[dict[str, torch.Tensor | int]]):
    """A map-style dataset's blocks with their index (``index``): the offline teacher's rows are found by it."""

    def __init__(self, dataset: datasets.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        return {"input_ids": self.dataset[i]["input_ids"], "index": i}


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of epoch ``epoch``'s block order (and its DataLoader's own draws)."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def training_rows(count: int, batch_size: int, seed: int, blocks: int) -> list[int]:
    """The dataset indices of the first ``blocks`` blocks training takes (epoch after epoch, each epoch's
    permutation cut to whole micro-batches), each once, in the order training first takes them."""
    rows: dict[int, None] = {}
    taken, epoch = 0, 0
    while taken < blocks:
        order = torch.randperm(count, generator=epoch_generator(seed, epoch)).tolist()
        usable = order[: count // batch_size * batch_size]
        for index in usable[: blocks - taken]:
            rows.setdefault(index)
        taken += len(usable)
        epoch += 1
        if not usable or len(rows) == count:
            break
    return list(rows)


def epoch_loader(dataset: HFDataset, batch_size: int, seed: int, epoch: int) -> torch.utils.data.DataLoader:
    """Epoch `epoch`'s loader: a permutation fixed by (seed, epoch), so a resumed run sees the same order.

    The loader has its own generator: starting to iterate a DataLoader draws a seed, from the global RNG when it
    has none, and a resumed run starts iterating at another step than the run it continues, so dropout (LoRA's)
    would draw other masks after it."""
    generator = epoch_generator(seed, epoch)
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        shuffled = dataset.shuffle(seed=seed + epoch, buffer_size=10_000)
        return torch.utils.data.DataLoader(shuffled, batch_size=batch_size, collate_fn=collate, generator=generator)
    order = torch.randperm(len(dataset), generator=generator).tolist()
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(Indexed(dataset), order),
        batch_size=batch_size,
        collate_fn=collate,
        drop_last=True,
        generator=generator,
    )


def train_batches(
    dataset: HFDataset, batch_size: int, seed: int, accelerator: Accelerator, start: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches forever (epoch after epoch), starting after `start` batches already consumed."""
    epoch = 0
    while True:
        loader = accelerator.prepare_data_loader(epoch_loader(dataset, batch_size, seed, epoch))
        try:
            per_epoch = len(loader)
        except TypeError:
            per_epoch = None
        if per_epoch == 0:
            raise RecipeError("an epoch has no full micro-batch: lower train.micro_batch_size or add data")
        if per_epoch is not None and start >= per_epoch:
            start -= per_epoch
        else:
            if start:
                loader = accelerator.skip_first_batches(loader, start)
                start = 0
            yielded = 0
            for batch in loader:
                yielded += 1
                yield batch
            if not yielded and per_epoch is None:  # a stream with no full micro-batch would loop forever
                raise RecipeError(
                    "the training stream has no full micro-batch: add data or lower "
                    "train.micro_batch_size / data.seq_len"
                )
        epoch += 1
