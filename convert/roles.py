"""The roles a tensor plays in an attention module: what it holds, its shape, and what a conversion does to it.

Family tables (``convert.families``) name the module of each role; the planner (``convert.plan``) and the
uptrainer's trainable subsets (``Family.modules``) both ask this module what a role means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Role = Literal["q", "k", "v", "o", "qkv", "k_norm", "k_norm_per_head", "k_norm_shared", "q_norm", "q_norm_per_head"]
Operation = Literal["layer", "pool_norm", "pool_norm_heads", "copy"]


@dataclass
class Dims:
    """Attention sizes read from config.json (``convert.plan.read_dims``)."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int


@dataclass(frozen=True)
class RoleInfo:
    """What a role is and what a conversion does to it.

    ``operation``: ``layer`` (rewritten with its whole layer by the merge method), ``pool_norm`` (a norm spanning
    the KV heads, pooled like K), ``pool_norm_heads`` (one norm module per KV head, pooled per group) or
    ``copy`` (unchanged).
    """

    operation: Operation
    doc: str


ROLES: dict[str, RoleInfo] = {
    "q": RoleInfo("layer", "query projection (H*d, hidden)"),
    "k": RoleInfo("layer", "key projection (G*d, hidden)"),
    "v": RoleInfo("layer", "value projection (G*d, hidden)"),
    "o": RoleInfo("layer", "output projection (out, H*d)"),
    "qkv": RoleInfo("layer", "fused Q, K and V projection ((H + 2G)*d, hidden), rows ordered by the layout"),
    "k_norm": RoleInfo("pool_norm", "a K norm whose weight spans the KV heads (G*d) or (G, d)"),
    "k_norm_per_head": RoleInfo("pool_norm_heads", "one K norm module per KV head ({head} placeholder), (d,)"),
    "k_norm_shared": RoleInfo("copy", "a (d,) K norm shared by all heads"),
    "q_norm": RoleInfo("copy", "a query norm, (d,) or spanning the heads"),
    "q_norm_per_head": RoleInfo("copy", "one query norm module per head ({head} placeholder), (d,)"),
}
assert set(ROLES) == set(get_args(Role)), "every role needs a RoleInfo"

LAYER_ROLES = tuple(r for r, info in ROLES.items() if info.operation == "layer")
SUBSETS: dict[str, tuple[str, ...]] = {  # train.trainable: "attention" is Q, K, V, O and their norms, everywhere
    "attention": tuple(ROLES),
    "kv": ("k", "v"),
}


def expected_shape(role: str, param: str, dims: Dims) -> tuple[int, ...] | None:
    """The shape config.json implies for a role's weight or bias (None where only the element count is fixed)."""
    d = dims
    rows = {
        "q": d.heads * d.head_dim,
        "k": d.kv_heads * d.head_dim,
        "v": d.kv_heads * d.head_dim,
        "qkv": (d.heads + 2 * d.kv_heads) * d.head_dim,
        "o": d.hidden,
        "k_norm_per_head": d.head_dim,
        "q_norm_per_head": d.head_dim,
        "k_norm_shared": d.head_dim,
    }.get(role)
    if rows is None:
        return None
    if param == "bias" or role.endswith(("per_head", "shared")):
        return (rows,)
    return (rows, d.heads * d.head_dim) if role == "o" else (rows, d.hidden)


def expected_elements(role: str, dims: Dims) -> tuple[int, ...]:
    """The element counts allowed for the roles ``expected_shape`` leaves open (norms of several shapes)."""
    return {"k_norm": (dims.kv_heads * dims.head_dim,), "q_norm": (dims.head_dim, dims.heads * dims.head_dim)}[role]
