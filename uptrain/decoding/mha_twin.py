"""The MHA twin of a GQA/MQA model: the same function, with every KV head repeated for its query heads.

A GQA checkpoint (SmolLM2: 9 query heads, 3 KV heads) has no MHA original to compare its cache against.
Its twin repeats each KV head once per query head of its group, in transformers' repeat_kv layout (query
head h reads KV head h // group), so the logits are the same and the cache is as large as an MHA model's::

    k_proj rows, 3 KV heads, group 3:  [k0, k1, k2] -> [k0, k0, k0, k1, k1, k1, k2, k2, k2]

Only llama-style families (separate ``k_proj``/``v_proj``, ``num_key_value_heads``) are handled.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from uptrain.decoding import DecodeError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

KV_TENSORS = ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")


def repeat_heads(t: torch.Tensor, kv_heads: int, group: int) -> torch.Tensor:
    """(kv_heads * head_dim, ...) rows -> (kv_heads * group * head_dim, ...), each head repeated in place."""
    heads = t.reshape(kv_heads, -1, *t.shape[1:])  # (kv_heads, head_dim, ...)
    return heads.repeat_interleave(group, dim=0).reshape(-1, *t.shape[1:])  # (kv_heads * group * head_dim, ...)


def mha_twin(model: PreTrainedModel) -> PreTrainedModel:
    """The MHA model computing exactly what the GQA/MQA `model` computes, on the same device and dtype."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    state = model.state_dict()
    if kv_heads is None or not any(name.endswith(KV_TENSORS) for name in state):
        raise DecodeError(
            f"an MHA twin needs separate k_proj/v_proj and num_key_value_heads (llama-style); "
            f"model_type {config.model_type} has not"
        )
    config.num_key_value_heads = heads
    state = {
        name: repeat_heads(t, kv_heads, heads // kv_heads) if name.endswith(KV_TENSORS) else t
        for name, t in state.items()
    }
    with torch.device(next(model.parameters()).device):
        twin = AutoModelForCausalLM.from_config(
            config, dtype=model.dtype, attn_implementation=model.config._attn_implementation
        )
    try:
        twin.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # per-KV-head tensors beyond k/v_proj (olmo2's k_norm, ...)
        detail = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
        raise DecodeError(f"no MHA twin for model_type {config.model_type}: {detail}") from None
    return twin.eval()


def save_mha_twin(source: str | Path, output: str | Path) -> Path:
    """Write the MHA twin of checkpoint `source` to `output`, with the source's tokenizer and other files."""
    from transformers import AutoModelForCausalLM

    source, output = Path(source), Path(output)
    mha_twin(AutoModelForCausalLM.from_pretrained(source, dtype="auto")).save_pretrained(output)
    for item in source.iterdir():
        weights = item.suffix in (".safetensors", ".bin") or item.name.endswith(".index.json")
        if item.is_file() and not weights and not (output / item.name).exists():
            shutil.copy2(item, output / item.name)
    return output
