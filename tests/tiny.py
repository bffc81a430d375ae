"""Tiny real transformers models of every supported family, and an independent KV-head expander.

``expand_kv`` turns a GQA/MQA state dict into the MHA one that computes the same
function, by repeating KV heads, written directly against each layout (not with
the converter's code). Tests check that the expansion really is the same
function (logits), then that the converter takes it back.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

HEADS = 8
BASE = dict(
    hidden_size=64,
    num_attention_heads=HEADS,
    num_hidden_layers=2,
    intermediate_size=96,
    vocab_size=96,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
FAMILIES = {
    "llama": {},
    "mistral": {},
    "mixtral": dict(num_local_experts=2, num_experts_per_tok=1),
    "qwen2": {},
    "qwen3": dict(head_dim=16),
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16),
    "starcoder2": dict(use_bias=True),
    "granite": dict(attention_bias=True),
    "cohere": dict(use_qk_norm=True),
    "olmo": {},
    "olmo2": {},
    "stablelm": dict(qk_layernorm=True, use_qkv_bias=True),
    "phi": {},
    "phi3": {},
    "falcon": dict(new_decoder_architecture=True, bias=True),
}
GPT_KWARGS = dict(n_embd=64, n_head=HEADS, n_layer=2, vocab_size=96, n_positions=64, bos_token_id=1, eos_token_id=2)


def kv_key(family: str) -> str:
    return "num_kv_heads" if family == "falcon" else "num_key_value_heads"


def make_model(family: str, kv_heads: int, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random model with weights scaled so that every head matters to the logits."""
    if family in ("gpt2", "gpt_bigcode", "falcon_legacy"):
        kwargs = (
            dict(GPT_KWARGS) if family != "falcon_legacy" else dict(BASE, new_decoder_architecture=False, bias=True)
        )
        if family == "gpt_bigcode":
            kwargs["multi_query"] = kv_heads == 1
        if family == "falcon_legacy":
            kwargs["multi_query"] = kv_heads == 1
            family = "falcon"
    else:
        kwargs = dict(BASE, **FAMILIES[family])
        kwargs[kv_key(family)] = kv_heads
    kwargs.update(overrides)
    config = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("weight") else 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 1.5 / p.shape[-1] ** 0.5)
    return model


def save_tiny(family: str, tokenizer, path: Path, layers: int = 2, **overrides) -> Path:
    """A tiny MHA model of ``family`` (``make_model``, 64 positions) with ``layers`` decoder layers, saved at
    ``path`` with ``tokenizer`` (its vocabulary sized to it): a source checkpoint for the converter."""
    depth = dict(n_layer=layers) if family.startswith("gpt") else dict(num_hidden_layers=layers)
    make_model(family, HEADS, vocab_size=len(tokenizer), **depth, **overrides).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def logits(model: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _repeat(t: torch.Tensor, kv: int, reps: int) -> torch.Tensor:
    """(kv * d, ...) rows -> (kv * reps * d, ...), each head repeated `reps` times in place."""
    return t.reshape(kv, -1, *t.shape[1:]).repeat_interleave(reps, dim=0).reshape(-1, *t.shape[1:])


def expand_kv(family: str, state: dict[str, torch.Tensor], kv: int, heads: int = HEADS, head_dim: int = 8):
    """The MHA state dict equal in function to a state dict with `kv` KV heads."""
    reps = heads // kv
    out = {}
    for name, t in state.items():
        if family == "phi3" and "qkv_proj" in name:
            q, k, v = t.split([heads * head_dim, kv * head_dim, kv * head_dim])
            t = torch.cat([q, _repeat(k, kv, reps), _repeat(v, kv, reps)])
        elif family == "falcon" and "query_key_value" in name:  # grouped [q..q, k, v] -> one q per group
            blocks = t.reshape(kv, reps + 2, head_dim, *t.shape[1:])
            q = blocks[:, :reps]  # (kv, reps, d, ...)
            k = blocks[:, reps : reps + 1].expand_as(q)
            v = blocks[:, reps + 1 :].expand_as(q)
            t = torch.stack([q, k, v], dim=2).reshape(-1, *t.shape[1:])
        elif family in ("gpt_bigcode", "falcon_legacy") and ("c_attn" in name or "query_key_value" in name):
            # MQA [Q | k | v] -> MHA per head [q_h, k, v]
            q, k, v = t.split([heads * head_dim, head_dim, head_dim])
            q = q.reshape(heads, head_dim, *t.shape[1:])
            t = torch.stack([q, k.expand_as(q), v.expand_as(q)], dim=1).reshape(-1, *t.shape[1:])
        elif name.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")):
            t = _repeat(t, kv, reps)
        elif "k_norm" in name and family in ("cohere", "olmo2"):
            t = _repeat(t.reshape(kv, -1), kv, reps).reshape(-1) if t.dim() == 1 else _repeat(t, kv, reps)
        elif "k_layernorm.norms." in name:  # stablelm: one module per KV head
            prefix, rest = name.split("k_layernorm.norms.")
            head, param = rest.split(".", 1)
            for r in range(reps):
                out[f"{prefix}k_layernorm.norms.{int(head) * reps + r}.{param}"] = t.clone()
            continue
        out[name] = t.clone()
    return out


def mha_twin(family: str, kv: int, seed: int = 0, **overrides) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(model with `kv` KV heads, MHA model computing the same function)."""
    small = make_model(family, kv, seed, **overrides)
    mha = make_model(family, HEADS, seed + 1, **overrides)
    head_dim = small.config.head_dim if getattr(small.config, "head_dim", None) else 64 // HEADS
    mha.load_state_dict(expand_kv(family, small.state_dict(), kv, HEADS, head_dim), strict=True)
    return small, mha
