"""The supported model families, kept as typed data.

Each ``Family`` says where a family keeps its attention tensors and how their rows are laid out;
``convert.plan`` walks these tables and has no per-family code. The tables are frozen dataclasses checked
at construction: a misspelt role, layout, rotary style or KV choice fails at import, not mid-conversion.

Fields (see ``Family``):

- ``architectures``: the ``architectures[0]`` values that select this family when ``model_type`` is
  missing or unknown.
- ``attention``: the attention module's prefix, with a ``{layer}`` placeholder. Every tensor under it must
  be named in ``tensors``, so a variant this table does not understand is refused instead of half converted.
- ``tensors``: role -> module name under ``attention`` (roles: ``convert.roles``).
- ``layout``: how ``qkv`` rows are ordered (``convert.layouts``): ``separate``, ``contiguous`` [Q|K|V],
  ``grouped`` [q..q,k,v] per KV head, ``per_head`` [q,k,v] per head.
- ``qkv_bias`` / ``o_bias``: True, False, or the config key that says so.
- ``config``: config.json keys (``ConfigKeys``), each a tuple of aliases (first found wins).
- ``kv_heads_fixed``: the KV-head count when the layout fixes it (legacy MQA).
- ``kv_choices``: ``divisors`` (any N dividing the KV heads) or ``mha_or_mqa`` (the architecture can only
  express N = heads or N = 1), with ``mqa`` (``MqaForm``: the layout and config.json edits of N = 1) and
  ``mha_layout`` (the layout of N = heads when the target orders rows differently).
- ``rotary``: ``half`` (rotate_half pairs i, i + d/2), ``interleaved`` (pairs 2i, 2i+1) or ``none``;
  ``partial_rotary`` the config key of the rotary fraction.
- ``k_normed``: K is normalized before RoPE (qk-norm families).
- ``variants``: ``Variant(when={config_key: value}, changes={field: value})``; the first whose ``when``
  matches config.json replaces those fields.
- ``note``: a caveat printed with the report.
- ``rename``: a target architecture (gpt2 -> gpt_bigcode, ``Rename``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, get_args

from convert.roles import ROLES, SUBSETS

Layout = Literal["separate", "contiguous", "grouped", "per_head"]
RotaryStyle = Literal["half", "interleaved", "none"]
KvChoices = Literal["divisors", "mha_or_mqa"]


def _one_of(where: str, value: Any, kind: Any) -> None:
    if value not in get_args(kind):
        raise ValueError(f"{where}: {value!r} is not one of {', '.join(get_args(kind))}")


@dataclass(frozen=True)
class ConfigKeys:
    """config.json keys, each a tuple of aliases: the first one present wins."""

    layers: tuple[str, ...]
    heads: tuple[str, ...]
    hidden: tuple[str, ...]
    head_dim: tuple[str, ...] = ()  # absent: hidden / heads
    kv_heads: tuple[str, ...] = ()  # absent: one KV head per query head (or Family.kv_heads_fixed)


@dataclass(frozen=True)
class MqaForm:
    """What N = 1 looks like in an architecture with only MHA and MQA forms."""

    layout: Layout
    config: Mapping[str, Any]

    def __post_init__(self) -> None:
        _one_of("mqa.layout", self.layout, Layout)
        object.__setattr__(self, "config", MappingProxyType(dict(self.config)))


@dataclass(frozen=True)
class Rename:
    """A family written as another architecture: output prefix, Conv1D weights to transpose, tensors dropped."""

    prefix: str
    transpose: tuple[str, ...]
    drop: tuple[str, ...]
    config: str  # the config deriver's name in convert.renames


@dataclass(frozen=True)
class Variant:
    """Field changes applied when every ``when`` key of config.json has the given value (None: absent)."""

    when: Mapping[str, Any]
    changes: Mapping[str, Any]


@dataclass(frozen=True)
class Family:
    """One model family's attention, as data (see the module docstring for each field)."""

    architectures: tuple[str, ...]
    attention: str
    tensors: Mapping[str, str]
    layout: Layout
    qkv_bias: bool | str
    o_bias: bool | str
    config: ConfigKeys
    kv_choices: KvChoices
    rotary: RotaryStyle
    k_normed: bool = False
    mqa: MqaForm | None = None
    mha_layout: Layout | None = None
    partial_rotary: str | None = None
    kv_heads_fixed: int | None = None
    variants: tuple[Variant, ...] = ()
    rename: Rename | None = None
    note: str | None = None

    def __post_init__(self) -> None:
        where = f"family {self.architectures[0] if self.architectures else '?'}"
        unknown = set(self.tensors) - set(ROLES)
        if unknown:
            raise ValueError(f"{where}: unknown roles {sorted(unknown)}; valid: {sorted(ROLES)}")
        if "{layer}" not in self.attention:
            raise ValueError(f"{where}: attention {self.attention!r} has no {{layer}} placeholder")
        _one_of(f"{where} layout", self.layout, Layout)
        _one_of(f"{where} rotary", self.rotary, RotaryStyle)
        _one_of(f"{where} kv_choices", self.kv_choices, KvChoices)
        if self.mha_layout is not None:
            _one_of(f"{where} mha_layout", self.mha_layout, Layout)
        if (self.kv_choices == "mha_or_mqa") != (self.mqa is not None):
            raise ValueError(f"{where}: an mqa form is needed exactly when kv_choices is mha_or_mqa")
        needed = {"o"} | ({"q", "k", "v"} if self.layout == "separate" else {"qkv"})
        if not needed <= set(self.tensors):
            raise ValueError(f"{where}: layout {self.layout} needs roles {sorted(needed - set(self.tensors))}")
        object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))
        for variant in self.variants:
            self.with_changes(variant.changes)  # a broken variant fails here, at import

    def with_changes(self, changes: Mapping[str, Any]) -> Family:
        names = {f.name for f in dataclasses.fields(self)}
        if set(changes) - names:
            unknown = sorted(set(changes) - names)
            raise ValueError(f"family {self.architectures[0]}: variant changes unknown fields {unknown}")
        return dataclasses.replace(self, **changes, variants=())

    def for_config(self, config: Mapping[str, Any]) -> Family:
        """This family with the first variant whose ``when`` matches config.json applied."""
        for variant in self.variants:
            if all(config.get(k) == v for k, v in variant.when.items()):
                return self.with_changes(variant.changes)
        return dataclasses.replace(self, variants=())

    def modules(self, subset: str) -> tuple[str, ...]:
        """The module names (under ``attention``) that play the roles of a trainable ``subset``."""
        return tuple(m for r, m in self.tensors.items() if r in SUBSETS[subset])

    def parameter_pattern(self, subset: str) -> re.Pattern:
        """The parameter names (weights and biases, every layer) of ``subset``'s modules, matched exactly.

        ``pattern.fullmatch(name)``: a module is matched by its full path, so GPTBigCode's attention ``c_proj``
        does not also select the MLP's ``c_proj``.
        """
        return re.compile(rf"{self.module_pattern(self.modules(subset)).pattern}\.[^.]+")

    def module_pattern(self, modules: Iterable[str]) -> re.Pattern:
        """The full paths (every layer) of ``modules``, names under ``attention``, matched exactly (fullmatch)."""
        attention = re.escape(self.attention).replace(r"\{layer\}", r"\d+")
        names = [re.escape(m).replace(r"\{head\}", r"\d+") for m in modules]
        return re.compile(rf"{attention}\.(?:{'|'.join(names)})")


LLAMA_TENSORS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
LLAMA_LIKE = Family(
    architectures=("LlamaForCausalLM",),
    attention="model.layers.{layer}.self_attn",
    tensors=LLAMA_TENSORS,
    layout="separate",
    qkv_bias="attention_bias",
    o_bias="attention_bias",
    config=ConfigKeys(
        layers=("num_hidden_layers",),
        heads=("num_attention_heads",),
        hidden=("hidden_size",),
        head_dim=("head_dim",),
        kv_heads=("num_key_value_heads",),
    ),
    kv_choices="divisors",
    rotary="half",
)


def _like(base: Family, architecture: str, **changes: Any) -> Family:
    """``base``'s table for another architecture, with the fields that differ."""
    return dataclasses.replace(base, architectures=(architecture,), **changes)


def _like_llama(architecture: str, **changes: Any) -> Family:
    return _like(LLAMA_LIKE, architecture, **changes)


PHI_TENSORS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "dense"}
MQA_FUSED = MqaForm(layout="contiguous", config={"multi_query": True})
LEGACY_MQA = (  # multi_query defaults to True in Falcon/GPTBigCode configs: a config without the key is MQA
    Variant(when={"multi_query": True}, changes={"layout": "contiguous", "kv_heads_fixed": 1}),
    Variant(when={"multi_query": None}, changes={"layout": "contiguous", "kv_heads_fixed": 1}),
)
PER_HEAD_NORMS = {
    **LLAMA_TENSORS,
    "q_norm_per_head": "q_layernorm.norms.{head}",
    "k_norm_per_head": "k_layernorm.norms.{head}",
}

GPT_BIGCODE = Family(  # gpt2 is written as this architecture (Rename), so shares its attention
    architectures=("GPTBigCodeForCausalLM",),
    attention="transformer.h.{layer}.attn",
    tensors={"qkv": "c_attn", "o": "c_proj"},
    layout="per_head",
    qkv_bias=True,
    o_bias=True,
    config=ConfigKeys(
        layers=("n_layer", "num_hidden_layers"),
        heads=("n_head", "num_attention_heads"),
        hidden=("n_embd", "hidden_size"),
        kv_heads=("num_key_value_heads",),
    ),
    kv_choices="mha_or_mqa",
    mqa=MQA_FUSED,
    rotary="none",
    variants=LEGACY_MQA,
)

FAMILIES: dict[str, Family] = {
    "llama": LLAMA_LIKE,
    "mistral": _like_llama("MistralForCausalLM", qkv_bias=False, o_bias=False),
    "mixtral": _like_llama("MixtralForCausalLM", qkv_bias=False, o_bias=False),
    "qwen2": _like_llama("Qwen2ForCausalLM", qkv_bias=True, o_bias=False),
    "qwen3": _like_llama(
        "Qwen3ForCausalLM", tensors={**LLAMA_TENSORS, "q_norm": "q_norm", "k_norm_shared": "k_norm"}, k_normed=True
    ),
    "gemma": _like_llama("GemmaForCausalLM"),
    "gemma2": _like_llama("Gemma2ForCausalLM"),
    "starcoder2": _like_llama("Starcoder2ForCausalLM", qkv_bias="use_bias", o_bias="use_bias"),
    "granite": _like_llama("GraniteForCausalLM"),
    "cohere": _like_llama(
        "CohereForCausalLM",
        rotary="interleaved",
        variants=(
            Variant(
                when={"use_qk_norm": True},
                changes={"tensors": {**LLAMA_TENSORS, "q_norm": "q_norm", "k_norm": "k_norm"}, "k_normed": True},
            ),
        ),
    ),
    "olmo": _like_llama("OlmoForCausalLM"),
    "olmo2": _like_llama(
        "Olmo2ForCausalLM", tensors={**LLAMA_TENSORS, "q_norm": "q_norm", "k_norm": "k_norm"}, k_normed=True
    ),
    "stablelm": _like_llama(
        "StableLmForCausalLM",
        qkv_bias="use_qkv_bias",
        o_bias=False,
        partial_rotary="partial_rotary_factor",
        variants=(Variant(when={"qk_layernorm": True}, changes={"tensors": PER_HEAD_NORMS, "k_normed": True}),),
    ),
    "phi": _like_llama(
        "PhiForCausalLM",
        tensors=PHI_TENSORS,
        qkv_bias=True,
        o_bias=True,
        partial_rotary="partial_rotary_factor",
        variants=(
            Variant(
                when={"qk_layernorm": True},
                changes={
                    "tensors": {**PHI_TENSORS, "q_norm": "q_layernorm", "k_norm_shared": "k_layernorm"},
                    "k_normed": True,
                },
            ),
        ),
    ),
    "phi3": _like_llama(
        "Phi3ForCausalLM",
        tensors={"qkv": "qkv_proj", "o": "o_proj"},
        layout="contiguous",
        qkv_bias=False,
        o_bias=False,
        partial_rotary="partial_rotary_factor",
    ),
    "falcon": Family(
        architectures=("FalconForCausalLM",),
        attention="transformer.h.{layer}.self_attention",
        tensors={"qkv": "query_key_value", "o": "dense"},
        layout="per_head",
        qkv_bias="bias",
        o_bias="bias",
        config=ConfigKeys(
            layers=("num_hidden_layers", "n_layer"),
            heads=("num_attention_heads", "n_head"),
            hidden=("hidden_size",),
            kv_heads=("num_kv_heads", "n_head_kv"),
        ),
        kv_choices="mha_or_mqa",
        mqa=MQA_FUSED,
        rotary="half",
        variants=(
            Variant(
                when={"new_decoder_architecture": True},
                changes={
                    "layout": "grouped",
                    "kv_choices": "divisors",
                    "mqa": None,
                    "note": "transformers' Falcon (new_decoder_architecture) broadcasts K/V to every query head before "
                    "caching, so its KV cache does not shrink; the cache figures hold for GQA-aware runtimes",
                },
            ),
            *LEGACY_MQA,
        ),
    ),
    "gpt_bigcode": GPT_BIGCODE,
    "gpt2": _like(
        GPT_BIGCODE,
        "GPT2LMHeadModel",
        layout="contiguous",
        config=ConfigKeys(layers=("n_layer",), heads=("n_head",), hidden=("n_embd",)),
        mha_layout="per_head",
        variants=(),
        rename=Rename(
            prefix="transformer.",
            transpose=("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"),
            drop=(r"h\.\d+\.attn\.bias", r"h\.\d+\.attn\.masked_bias"),
            config="gpt2_to_gpt_bigcode",
        ),
    ),
}


def supported() -> list[str]:
    """The model_type names the converter accepts."""
    return sorted(FAMILIES)


def resolve(config: Mapping[str, Any]) -> tuple[str, Family]:
    """Pick the family table (with its matching variant applied) for a config.json.

    Returns:
        The family name and its table. Raises KeyError when none matches.
    """
    name = config.get("model_type")
    if name not in FAMILIES:
        arch = (config.get("architectures") or [None])[0]
        name = next((n for n, f in FAMILIES.items() if arch in f.architectures), None)
    if name is None:
        raise KeyError(config.get("model_type") or (config.get("architectures") or ["unknown"])[0])
    return name, FAMILIES[name].for_config(config)
