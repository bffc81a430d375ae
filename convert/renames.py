"""Families converted into another architecture: GPT-2 becomes GPTBigCode.

GPTBigCode is GPT-2's network with an optional ``multi_query`` flag, but it
stores projections as ``nn.Linear`` (out, in) where GPT-2 uses ``Conv1D``
(in, out), and its MHA form orders ``c_attn`` rows [q, k, v] per head where
GPT-2 has [Q | K | V].
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from convert.errors import ConversionError

if TYPE_CHECKING:
    from convert.families import Rename


def canonical_names(names: list[str], rename: Rename | None) -> dict[str, str]:
    """Output name -> source name; tensors the target has no place for (GPT-2's mask buffers) are left out."""
    if not rename:
        return {name: name for name in names}
    prefix = rename.prefix
    drop = [re.compile(pattern) for pattern in rename.drop]
    mapping = {}
    for name in names:
        bare = name.removeprefix(prefix)
        if any(p.fullmatch(bare) for p in drop):
            continue
        mapping[prefix + bare] = name
    return mapping


def transposed(canonical: dict[str, str], rename: Rename | None) -> set[str]:
    """Output names whose source tensor is a Conv1D weight (in, out) to be stored as (out, in)."""
    if not rename:
        return set()
    suffixes = tuple("." + s for s in rename.transpose)
    return {name for name in canonical if name.endswith(suffixes)}


_GPT2_ONLY = {
    "summary_type",
    "summary_use_proj",
    "summary_activation",
    "summary_proj_to_labels",
    "summary_first_dropout",
    "scale_attn_by_inverse_layer_idx",
    "reorder_and_upcast_attn",
}


def gpt2_to_gpt_bigcode(config: dict[str, Any], kv_heads: int) -> dict[str, Any]:
    """A GPTBigCode config.json for the same network as a GPT-2 one, with MHA or MQA."""
    if config.get("scale_attn_by_inverse_layer_idx"):
        raise ConversionError("config.json sets scale_attn_by_inverse_layer_idx, which GPTBigCode cannot express")
    if config.get("add_cross_attention"):
        raise ConversionError("config.json sets add_cross_attention; only decoder-only GPT-2 converts")
    new = {k: v for k, v in config.items() if k not in _GPT2_ONLY}
    new.update(architectures=["GPTBigCodeForCausalLM"], model_type="gpt_bigcode", multi_query=kv_heads == 1)
    new.setdefault("activation_function", "gelu_new")  # GPT-2's default; GPTBigCode's differs
    return new


_DERIVERS = {"gpt2_to_gpt_bigcode": gpt2_to_gpt_bigcode}


def derive_config(name: str, config: dict[str, Any], kv_heads: int) -> dict[str, Any]:
    return _DERIVERS[name](config, kv_heads)
