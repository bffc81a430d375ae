"""How the KV heads of one group become one head: the merge methods and the grouping strategies, registered once.

Groups are consecutive, as transformers' ``repeat_kv`` reads them: with G source KV heads and N target heads,
target head j pools source heads j*G/N .. (j+1)*G/N - 1, and query head h (which read source head h // (H/G))
now reads target head h // (H/N). A grouping strategy may first permute the KV heads (with the query heads
that read them and their O columns), which keeps the function.

Adding a method is one ``Merge`` subclass decorated with ``@register``: the CLI's and the recipe's choices,
the help text and the report read ``METHODS``. Every method works on a whole layer in head form
(``convert.head_form.LayerHeads``); the pooling methods change K and V alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, ClassVar, TypeVar

from convert.head_form import LayerHeads, Rotary

if TYPE_CHECKING:
    import torch

# The fits (convert.fits) import torch, which takes seconds: the registry is read while the converter plans and
# copies unchanged tensors, before torch is needed, so a method imports its fit when it first runs one.

GroupCost = Callable[[list[int]], float]  # KV heads -> what merging them into one loses (grouping minimizes it)


class Merge:
    """A merge method. Subclasses set the class attributes and implement ``pool`` (and ``fit`` if not pooling)."""

    name: ClassVar[str]
    help: ClassVar[str]  # what each merged head is: the CLI's --method help and docs/convert.md's methods table
    calibrated: ClassVar[bool] = False  # runs the source model on calibration text (convert.calibrate)
    changes: ClassVar[frozenset[str]] = frozenset({"k", "v"})  # the projections it rewrites
    k_normed_note: ClassVar[str | None] = None  # what it does to K where K is normalized before RoPE (reported)
    uses_queries: ClassVar[bool] = False  # its fit reads the whitened queries (Q L)
    seeded: ClassVar[bool] = False  # draws random numbers (--seed): one generator per layer

    def pool(
        self, heads: torch.Tensor, kv_heads: int, generator: torch.Generator | None, is_norm: bool = False
    ) -> torch.Tensor:
        """Pool (G, ...) per-head blocks (rows with a bias column, or K-norm weights) into float32 (N, ...)."""
        raise NotImplementedError

    def fit(
        self,
        layer: LayerHeads,
        whitened: LayerHeads,
        kv_heads: int,
        rot: Rotary,
        k_normed: bool,
        generator: torch.Generator | None,
    ) -> LayerHeads:
        """A layer's heads -> merged heads (K, V: (N, d, in)); ``whitened`` holds K and V times L (or themselves)."""
        k = self.pool(layer.k, kv_heads, generator).to(layer.k.dtype)
        v = self.pool(layer.v, kv_heads, generator).to(layer.v.dtype)
        return layer.replace(k=k, v=v)

    def lost_energy(self, heads: torch.Tensor, which: str, rot: Rotary, k_normed: bool) -> torch.Tensor:
        """The whitened energy merging these (s, d, in) ``which`` ("k" or "v") heads loses: a pool's mean's."""
        from convert.fits import mean_lost_energy

        return mean_lost_energy(heads)

    def group_cost(self, whitened: LayerHeads, rot: Rotary, k_normed: bool) -> GroupCost:
        """What merging a group of this layer's KV heads loses with this method: the share of K's and V's
        whitened energy (``convert.fits.relative_lost_energy`` of ``lost_energy``), for the grouping strategies."""
        from convert.fits import relative_lost_energy

        return partial(
            relative_lost_energy, whitened, lost_energy=partial(self.lost_energy, rot=rot, k_normed=k_normed)
        )


METHODS: dict[str, Merge] = {}
GROUPINGS: dict[str, Grouping] = {}
Entry = TypeVar("Entry", bound="Merge | Grouping")


def register(cls: type[Entry]) -> type[Entry]:
    """Add a Merge or Grouping subclass to its registry, under its ``name``."""
    entry = cls()
    if isinstance(entry, Merge):
        _check_new(METHODS, entry.name)
        METHODS[entry.name] = entry
    else:
        _check_new(GROUPINGS, entry.name)
        GROUPINGS[entry.name] = entry
    return cls


def _check_new(registry: Mapping[str, object], name: str) -> None:
    if name in registry:
        raise ValueError(f"{name!r} is registered twice")


def _grouped(heads: torch.Tensor, kv_heads: int) -> torch.Tensor:
    return heads.float().reshape(kv_heads, heads.shape[0] // kv_heads, *heads.shape[1:])  # (N, G/N, ...)


@register
class Mean(Merge):
    name = "mean"
    help = "the mean of its group's K (and V) heads, biases included"

    def pool(
        self, heads: torch.Tensor, kv_heads: int, generator: torch.Generator | None, is_norm: bool = False
    ) -> torch.Tensor:
        return _grouped(heads, kv_heads).mean(dim=1)


@register
class First(Merge):
    name = "first"
    help = "the group's first head"

    def pool(
        self, heads: torch.Tensor, kv_heads: int, generator: torch.Generator | None, is_norm: bool = False
    ) -> torch.Tensor:
        return _grouped(heads, kv_heads)[:, 0].clone()


@register
class Random(Merge):
    name = "random"
    help = "a fresh normal init with the standard deviation of the group's heads"
    seeded = True

    def pool(
        self, heads: torch.Tensor, kv_heads: int, generator: torch.Generator | None, is_norm: bool = False
    ) -> torch.Tensor:
        grouped = _grouped(heads, kv_heads)
        if is_norm:  # norm weights have no such scale: mean-pooled
            return grouped.mean(dim=1)
        import torch

        std = grouped.flatten(1).std(dim=1, correction=0)  # one scale per group
        noise = torch.randn(grouped[:, 0].shape, generator=generator, dtype=torch.float32)
        return noise * std.reshape(kv_heads, *([1] * (heads.dim() - 1)))


@register
class Svd(Merge):
    name = "svd"
    help = "the best fit of the group on real activations; what it cannot share folds into Q and O"
    calibrated = True
    changes = frozenset({"q", "k", "v", "o"})
    k_normed_note = "mean (this family normalizes K before RoPE, so no mix can be folded through it)"
    queries: ClassVar[bool] = False  # weigh key errors by the queries that read them
    outputs: ClassVar[bool] = False  # weigh value errors by the O columns that carry them

    def pool(
        self, heads: torch.Tensor, kv_heads: int, generator: torch.Generator | None, is_norm: bool = False
    ) -> torch.Tensor:  # K norms (nothing folds through a norm)
        return _grouped(heads, kv_heads).mean(dim=1)

    def fit(
        self,
        layer: LayerHeads,
        whitened: LayerHeads,
        kv_heads: int,
        rot: Rotary,
        k_normed: bool,
        generator: torch.Generator | None,
    ) -> LayerHeads:
        from convert.fits import svd_merge

        return svd_merge(layer, whitened, kv_heads, rot, k_normed, queries=self.queries, outputs=self.outputs)

    def lost_energy(self, heads: torch.Tensor, which: str, rot: Rotary, k_normed: bool) -> torch.Tensor:
        from convert.fits import svd_lost_energy

        return svd_lost_energy(heads, which, rot, k_normed)


@register
class Aware(Svd):
    name = "aware"
    help = "svd in the norm attention reads: keys weighed by their queries, values by their O columns"
    uses_queries = True
    queries = True
    outputs = True


class Grouping:
    """Which KV heads share a group: ``order`` returns the KV-head order that makes each group contiguous."""

    name: ClassVar[str]
    help: ClassVar[str]
    permutes: ClassVar[bool] = False  # may reorder heads, which rewrites Q and O too

    def order(self, heads: int, kv_heads: int, cost: GroupCost) -> list[int]:
        """The order of ``heads`` KV heads that puts each of ``kv_heads`` groups together; ``cost(group)`` prices
        merging a group (the merge method's ``group_cost``)."""
        return list(range(heads))


@register
class Contiguous(Grouping):
    name = "contiguous"
    help = "neighbouring KV heads merge (the GQA paper)"


@register
class Similarity(Grouping):
    name = "similarity"
    help = "the KV heads whose merge loses least share a group (heads are permuted, which keeps the function)"
    permutes = True

    def order(self, heads: int, kv_heads: int, cost: GroupCost) -> list[int]:
        """An equal-size partition of the KV heads that costs little when each part is merged.

        Greedy: the cheapest pair of heads left seeds a group, which grows by the head that raises its cost
        least. Returns the KV-head order that makes the chosen groups contiguous, groups in order of their first
        head.
        """
        size = heads // kv_heads
        if size == 1:
            return list(range(heads))
        left = list(range(heads))
        groups: list[list[int]] = []
        while left:
            group = left if len(left) == size else _cheapest_group(left, size, cost)
            groups.append(sorted(group))
            left = [h for h in left if h not in group]
        return [h for group in sorted(groups) for h in group]


def _cheapest_group(left: list[int], size: int, cost: GroupCost) -> list[int]:
    """The cheapest pair of the heads ``left`` grown, one cheapest head at a time, to ``size`` heads."""
    _, i, j = min((cost([i, j]), i, j) for n, i in enumerate(left) for j in left[n + 1 :])
    group = [i, j]
    while len(group) < size:
        group.append(min((cost(group + [h]), h) for h in left if h not in group)[1])
    return group


def calibrated_names() -> list[str]:
    """The methods that run the source on calibration text."""
    return [name for name, merge in METHODS.items() if merge.calibrated]


def choices_help(registry: Mapping[str, Merge | Grouping]) -> str:
    """``name: help`` for every entry, one sentence each, for the CLI's help text."""
    return ". ".join(f"{name}: {entry.help}" for name, entry in registry.items())
