"""How the KV heads of one group become one head: the merge methods and the grouping strategies, registered once.

Groups are consecutive, as transformers' ``repeat_kv`` reads them: with G source KV heads and N target heads,
target head j pools source heads j*G/N .. (j+1)*G/N - 1, and query head h (which read source head h // (H/G))
now reads target head h // (H/N). A grouping strategy may first permute the KV heads (with the query heads
that read them and their O columns), which keeps the function.

Adding a method is one ``Merge`` subclass decorated with ``@register``: the CLI's and the recipe's choices,
the help text and the report read ``METHODS``. Every method works on a whole layer in head form
(``convert.fits.LayerHeads``); the pooling methods change K and V alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:  # torch is imported lazily: the converter plans without it
    import torch

    from convert.fits import LayerHeads, Rotary


class Merge:
    """A merge method. Subclasses set the class attributes and implement ``pool`` (and ``fit`` if not pooling)."""

    name: ClassVar[str]
    help: ClassVar[str]
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
        """The whitened energy merging these (s, d, in) heads loses (grouping strategies minimize it)."""
        return (heads - heads.mean(0, keepdim=True)).square().sum()


METHODS: dict[str, Merge] = {}
GROUPINGS: dict[str, Grouping] = {}


def register(cls: type) -> type:
    """Add a Merge or Grouping subclass to its registry, under its ``name``."""
    registry = METHODS if issubclass(cls, Merge) else GROUPINGS
    if cls.name in registry:
        raise ValueError(f"{cls.name!r} is registered twice")
    registry[cls.name] = cls()
    return cls


def _grouped(heads: torch.Tensor, kv_heads: int) -> torch.Tensor:
    return heads.float().reshape(kv_heads, heads.shape[0] // kv_heads, *heads.shape[1:])  # (N, G/N, ...)


@register
class Mean(Merge):
    name = "mean"
    help = "mean-pool each group's K and V heads (the GQA paper)"

    def pool(self, heads, kv_heads, generator, is_norm=False):
        return _grouped(heads, kv_heads).mean(dim=1)


@register
class First(Merge):
    name = "first"
    help = "keep each group's first head"

    def pool(self, heads, kv_heads, generator, is_norm=False):
        return _grouped(heads, kv_heads)[:, 0].clone()


@register
class Random(Merge):
    name = "random"
    help = "a fresh normal init with the std of the group's heads (a baseline)"
    seeded = True

    def pool(self, heads, kv_heads, generator, is_norm=False):
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
    help = (
        "activation-aware low-rank fit of each group in the input's norm, folded into Q and O "
        "(needs --calibration-data)"
    )
    calibrated = True
    changes = frozenset({"q", "k", "v", "o"})
    k_normed_note = "mean (this family normalizes K before RoPE, so no mix can be folded through it)"
    queries: ClassVar[bool] = False  # weigh key errors by the queries that read them
    outputs: ClassVar[bool] = False  # weigh value errors by the O columns that carry them

    def pool(self, heads, kv_heads, generator, is_norm=False):  # K norms (nothing folds through a norm)
        return _grouped(heads, kv_heads).mean(dim=1)

    def fit(self, layer, whitened, kv_heads, rot, k_normed, generator):
        from convert.fits import svd_merge

        return svd_merge(layer, whitened, kv_heads, rot, k_normed, queries=self.queries, outputs=self.outputs)

    def lost_energy(self, heads, which, rot, k_normed):
        from convert.fits import svd_lost_energy

        return svd_lost_energy(heads, which, rot, k_normed)


@register
class Aware(Svd):
    name = "aware"
    help = (
        "svd fitted to what attention reads: each key head weighed by the queries that read it, each value "
        "head by the O columns that carry it (needs --calibration-data; recommended)"
    )
    uses_queries = True
    queries = True
    outputs = True


class Grouping:
    """Which KV heads share a group: ``order`` returns the KV-head order that makes each group contiguous."""

    name: ClassVar[str]
    help: ClassVar[str]
    permutes: ClassVar[bool] = False  # may reorder heads, which rewrites Q and O too

    def order(self, whitened: LayerHeads, kv_heads: int, merge: Merge, rot: Rotary, k_normed: bool) -> list[int]:
        return list(range(whitened.k.shape[0]))


@register
class Contiguous(Grouping):
    name = "contiguous"
    help = "neighbouring KV heads merge (the GQA paper)"


@register
class Similarity(Grouping):
    name = "similarity"
    help = "the KV heads whose merge loses least share a group (heads are permuted, which keeps the function)"
    permutes = True

    def order(self, whitened, kv_heads, merge, rot, k_normed):
        from convert.fits import similarity_groups

        return similarity_groups(whitened, kv_heads, merge, rot, k_normed)


def calibrated_names() -> list[str]:
    """The methods that need calibration text."""
    return [name for name, merge in METHODS.items() if merge.calibrated]


def choices_help(registry: dict) -> str:
    """``name: help`` for every entry, for the CLI's help text."""
    return "; ".join(f"{name}: {entry.help}" for name, entry in registry.items())
