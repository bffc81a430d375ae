"""The supported model families, kept as data.

Each entry says where a family keeps its attention tensors and how their rows
are laid out; ``convert.engine`` walks these tables and has no per-family code.

Entry keys (every key is checked by ``_validate``; an unknown one is an error):

- ``architectures``: the ``architectures[0]`` values that select this family
  when ``model_type`` is missing or unknown.
- ``attention``: the attention module's prefix, with a ``{layer}`` placeholder.
  Every tensor under it must be named in ``tensors`` (or ``drop``), so a
  variant this table does not understand is refused instead of half converted.
- ``tensors``: role -> module name under ``attention``. Roles: ``q``, ``k``,
  ``v``, ``o`` (separate projections), ``qkv`` (one fused projection),
  ``k_norm`` (a norm whose weight spans the KV heads, pooled like K),
  ``k_norm_per_head`` (one norm module per KV head, ``{head}`` placeholder),
  ``k_norm_shared`` (a per-head_dim K norm shared by all heads: copied),
  ``q_norm`` / ``q_norm_per_head`` (query norms: copied).
- ``layout``: how ``qkv`` rows are ordered (see ``convert.layouts``):
  ``separate``, ``contiguous`` [Q|K|V], ``grouped`` [q..q,k,v] per KV head,
  ``per_head`` [q,k,v] per head.
- ``qkv_bias`` / ``o_bias``: True, False, or the config key that says so.
- ``config``: config.json keys, each a list of aliases (first found wins):
  ``layers``, ``heads``, ``hidden``, ``head_dim`` (optional, else
  hidden / heads), ``kv_heads`` (where the KV-head count is written; absent
  means one KV head per query head, or see ``kv_heads_fixed``).
- ``kv_heads_fixed``: the KV-head count when the layout fixes it (legacy MQA).
- ``kv_choices``: ``divisors`` (any N dividing the KV heads) or
  ``mha_or_mqa`` (the architecture can only express N = heads or N = 1).
- ``mqa``: for ``mha_or_mqa``: the layout and config.json edits of N = 1.
- ``mha_layout``: for ``mha_or_mqa``: the layout of N = heads when the target
  architecture orders rows differently from the source.
- ``rotary``: ``half`` (rotate_half pairs i, i + d/2), ``interleaved``
  (pairs 2i, 2i+1) or ``none``; ``partial_rotary`` the config key of the
  rotary fraction (for later merges that must commute with RoPE).
- ``k_normed``: True where K is normalized before RoPE (qk-norm families).
- ``variants``: a list of ``{"when": {config_key: value}, **overrides}``;
  the first whose ``when`` matches config.json replaces those keys.
- ``note``: a caveat printed with the report.
- ``rename``: a target architecture (gpt2 -> gpt_bigcode): the output prefix,
  Conv1D weights to transpose, tensors to drop, the config deriver's name.
"""

from __future__ import annotations

import re
from typing import Any

LLAMA_LIKE: dict[str, Any] = {
    "attention": "model.layers.{layer}.self_attn",
    "tensors": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"},
    "layout": "separate",
    "qkv_bias": "attention_bias",
    "o_bias": "attention_bias",
    "config": {
        "layers": ["num_hidden_layers"],
        "heads": ["num_attention_heads"],
        "hidden": ["hidden_size"],
        "head_dim": ["head_dim"],
        "kv_heads": ["num_key_value_heads"],
    },
    "kv_choices": "divisors",
    "rotary": "half",
    "k_normed": False,
}


def _family(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**base, **changes}


FAMILIES: dict[str, dict[str, Any]] = {
    "llama": _family(LLAMA_LIKE, architectures=["LlamaForCausalLM"]),
    "mistral": _family(LLAMA_LIKE, architectures=["MistralForCausalLM"], qkv_bias=False, o_bias=False),
    "mixtral": _family(LLAMA_LIKE, architectures=["MixtralForCausalLM"], qkv_bias=False, o_bias=False),
    "qwen2": _family(LLAMA_LIKE, architectures=["Qwen2ForCausalLM"], qkv_bias=True, o_bias=False),
    "qwen3": _family(
        LLAMA_LIKE,
        architectures=["Qwen3ForCausalLM"],
        tensors={**LLAMA_LIKE["tensors"], "q_norm": "q_norm", "k_norm_shared": "k_norm"},
        k_normed=True,
    ),
    "gemma": _family(LLAMA_LIKE, architectures=["GemmaForCausalLM"]),
    "gemma2": _family(LLAMA_LIKE, architectures=["Gemma2ForCausalLM"]),
    "starcoder2": _family(LLAMA_LIKE, architectures=["Starcoder2ForCausalLM"], qkv_bias="use_bias", o_bias="use_bias"),
    "granite": _family(LLAMA_LIKE, architectures=["GraniteForCausalLM"]),
    "cohere": _family(
        LLAMA_LIKE,
        architectures=["CohereForCausalLM"],
        rotary="interleaved",
        variants=[
            {
                "when": {"use_qk_norm": True},
                "tensors": {**LLAMA_LIKE["tensors"], "q_norm": "q_norm", "k_norm": "k_norm"},
                "k_normed": True,
            }
        ],
    ),
    "olmo": _family(LLAMA_LIKE, architectures=["OlmoForCausalLM"]),
    "olmo2": _family(
        LLAMA_LIKE,
        architectures=["Olmo2ForCausalLM"],
        tensors={**LLAMA_LIKE["tensors"], "q_norm": "q_norm", "k_norm": "k_norm"},
        k_normed=True,
    ),
    "stablelm": _family(
        LLAMA_LIKE,
        architectures=["StableLmForCausalLM"],
        qkv_bias="use_qkv_bias",
        o_bias=False,
        partial_rotary="partial_rotary_factor",
        variants=[
            {
                "when": {"qk_layernorm": True},
                "tensors": {
                    **LLAMA_LIKE["tensors"],
                    "q_norm_per_head": "q_layernorm.norms.{head}",
                    "k_norm_per_head": "k_layernorm.norms.{head}",
                },
                "k_normed": True,
            }
        ],
    ),
    "phi": _family(
        LLAMA_LIKE,
        architectures=["PhiForCausalLM"],
        tensors={"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "dense"},
        qkv_bias=True,
        o_bias=True,
        partial_rotary="partial_rotary_factor",
        variants=[
            {
                "when": {"qk_layernorm": True},
                "tensors": {
                    "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "dense",
                    "q_norm": "q_layernorm", "k_norm_shared": "k_layernorm",
                },
                "k_normed": True,
            }
        ],
    ),
    "phi3": _family(
        LLAMA_LIKE,
        architectures=["Phi3ForCausalLM"],
        tensors={"qkv": "qkv_proj", "o": "o_proj"},
        layout="contiguous",
        qkv_bias=False,
        o_bias=False,
        partial_rotary="partial_rotary_factor",
    ),
    "falcon": {
        "architectures": ["FalconForCausalLM"],
        "attention": "transformer.h.{layer}.self_attention",
        "tensors": {"qkv": "query_key_value", "o": "dense"},
        "layout": "per_head",
        "qkv_bias": "bias",
        "o_bias": "bias",
        "config": {
            "layers": ["num_hidden_layers", "n_layer"],
            "heads": ["num_attention_heads", "n_head"],
            "hidden": ["hidden_size"],
            "kv_heads": ["num_kv_heads", "n_head_kv"],
        },
        "kv_choices": "mha_or_mqa",
        "mqa": {"layout": "contiguous", "config": {"multi_query": True}},
        "rotary": "half",
        "k_normed": False,
        "variants": [
            {"when": {"new_decoder_architecture": True}, "layout": "grouped", "kv_choices": "divisors",
             "note": "transformers' Falcon (new_decoder_architecture) broadcasts K/V to every query head before "
                     "caching, so its KV cache does not shrink; the cache figures hold for GQA-aware runtimes"},
            {"when": {"multi_query": True}, "layout": "contiguous", "kv_heads_fixed": 1},
            # multi_query defaults to True in FalconConfig: a legacy config without the key is MQA.
            {"when": {"multi_query": None}, "layout": "contiguous", "kv_heads_fixed": 1},
        ],
    },
    "gpt_bigcode": {
        "architectures": ["GPTBigCodeForCausalLM"],
        "attention": "transformer.h.{layer}.attn",
        "tensors": {"qkv": "c_attn", "o": "c_proj"},
        "layout": "per_head",
        "qkv_bias": True,
        "o_bias": True,
        "config": {
            "layers": ["n_layer", "num_hidden_layers"],
            "heads": ["n_head", "num_attention_heads"],
            "hidden": ["n_embd", "hidden_size"],
            "kv_heads": ["num_key_value_heads"],
        },
        "kv_choices": "mha_or_mqa",
        "mqa": {"layout": "contiguous", "config": {"multi_query": True}},
        "rotary": "none",
        "k_normed": False,
        "variants": [
            {"when": {"multi_query": True}, "layout": "contiguous", "kv_heads_fixed": 1},
            {"when": {"multi_query": None}, "layout": "contiguous", "kv_heads_fixed": 1},
        ],
    },
    "gpt2": {
        "architectures": ["GPT2LMHeadModel"],
        "attention": "transformer.h.{layer}.attn",
        "tensors": {"qkv": "c_attn", "o": "c_proj"},
        "layout": "contiguous",
        "qkv_bias": True,
        "o_bias": True,
        "config": {
            "layers": ["n_layer"],
            "heads": ["n_head"],
            "hidden": ["n_embd"],
            "kv_heads": [],
        },
        "kv_choices": "mha_or_mqa",
        "mqa": {"layout": "contiguous", "config": {"multi_query": True}},
        "mha_layout": "per_head",
        "rotary": "none",
        "k_normed": False,
        "rename": {
            "prefix": "transformer.",
            "transpose": ["attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"],
            "drop": [r"h\.\d+\.attn\.bias", r"h\.\d+\.attn\.masked_bias"],
            "config": "gpt2_to_gpt_bigcode",
        },
    },
}

_KEYS = {
    "architectures", "attention", "tensors", "layout", "qkv_bias", "o_bias", "config", "kv_heads_fixed",
    "kv_choices", "mqa", "mha_layout", "rotary", "partial_rotary", "k_normed", "variants", "rename", "note",
}
_ROLES = {"q", "k", "v", "o", "qkv", "k_norm", "k_norm_per_head", "q_norm", "q_norm_per_head", "k_norm_shared"}
_LAYOUTS = {"separate", "contiguous", "grouped", "per_head"}
_CONFIG_KEYS = {"layers", "heads", "hidden", "head_dim", "kv_heads"}


def _validate(name: str, spec: dict[str, Any]) -> None:
    """Refuse a table entry with an unknown key, role or layout (a typo here would mis-convert silently)."""
    unknown = set(spec) - _KEYS - {"when"}
    if unknown:
        raise ValueError(f"family {name}: unknown keys {sorted(unknown)}; valid: {sorted(_KEYS)}")
    if set(spec.get("tensors", {})) - _ROLES:
        raise ValueError(f"family {name}: unknown roles {sorted(set(spec['tensors']) - _ROLES)}")
    for key in ("layout", "mha_layout"):
        if key in spec and spec[key] not in _LAYOUTS:
            raise ValueError(f"family {name}: {key} {spec[key]!r} is not one of {sorted(_LAYOUTS)}")
    if set(spec.get("config", {})) - _CONFIG_KEYS:
        raise ValueError(f"family {name}: unknown config keys {sorted(set(spec['config']) - _CONFIG_KEYS)}")
    for variant in spec.get("variants", []):
        _validate(f"{name} variant {variant.get('when')}", variant)


for _name, _spec in FAMILIES.items():
    _validate(_name, _spec)


SUBSETS = {  # train.trainable subsets, by role: "attention" is Q, K, V, O and their norms in every family
    "attention": tuple(sorted(_ROLES)),
    "kv": ("k", "v"),
}


def parameter_pattern(spec: dict[str, Any], subset: str) -> re.Pattern:
    """The parameter names (weights and biases, every layer) of ``subset``'s modules, matched exactly.

    ``pattern.fullmatch(name)``: a module is matched by its full path, so GPTBigCode's attention ``c_proj``
    does not also select the MLP's ``c_proj``.
    """
    attention = re.escape(spec["attention"]).replace(r"\{layer\}", r"\d+")
    modules = [re.escape(m).replace(r"\{head\}", r"\d+") for r, m in spec["tensors"].items() if r in SUBSETS[subset]]
    return re.compile(rf"{attention}\.(?:{'|'.join(modules)})\.[^.]+")


def supported() -> list[str]:
    """The model_type names the converter accepts."""
    return sorted(FAMILIES)


def resolve(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Pick the family table (with its matching variant applied) for a config.json.

    Returns:
        The family name and its table. Raises KeyError when none matches.
    """
    name = config.get("model_type")
    if name not in FAMILIES:
        arch = (config.get("architectures") or [None])[0]
        name = next((n for n, s in FAMILIES.items() if arch in s["architectures"]), None)
    if name is None:
        raise KeyError(config.get("model_type") or (config.get("architectures") or ["unknown"])[0])
    spec = dict(FAMILIES[name])
    for variant in spec.pop("variants", []):
        if all(config.get(k) == v for k, v in variant["when"].items()):
            spec.update({k: v for k, v in variant.items() if k != "when"})
            break
    return name, spec
